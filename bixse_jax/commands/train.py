"""`bixse-jax train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]`.

Multi-host: add `--jax_distributed` on every host (Cloud TPU needs nothing else); elsewhere also
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

from __future__ import annotations

import difflib
import pathlib
import re
import shlex
import sys
from typing import Any, Iterator

from bixse_jax import errors
from bixse_jax.errors import ConfigError, UserError


def main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    # sys_argv: the overrides are read from this argv, not sys.argv (cli.main may be given one).
    config_flag = config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).",
                                                  lock_config=True, sys_argv=argv)
    workdir_flag = flags.DEFINE_string("workdir", None, "Run folder (local or gs://): checkpoints, metrics.")
    flags.DEFINE_bool("verbose", False, errors.VERBOSE_HELP)
    distributed = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() first.")
    coordinator = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (not on TPU).")
    num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes (not on TPU).")
    process_id = flags.DEFINE_integer("process_id", None, "This process's index (not on TPU).")
    timeout = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for the coordinator.")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(args: list[str]) -> None:
        if len(args) > 1:
            raise UserError(f"unexpected arguments: {' '.join(args[1:])}")
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
        if distributed.value:
            initialize_distributed(coordinator.value, num_processes.value, process_id.value, timeout.value)
        import time

        from bixse_jax import run_report
        from bixse_jax.train import train
        start = time.perf_counter()
        summary, _ = train(config_flag.value, workdir_flag.value, command=shlex.join([*argv[0].split(), *argv[1:]]))
        import jax
        if jax.process_index() == 0:  # the whole summary is a line of WORKDIR/summary.jsonl
            lines = run_report.closing_lines(summary, config_flag.value, total_steps=config_flag.value.train.num_steps,
                                             seconds=time.perf_counter() - start)
            print("\n".join(lines), flush=True)

    app.run(run, argv=argv, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake a one-line UserError (absl prints usage and exits 1).

    `--config.KEY=VALUE` keys are checked against the loaded config first, so an unknown key names
    the closest valid one (ml_collections fails with a traceback); a bad value names the key's type.
    """
    from absl import flags
    expanded = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    config = check_config_overrides(expanded)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = errors.one_line(e)
        match = re.match(r"flag --config\.([\w.]+)=", message)
        if match and config is not None:
            value = _lookup(config, match.group(1))
            if value is not None:
                message += f" (config.{match.group(1)} is of type {type(value).__name__})"
        raise UserError(message) from e


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


# ----------------------------------------------------------------------------
# --config.KEY=VALUE overrides.
# ----------------------------------------------------------------------------

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def config_argument(argv: list[str]) -> str | None:
    """The value of --config in argv (`--config=PATH` or `--config PATH`), or None."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if re.match(r"^--?config=", arg):
            return arg.split("=", 1)[1]
        if re.match(r"^--?config$", arg) and i + 1 < len(argv):
            return argv[i + 1]
    return None


def override_keys(argv: list[str]) -> list[str]:
    """KEY of every --config.KEY[=VALUE] (and --noconfig.KEY) in argv, in order."""
    keys = []
    for arg in argv:
        if arg == "--":
            break
        match = _OVERRIDE.match(arg)
        if match:
            keys.append(match.group(1))
    return keys


def check_config_overrides(argv: list[str]) -> Any:
    """Loads --config's file and checks that every override key exists; returns the config (None if unnamed).

    Raises ConfigError for a missing config file, or an unknown key, naming the closest valid key.
    """
    from absl import flags
    from ml_collections import ConfigDict
    path = config_argument(argv)
    if path is None:
        return None  # absl reports the missing required flag
    file = pathlib.Path(path.split(":", 1)[0])
    if not file.is_file():
        raise ConfigError(f"--config={path}: {file}: no such file")
    config = flags.FLAGS["config"].parser.parse(path)  # the config file's own errors keep their traceback
    if not isinstance(config, ConfigDict):
        return None
    keys = sorted(_flat_keys(config))
    for key in override_keys(argv):
        node, walked = config, []
        for part in key.split("."):
            if not isinstance(node, ConfigDict):
                break  # inside a non-dict value: ml_collections decides
            if part not in node:
                where = f"config.{'.'.join(walked)}" if walked else "the config"
                close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                hint = (f"did you mean --config.{close[0]}?" if close
                        else f"keys of {where}: {', '.join(sorted(node.keys()))}")
                raise ConfigError(f"--config.{key}: {where} has no key {part!r} ({file}); {hint}")
            node = node[part]
            walked.append(part)
    return config


def _flat_keys(config: Any, prefix: str = "") -> Iterator[str]:
    from ml_collections import ConfigDict
    for key, value in config.items():
        yield prefix + key
        if isinstance(value, ConfigDict):
            yield from _flat_keys(value, f"{prefix}{key}.")


def _lookup(config: Any, key: str) -> Any:
    from ml_collections import ConfigDict
    node = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            return None
        node = node[part]
    return node
