"""bixse-jax: dense-retrieval training with BiXSE (sigmoid BCE on graded targets) in JAX/Flax.

The public API for trained models, loaded on first use so that `import bixse_jax` (and the CLI)
stays fast:

  model = bixse_jax.load_encoder("exported/or/hf/folder")
  q = bixse_jax.encode(model, ["a question"], query=True)
  p = bixse_jax.predict_relevance(model, ["a question"], ["a passage"])   # calibrated probabilities
  bixse_jax.export_checkpoint("workdirs/run", "out/st", "sentence-transformers")
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import Any

try:
    __version__ = _metadata.version("bixse-jax")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    **{name: "bixse_jax.models.sentence_model" for name in ("SentenceModel", "load_encoder")},
    **{name: "bixse_jax.inference" for name in ("encode", "predict_relevance")},
    **{name: "bixse_jax.export" for name in ("FORMATS", "ExportError", "export_checkpoint", "export_model")},
    "restore_model": "bixse_jax.checkpoint",
}
__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bixse_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
