"""`bixse-jax train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]`.

Multi-host: add `--jax_distributed` on every host (Cloud TPU needs nothing else); elsewhere also
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).",
                                                  lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "Run folder (local or gs://): checkpoints, metrics.")
    distributed = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() first.")
    coordinator = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (not on TPU).")
    num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes (not on TPU).")
    process_id = flags.DEFINE_integer("process_id", None, "This process's index (not on TPU).")
    timeout = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for the coordinator.")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
        if distributed.value:
            initialize_distributed(coordinator.value, num_processes.value, process_id.value, timeout.value)
        from bixse_jax.train import train
        summary, _ = train(config_flag.value, workdir_flag.value)
        import jax
        if jax.process_index() == 0:
            print(json.dumps(summary, indent=2))

    app.run(run, argv=argv)


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                           timeout_s: int) -> None:
    """jax.distributed.initialize with a bounded wait and an error that names the coordinator."""
    import jax
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need gloo
    if coordinator and process_id not in (None, 0):
        # JAX aborts the whole process (no exception) when registration times out; check first.
        wait_for_coordinator(coordinator, timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    except Exception as e:
        print(f"bixse-jax: could not join the JAX cluster (coordinator {coordinator or 'auto-detected'}, "
              f"process {process_id} of {num_processes}) within {timeout_s} s: {e}", file=sys.stderr)
        sys.exit(1)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls HOST:PORT until it accepts a TCP connection; exits with a clear message after timeout_s."""
    import socket
    import time
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                print(f"bixse-jax: could not join the JAX cluster: coordinator {address} did not answer "
                      f"within {timeout_s} s ({e}); is process 0 running and is the port open?", file=sys.stderr)
                sys.exit(1)
            time.sleep(0.5)
