"""How every export writes its folder: the target checked first, then written into a hidden sibling
and renamed into place when complete, so a failed export leaves nothing half-written and
`overwrite` replaces an old export only once the new one is done. Used by export.py and export_peft.py."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Iterator

from bixse_jax.errors import UserError


class ExportError(UserError):
    """An export that cannot be made: no checkpoint, a bad target folder, an unknown format."""


def check_target(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: folder exists and is not empty; pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def staged_folder(out: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a hidden sibling folder to write into; on success it becomes `out` (replacing it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
