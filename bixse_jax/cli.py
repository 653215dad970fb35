"""`bixse-jax COMMAND ...`: dispatch only; each command parses its own flags in bixse_jax/commands/.

  bixse-jax train --config configs/demo.py --workdir DIR [--config.KEY=VALUE ...]
  bixse-jax COMMAND --help      flags of one command

Bad input (a data line, config key or value, path or model) ends any command with one line,
`bixse-jax COMMAND: error: ...`, and exit status 2; --verbose adds the traceback (bixse_jax/errors.py).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bixse_jax.commands
from bixse_jax import errors


def available_commands() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bixse_jax.commands.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    commands = available_commands()
    if len(argv) < 2 or argv[1] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\ncommands: {', '.join(commands)}", file=sys.stderr)
        sys.exit(0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2)
    prog = f"bixse-jax {argv[1]}"  # also under `python -m bixse_jax.cli`
    with errors.reported(prog, verbose=errors.verbose_requested(argv[2:])):
        module = importlib.import_module(f"bixse_jax.commands.{argv[1]}")
        module.main([prog] + argv[2:])


if __name__ == "__main__":
    main()
