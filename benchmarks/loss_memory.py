"""XLA's memory plan for the loss and its gradient alone: dense vs blocked (1 device), dense vs ring (8; ring on 2, 4).

Compile-only: `jax.jit(value_and_grad(objective)).lower(...).compile().memory_analysis()` on
abstract inputs ([B, H] query and document embeddings, the pair ids and grades, t and b), so
nothing is allocated and B = 65,536 fits on a laptop. Bytes are per device (XLA plans one SPMD
program). Each cell runs in its own process (the device count is fixed at JAX start-up) under a
time limit; a cell that does not compile in time is reported as skipped.

  python benchmarks/loss_memory.py                 # the whole table, JSON lines, then a JSON list
  python benchmarks/loss_memory.py --cell 8 ring 16384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

H = 768
BATCHES = (4096, 16384, 65536)
CELLS = [(1, "dense"), (1, "blocked"), (8, "dense"), (8, "ring"), (2, "ring"), (4, "ring")]


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def measure(devices: int, impl: str, batch: int, loss: str, block_size: int) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    from bixse_jax import parallel, step
    from bixse_jax.default_config import base_config

    cfg = base_config().loss
    cfg.name, cfg.impl, cfg.block_size = loss, impl, block_size
    mesh = parallel.make_mesh(devices) if devices > 1 else None
    objective = step.make_objective(cfg, mesh)
    rows = parallel.batch_sharding(mesh) if mesh else None
    whole = parallel.replicated(mesh) if mesh else None
    spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    params = {"log_temperature": spec((), jnp.float32, whole), "bias": spec((), jnp.float32, whole)}
    q = d = spec((batch, H), jnp.float32, rows)
    ids = {"query_ids": spec((batch,), jnp.int32, rows), "doc_ids": spec((batch,), jnp.int32, rows),
           "grades": spec((batch,), jnp.float32, rows)}
    fn = jax.value_and_grad(lambda p, q, d, b: objective(p, q, d, b)[0], argnums=(0, 1, 2))
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, q, d, ids).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return {"devices": devices, "impl": impl, "B": batch, "H": H, "loss": loss,
            "block_size": block_size if impl in ("blocked", "ring") else None,
            "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes,
            "total_bytes": mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes,
            "compile_s": round(seconds, 1), "cpu": cpu_model()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cell", nargs=3, metavar=("DEVICES", "IMPL", "B"))
    parser.add_argument("--loss", default="bixse")
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = parser.parse_args()
    if args.cell:
        devices, impl, batch = args.cell
        print(json.dumps(measure(int(devices), impl, int(batch), args.loss, args.block_size)))
        return
    results = []
    for batch in BATCHES:
        for devices, impl in CELLS:
            cmd = [sys.executable, __file__, "--cell", str(devices), impl, str(batch), "--loss", args.loss,
                   "--block_size", str(args.block_size)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
                    "devices": devices, "impl": impl, "B": batch, "skipped": out.stderr.strip()[-300:]}
            except subprocess.TimeoutExpired:
                row = {"devices": devices, "impl": impl, "B": batch,
                       "skipped": f"compile took over {args.timeout} s"}
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
