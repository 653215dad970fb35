"""`bixse-jax train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]`."""

from __future__ import annotations

import json


def main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).",
                                                  lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, TensorBoard.")
    distributed_flag = flags.DEFINE_bool("jax_distributed", False,
                                         "Call jax.distributed.initialize() first (multi-host runs).")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(args: list[str]) -> None:
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

    app.run(run, argv=argv)
