"""Where a CPU train step's time goes: XLA's dots on and off the fast path, and the step's parts timed.

Two views of the same step as `train_throughput.py` builds it (random init, random ids, BiXSE, AdamW):

1. **Dots in the compiled step.** Every `dot` of XLA's optimised HLO, with its FLOPs, its operand
   and output types, and whether XLA runs it in a YNNPACK fusion (the bfloat16 fast path on a CPU
   with AMX) or in its own float32 dot emitter; MKL's custom calls (models/cpu_blas.py) are
   counted apart. One JSON line per (path, dtypes) group, largest first.
2. **The parts, timed.** The forward pass of both sides alone, the forward and backward pass
   (`jax.value_and_grad` of the loss), the AdamW update alone on a gradient-shaped tree, and the
   whole step; min over `--repeats`.
3. **With `--trace`, the ops, timed.** One step under `jax.profiler` with XLA's per-op trace events
   (`--xla_cpu_enable_xprof_traceme`), summed by kind of op (ynn_fusion, ffi_call, convert
   fusions, ...). The sum exceeds the step's wall time where XLA runs two ops at once.

  python benchmarks/step_breakdown.py --model smollm2-135m --batch 32 --dtype float32 --matmul-dtype none
  python benchmarks/step_breakdown.py --model smollm2-135m --batch 32 --dtype float32 --matmul-dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import math
import pathlib
import re
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import DECODERS, MODELS, flops_per_step  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+(\w[\w-]*)\((.*?)\)(.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")


def dot_census(hlo: str) -> list[dict]:
    """Dots of an optimised HLO module grouped by (path, lhs, rhs, out dtypes), with their GFLOPs."""
    shapes: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    dots: list[tuple[str, str, str, str]] = []  # (computation, lhs name, rhs name, line)
    fast_comps: set[str] = set()
    custom: collections.Counter = collections.Counter()
    comp = ""
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            comp = m.group(1)
            shapes.setdefault(comp, {})
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, op, operands, rest = m.groups()
        shapes[comp][name] = (dtype, tuple(int(d) for d in dims.split(",") if d))
        if op == "fusion" and "__ynn_fusion" in rest:
            called = re.search(r"calls=%(\S+?)[,\s]", rest + " ")
            if called:
                fast_comps.add(called.group(1))
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            custom[target.group(1) if target else "?"] += 1
        if op == "dot":
            names = re.findall(r"%([\w.\-]+)", operands)
            dots.append((comp, names[0], names[1], line))
    groups: dict[tuple, dict] = {}
    for comp, lhs, rhs, line in dots:
        out_dtype, out_shape = _INSTR.match(line).group(2), shapes[comp][_INSTR.match(line).group(1)][1]
        lhs_dtype, lhs_shape = shapes[comp].get(lhs, ("?", ()))
        rhs_dtype = shapes[comp].get(rhs, ("?", ()))[0]
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        k = math.prod(lhs_shape[int(i)] for i in contract.group(1).split(",") if i) if contract else 1
        key = ("ynn (fast)" if comp in fast_comps else "xla dot (slow)", lhs_dtype, rhs_dtype, out_dtype)
        g = groups.setdefault(key, {"path": key[0], "lhs": key[1], "rhs": key[2], "out": key[3], "dots": 0,
                                    "gflop": 0.0})
        g["dots"] += 1
        g["gflop"] += 2 * math.prod(out_shape) * k / 1e9
    out = sorted(groups.values(), key=lambda g: -g["gflop"])
    for g in out:
        g["gflop"] = round(g["gflop"], 2)
    if custom:
        out.append({"path": "custom calls", **dict(custom)})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help=f"{sorted(MODELS)} or {sorted(DECODERS)}")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--matmul-dtype", default="bfloat16", help="none | bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trace", action="store_true", help="also sum one step's XLA op times by kind of op")
    args = p.parse_args(argv)
    if args.trace:  # before jax starts: XLA reads its flags once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

    import jax
    import jax.numpy as jnp

    from bixse_jax import step as step_lib
    from bixse_jax.default_config import base_config
    from bixse_jax.models import architectures
    from bixse_jax.models.bert import EncoderConfig
    from bixse_jax.models.decoder import DecoderConfig
    from bixse_jax.models.encoder import SentenceEncoder

    matmul = None if args.matmul_dtype == "none" else args.matmul_dtype
    if args.model in DECODERS:
        enc_config = DecoderConfig(**DECODERS[args.model], dtype=args.dtype, matmul_dtype=matmul)
        encoder = SentenceEncoder(enc_config, pooling="last")
    else:
        enc_config = EncoderConfig(**MODELS[args.model], hidden_dropout_prob=0.0, dtype=args.dtype,
                                   matmul_dtype=matmul)
        encoder = SentenceEncoder(enc_config)
    config = base_config()
    tx, schedule = step_lib.make_optimizer(config.train)
    state = jax.jit(lambda k: step_lib.init_state(architectures.init_params(enc_config, k), config.loss, tx,
                                                   seed=0))(jax.random.PRNGKey(0))
    kq, kd = jax.random.split(jax.random.PRNGKey(1))
    q = jax.random.randint(kq, (args.batch, args.query_len), 5, enc_config.vocab_size, jnp.int32)
    d = jax.random.randint(kd, (args.batch, args.doc_len), 5, enc_config.vocab_size, jnp.int32)
    batch = {"query_input_ids": q, "query_attention_mask": jnp.ones_like(q), "doc_input_ids": d,
             "doc_attention_mask": jnp.ones_like(d), "query_ids": jnp.arange(args.batch, dtype=jnp.int32),
             "doc_ids": jnp.arange(args.batch, dtype=jnp.int32), "grades": jnp.full((args.batch,), 0.8)}
    loss_fn = step_lib.make_loss_fn(encoder, config.loss, None, False)
    train_step = jax.jit(step_lib.make_train_step(loss_fn, tx, schedule))

    def forward(params, batch):
        enc = params["encoder"]
        return (encoder(enc, batch["query_input_ids"], batch["query_attention_mask"]),
                encoder(enc, batch["doc_input_ids"], batch["doc_attention_mask"]))

    grads_of = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, jax.random.PRNGKey(0))[0]))
    grads = grads_of(state.params, batch)[1]
    update = jax.jit(lambda g, o, p: tx.update(g, o, p))

    def best(fn, *a) -> float:
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - tick)
        return round(min(times), 3)

    base = {"model": args.model, "batch": args.batch, "query_len": args.query_len, "doc_len": args.doc_len,
            "dtype": args.dtype, "matmul_dtype": matmul, "jax": jax.__version__}
    hlo = train_step.lower(state, batch).compile().as_text()
    for group in dot_census(hlo):
        print(json.dumps({**base, "view": "dots", **group}), flush=True)
    parts = {"forward_s": best(jax.jit(forward), state.params, batch),
             "forward_backward_s": best(grads_of, state.params, batch),
             "adamw_update_s": best(update, grads, state.opt_state, state.params),
             "step_s": best(train_step, state, batch)}
    flops = flops_per_step(args.model, args.batch, args.query_len, args.doc_len)
    print(json.dumps({**base, "view": "parts", **parts, "step_tflops": round(flops / parts["step_s"] / 1e12, 3)}),
          flush=True)
    if args.trace:
        print(json.dumps({**base, "view": "ops", **op_times(lambda: train_step(state, batch))}), flush=True)


def op_times(run_step, top: int = 12) -> dict:
    """Seconds of XLA op time in one traced call of `run_step`, summed by op kind (name less its .N)."""
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        tick = time.perf_counter()
        jax.block_until_ready(run_step())
        wall = time.perf_counter() - tick
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(sorted(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kinds: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(("ThunkExecutor", "$", "end:", "SlinkyThreadPool", "Pjit",
                                                         "CommonPjRt")):
            kinds[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0) / 1e6
    return {"wall_s": round(wall, 3), "op_s_total": round(sum(kinds.values()), 3),
            **{k: round(v, 3) for k, v in kinds.most_common(top)}}


if __name__ == "__main__":
    main()
