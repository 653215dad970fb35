"""XLA's memory plan for the loss and its gradient alone: dense vs blocked (1 device), dense vs ring (8; ring on 2, 4).

Compile-only: `jax.jit(value_and_grad(objective)).lower(...).compile().memory_analysis()` on
abstract inputs ([B, H] query and document embeddings, the pair ids and grades, t and b), so
nothing is allocated and B = 65,536 fits on a laptop. Bytes are per device (XLA plans one SPMD
program). Each cell runs in its own process (the device count is fixed at JAX start-up) under a
time limit; a cell that does not compile in time is reported as skipped.

  python benchmarks/loss_memory.py                 # the whole table, JSON lines, then a JSON list
  python benchmarks/loss_memory.py --cell 8 ring 16384
  python benchmarks/loss_memory.py --whole-step    # the whole cached BERT-base train step, 1 device
  python benchmarks/loss_memory.py --step-cell 65536 --chunk 128   # one batch size of it

`--whole-step`: the real train step (step.make_optimizer / init_state, grad_cache's cached loss fn
over the BiXSE objective, step.make_train_step, AdamW update, old state donated) of a BERT-base
encoder (L=12, d=768, f=3072, vocab 30,522) with query 32 / document 128 tokens, compiled on
abstract inputs: the parameters and optimiser state come from `jax.eval_shape`, so nothing big is
allocated. Options: --chunk (grad-cache sub-batch), --dtype (compute; parameters and optimiser
state stay float32), --remat, --impl (loss.impl), --block_size.
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


def measure_step(batch: int, chunk: int, dtype: str, remat: str, impl: str, block_size: int, loss: str,
                 query_len: int = 32, doc_len: int = 128) -> dict:
    """XLA's plan for one whole cached train step of BERT-base on 1 device (compile only)."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    from bixse_jax import grad_cache, step
    from bixse_jax.default_config import base_config
    from bixse_jax.models.bert import EncoderConfig, init_params
    from bixse_jax.models.encoder import SentenceEncoder

    config = base_config()
    config.loss.name, config.loss.impl, config.loss.block_size = loss, impl, block_size
    config.train.warmup_steps, config.train.num_steps = 10, 1000
    enc_config = EncoderConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, vocab_size=30522, max_position_embeddings=512,
                               hidden_dropout_prob=0.1, dtype=dtype, remat=remat)
    encoder = SentenceEncoder(enc_config)
    tx, schedule = step.make_optimizer(config.train)
    state = jax.eval_shape(lambda key: step.init_state(init_params(enc_config, key), config.loss, tx, seed=0),
                           jax.random.PRNGKey(0))
    embed = step.make_embed_fn(encoder, True)
    objective = step.make_objective(config.loss, None)
    if chunk:
        grad_cache.check_chunk(batch, chunk, None)
        loss_fn = grad_cache.make_cached_loss_fn(embed, objective, chunk=chunk, mesh=None)
    else:
        loss_fn = step.make_loss_fn(encoder, config.loss, None, True)
    train_step = step.make_train_step(loss_fn, tx, schedule)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    batch_spec = {"query_input_ids": i32(batch, query_len), "query_attention_mask": i32(batch, query_len),
                  "doc_input_ids": i32(batch, doc_len), "doc_attention_mask": i32(batch, doc_len),
                  "query_ids": i32(batch), "doc_ids": i32(batch),
                  "grades": jax.ShapeDtypeStruct((batch,), jnp.float32)}
    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch_spec).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return {"whole_step": True, "model": "bert-base", "devices": 1, "B": batch, "chunk": chunk,
            "query_len": query_len, "doc_len": doc_len, "dtype": dtype, "remat": remat, "impl": impl,
            "block_size": block_size, "loss": loss, "state_bytes": state_bytes,
            "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
            "total_bytes": mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes,
            "compile_s": round(seconds, 1), "cpu": cpu_model(), "jax": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cell", nargs=3, metavar=("DEVICES", "IMPL", "B"))
    parser.add_argument("--loss", default="bixse")
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    parser.add_argument("--whole-step", action="store_true", help="the whole cached BERT-base train step")
    parser.add_argument("--step-cell", type=int, metavar="B", help="one --whole-step batch size, in this process")
    parser.add_argument("--chunk", type=int, default=64, help="--whole-step: grad-cache sub-batch (0: off)")
    parser.add_argument("--dtype", default="bfloat16", help="--whole-step: compute dtype")
    parser.add_argument("--remat", default="full", help="--whole-step: none | full | dots")
    parser.add_argument("--impl", default="blocked", help="--whole-step: loss.impl")
    args = parser.parse_args()
    step_args = (args.chunk, args.dtype, args.remat, args.impl, args.block_size, args.loss)
    if args.step_cell:
        print(json.dumps(measure_step(args.step_cell, *step_args)))
        return
    if args.whole_step:
        results = []
        for batch in BATCHES:
            cmd = [sys.executable, __file__, "--step-cell", str(batch), "--chunk", str(args.chunk), "--dtype",
                   args.dtype, "--remat", args.remat, "--impl", args.impl, "--block_size", str(args.block_size),
                   "--loss", args.loss]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
                    "B": batch, "skipped": out.stderr.strip()[-300:]}
            except subprocess.TimeoutExpired:
                row = {"B": batch, "skipped": f"compile took over {args.timeout} s"}
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
        print(json.dumps(results, indent=1))
        return
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
