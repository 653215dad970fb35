"""Errors a user reads: bad input ends a command with one line and exit status 2; a bug, with a traceback.

Raise `UserError` (or a subclass: `ConfigError` here, `DataError` in data/sources.py, `ModelLoadError`
in models/hf_io.py) for anything the user can fix: a bad data line, config key or value, flag, path
or model. `bixse_jax.cli.main` reports it as `bixse-jax COMMAND: error: MESSAGE` and exits 2, as
argparse does for a bad flag; `--verbose` adds the traceback. Any other exception is a bug and keeps
its traceback. UserError subclasses ValueError, so `except ValueError` still catches it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from typing import Iterator, Sequence

EXIT_USER_ERROR = 2  # argparse's status for a usage error


class UserError(ValueError):
    """Bad input the user can fix; reported in one line without a traceback."""


class ConfigError(UserError):
    """A config key or value that cannot be used (a run's config, an override, a model's config.json)."""


# FileNotFoundError: a path the user named that does not exist.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined by '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """--verbose for an argparse command (`bixse-jax train` defines its own absl flag)."""
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


VERBOSE_HELP = "on an input error, also print the Python traceback"


def verbose_requested(args: Sequence[str]) -> bool:
    """Whether a command's arguments ask for --verbose (also absl's --noverbose / --verbose=false; last wins)."""
    verbose = False
    for arg in args:
        if arg == "--":
            break
        name, _, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-"):
            continue
        if name == "verbose":
            verbose = value.lower() not in ("0", "false", "f", "no", "n") if value else True
        elif name == "noverbose":
            verbose = False
    return verbose


@contextlib.contextmanager
def reported(prog: str, verbose: bool = False) -> Iterator[None]:
    """Runs a command body: a user error prints `prog: error: MESSAGE` (after its traceback if verbose), exit 2."""
    try:
        yield
    except USER_ERRORS as e:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
