"""bixse-jax's CPU train step against torch + transformers on the same host, in one command.

For each model shape: our step (`train_throughput.py`'s, in its own process, `--matmul-dtype`
bfloat16 over float32 compute unless told otherwise) and the peer `../shared/bench/peer_cpu_train.py`
(torch, bf16 autocast and float32), taking turns `--rounds` times so that a change in the host's
load hits both, then one JSON line per model with each side's best pairs/s and the ratio ours / the
peer's fastest dtype. First a matmul probe: the host's bfloat16 rate (a 2048^3 product, JAX's and
torch's), and at the end our step's matmul FLOP rate as a fraction of the faster probe.

The peer script knows `smollm2-135m` and `minilm-l6`; `bert-base` runs its `minilm-l6` path with
BertConfig's sizes replaced by BERT-base's (hidden 768, 12 layers, 12 heads, 3,072), nothing else changed.

Run on an idle machine: with two cores shared, torch's threads degrade far more than XLA's, so the
load average at the start is printed, and a ratio taken under load says nothing.

  python benchmarks/cpu_vs_peer.py --models smollm2-135m,minilm-l6,bert-base --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import Setting, flops_per_step, run_isolated  # noqa: E402
from bixse_jax.models.cpu_blas import cpu_model  # noqa: E402

PEER = REPO.parent / "shared" / "bench" / "peer_cpu_train.py"
PEER_MODEL = {"smollm2-135m": "smollm2-135m", "minilm-l6": "minilm-l6", "bert-base": "minilm-l6"}
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)

# The peer under BERT-base's sizes: its BertConfig call with those four keys replaced.
_PEER_SHIM = """
import runpy, sys, transformers
sizes = {sizes!r}
original = transformers.BertConfig
transformers.BertConfig = lambda **kw: original(**{{**kw, **sizes}})
sys.argv = [{peer!r}] + sys.argv[1:]
runpy.run_path({peer!r}, run_name="__main__")
"""


def probe(size: int = 2048, repeats: int = 5) -> dict:
    """Best-of-`repeats` bfloat16 matmul rate of JAX (float32 accumulation) and torch on this host."""
    out = {}
    code_jax = f"""
import time, jax, jax.numpy as jnp
a = jnp.ones(({size}, {size}), jnp.bfloat16)
f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
f(a, a).block_until_ready(); best = 1e9
for _ in range({repeats}):
    t = time.perf_counter(); f(a, a).block_until_ready(); best = min(best, time.perf_counter() - t)
print(2 * {size} ** 3 / best / 1e9)
"""
    code_torch = f"""
import time, torch
a = torch.ones({size}, {size}, dtype=torch.bfloat16)
a @ a; best = 1e9
for _ in range({repeats}):
    t = time.perf_counter(); a @ a; best = min(best, time.perf_counter() - t)
print(2 * {size} ** 3 / best / 1e9)
"""
    for name, code in (("jax_bf16_gflops", code_jax), ("torch_bf16_gflops", code_torch)):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out[name] = round(float(done.stdout.split()[-1]), 1) if done.returncode == 0 else None
    return out


def run_peer(model: str, dtype: str, batch: int, qlen: int, dlen: int, steps: int) -> dict:
    args = ["--model", PEER_MODEL[model], "--batch", str(batch), "--qlen", str(qlen), "--dlen", str(dlen),
            "--dtype", dtype, "--steps", str(steps), "--warmup", "1"]
    if model == "bert-base":
        cmd = [sys.executable, "-c", _PEER_SHIM.format(sizes=BERT_BASE, peer=str(PEER))] + args
    else:
        cmd = [sys.executable, str(PEER)] + args
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"peer exited with {done.returncode}", "message": (done.stderr or done.stdout)[-800:]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,minilm-l6,bert-base")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--dtype", default="float32", help="our compute dtype")
    p.add_argument("--matmul-dtype", default="bfloat16", help="our matmul inputs (none: --dtype)")
    p.add_argument("--peer-dtypes", default="bf16,fp32")
    p.add_argument("--rounds", type=int, default=2, help="turns of ours then the peer's")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after 1 warm-up)")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out is not None:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    if not PEER.is_file():
        raise SystemExit(f"{PEER} is absent: the peer comes with the shared folder beside the checkout")
    rates = probe()
    emit({"view": "host", "cpu": cpu_model(), "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
          **rates})
    best_rate = max((r for r in rates.values() if r), default=None)
    matmul = None if args.matmul_dtype == "none" else args.matmul_dtype
    for model in args.models.split(","):
        ours, peer = [], {d: [] for d in args.peer_dtypes.split(",")}
        for _ in range(args.rounds):
            s = Setting(model, args.batch, dtype=args.dtype, matmul_dtype=matmul, dropout=0.0,
                        query_len=args.query_len, doc_len=args.doc_len, steps=args.steps, repeats=1, warmup=1)
            record = run_isolated(s, timeout_s=1800)
            emit({"view": "ours", **record})
            if "pairs_per_s" in record:
                ours.append(record["pairs_per_s"])
            for dtype in peer:
                record = run_peer(model, dtype, args.batch, args.query_len, args.doc_len, args.steps)
                emit({"view": "peer", "shape": model, **record})
                if "pairs_s" in record:
                    peer[dtype].append(record["pairs_s"])
        best_peer = {d: max(v) for d, v in peer.items() if v}
        summary = {"view": "ratio", "model": model, "batch": args.batch, "ours_pairs_s": max(ours) if ours else None,
                   **{f"peer_{d}_pairs_s": v for d, v in best_peer.items()}, "load_average_at_end": os.getloadavg()}
        if ours and best_peer:
            fastest = max(best_peer, key=best_peer.get)
            summary.update(peer_fastest_dtype=fastest, ratio_vs_peer_fastest=round(max(ours) / best_peer[fastest], 3))
            matmul_tflops = flops_per_step(model, args.batch, args.query_len, args.doc_len) * max(ours) / args.batch / 1e12
            summary["ours_matmul_tflops"] = round(matmul_tflops, 3)
            if best_rate:
                summary["fraction_of_probe_bf16_rate"] = round(matmul_tflops * 1e3 / best_rate, 3)
        emit(summary)


if __name__ == "__main__":
    main()
