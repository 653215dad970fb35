"""`bixse-jax COMMAND ...`: argument parsing only; the work lives in the modules it calls.

  bixse-jax train --config configs/demo.py --workdir DIR [--config.KEY=VALUE ...]
"""

from __future__ import annotations

import json
import sys

COMMANDS = ("train",)


def _train(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).",
                                                  lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, TensorBoard.")
    distributed_flag = flags.DEFINE_bool("jax_distributed", False,
                                         "Call jax.distributed.initialize() first (multi-host runs).")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        import jax
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
        if distributed_flag.value:
            jax.distributed.initialize()
        from bixse_jax.train import train
        summary, _ = train(config_flag.value, workdir_flag.value)
        print(json.dumps(summary, indent=2))

    app.run(main, argv=argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help") or argv[1] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\ncommands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2)
    command = argv[1]
    rest = [f"{argv[0]} {command}"] + argv[2:]
    if command == "train":
        _train(rest)


if __name__ == "__main__":
    main()
