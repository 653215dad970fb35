"""Padding waste of length bucketing vs a fixed maximum length, on SciFact, with MiniLM's tokenizer.

A batch is padded to the smallest bucket (default 16, 32, 64, 128, 256, 512) that holds its longest
text, capped at the side's maximum length; the alternative pads every batch to the maximum. Waste
= padded positions / all positions. Two draws of 64-pair batches:

  * `pairs`: SciFact train qrels through the real PairBatcher (what `bixse-jax train` feeds);
  * `random_docs`: random batches of 64 corpus documents (title + " " + text).

`--time-steps` also times the MiniLM-L6 train step (benchmarks/train_throughput.py, float32, this
machine) at every (query, document) bucket shape that occurs and at the fixed shape, and reports
effective (non-pad) tokens/s for both.

  python benchmarks/padding_waste.py [--data ../shared/data/scifact] [--time-steps] [--out waste.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bixse_jax.data.batching import PairBatcher, bucket_length  # noqa: E402
from bixse_jax.data.tokenizer import Tokenizer  # noqa: E402
from bixse_jax.data.sources import read_beir, read_beir_eval  # noqa: E402
from bixse_jax.default_config import MINILM, base_config  # noqa: E402
from bixse_jax.models.hf_io import resolve_model_dir  # noqa: E402

DEFAULT_BUCKETS = tuple(base_config().data.buckets)


def _side(real: list[int], bucketed: list[int], fixed: int, shapes: list[int]) -> dict[str, Any]:
    """real / bucketed: tokens and positions per batch; fixed: positions of a batch at the maximum length."""
    real_total, padded_total, fixed_total = sum(real), sum(bucketed), fixed * len(real)
    return {
        "real_tokens_per_batch": round(real_total / len(real), 1),
        "bucketed_waste": round(1 - real_total / padded_total, 4),
        "fixed_waste": round(1 - real_total / fixed_total, 4),
        "bucketed_over_fixed_positions": round(padded_total / fixed_total, 4),
        "bucket_histogram": dict(sorted(collections.Counter(shapes).items())),
    }


def pair_batches(folder: pathlib.Path, tokenizer: Tokenizer, batch: int, query_max_len: int, doc_max_len: int,
                 epochs: int, seed: int) -> tuple[dict[str, Any], collections.Counter]:
    """Waste of PairBatcher's batches over `epochs` epochs of the train qrels; and the shapes seen."""
    pairs = read_beir(folder, "train")
    batcher = PairBatcher(pairs, tokenizer, global_batch_size=batch, query_max_len=query_max_len,
                          doc_max_len=doc_max_len, buckets=DEFAULT_BUCKETS, seed=seed, process_index=0,
                          process_count=1)
    sides = {"query": ([], [], []), "doc": ([], [], [])}
    shapes: collections.Counter = collections.Counter()
    for step in range(epochs * batcher.steps_per_epoch):
        b = batcher.batch(step)
        for side in sides:
            mask = b[f"{side}_attention_mask"]
            real, padded, widths = sides[side]
            real.append(int(mask.sum()))
            padded.append(int(mask.size))
            widths.append(int(mask.shape[1]))
        shapes[(b["query_attention_mask"].shape[1], b["doc_attention_mask"].shape[1])] += 1
    result = {"pairs": len(pairs), "batches": sum(shapes.values()), "batch_size": batch, "seed": seed,
              "query_max_len": query_max_len, "doc_max_len": doc_max_len}
    for side, fixed in (("query", query_max_len), ("doc", doc_max_len)):
        real, padded, widths = sides[side]
        result[side] = _side(real, padded, fixed * batch, widths)
    real = sum(map(sum, (sides["query"][0], sides["doc"][0])))
    padded = sum(map(sum, (sides["query"][1], sides["doc"][1])))
    fixed = result["batches"] * batch * (query_max_len + doc_max_len)
    result["both_sides"] = {"bucketed_waste": round(1 - real / padded, 4), "fixed_waste": round(1 - real / fixed, 4)}
    return result, shapes


def random_doc_batches(folder: pathlib.Path, tokenizer: Tokenizer, batch: int, max_len: int, num_batches: int,
                       seed: int) -> dict[str, Any]:
    """Waste of random 64-document batches from the whole corpus, and its length distribution."""
    texts = list(read_beir_eval(folder, "test")[1].values())  # the whole corpus, title + " " + text
    lengths = np.asarray([len(t) for t in tokenizer.encode(texts, max_len)])
    rng = np.random.default_rng(seed)
    real, padded, widths = [], [], []
    for _ in range(num_batches):
        rows = lengths[rng.choice(len(lengths), size=batch, replace=False)]
        width = bucket_length(int(rows.max()), DEFAULT_BUCKETS, max_len)
        real.append(int(rows.sum()))
        padded.append(width * batch)
        widths.append(width)
    return {"documents": len(texts), "batches": num_batches, "batch_size": batch, "max_len": max_len,
            "seed": seed, "mean_tokens": round(float(lengths.mean()), 1),
            "median_tokens": float(np.median(lengths)), "truncated_fraction": round(float((lengths >= max_len).mean()), 4),
            "doc": _side(real, padded, max_len * batch, widths)}


def time_shapes(shapes: collections.Counter, real_tokens: float, batch: int, fixed: tuple[int, int],
                steps: int) -> dict[str, Any]:
    """MiniLM-L6 step time at every bucket shape seen (weighted by frequency) and at the fixed shape."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import Setting, run_guarded

    def step_s(q: int, d: int) -> float:
        record = run_guarded(Setting("minilm-l6", batch, dtype="float32", query_len=q, doc_len=d,
                                     steps=steps, repeats=1, warmup=1))
        if "error" in record:
            raise RuntimeError(f"timing ({q}, {d}) failed: {record['message']}")
        return record["step_s_mean"]

    timed = {shape: step_s(*shape) for shape in sorted(set(shapes) | {fixed})}
    bucketed_s = sum(timed[s] * n for s, n in shapes.items()) / sum(shapes.values())
    return {
        "model": "minilm-l6 (random init), float32, this machine's CPU",
        "step_s_by_shape": {f"{q}x{d}": round(t, 3) for (q, d), t in timed.items()},
        "bucketed_mean_step_s": round(bucketed_s, 3),
        "fixed_step_s": round(timed[fixed], 3),
        "effective_tokens_per_s_bucketed": round(real_tokens / bucketed_s, 1),
        "effective_tokens_per_s_fixed": round(real_tokens / timed[fixed], 1),
        "speedup": round(timed[fixed] / bucketed_s, 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=REPO.parent / "shared" / "data" / "scifact")
    p.add_argument("--model", default=MINILM, help="folder or name whose tokenizer to use")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--query-max-len", type=int, default=64, help="configs/paper/minilm.py:scifact uses 64")
    p.add_argument("--doc-max-len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=20, help="epochs of train-qrels batches")
    p.add_argument("--random-batches", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-steps", action="store_true", help="also time MiniLM-L6 steps at the shapes seen (slow on CPU)")
    p.add_argument("--timed-steps", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if not (args.data / "corpus.jsonl").is_file():
        raise SystemExit(f"{args.data}: no corpus.jsonl (pass --data FOLDER with SciFact in BEIR layout)")

    tokenizer = Tokenizer.from_model_dir(resolve_model_dir(args.model))
    pairs, shapes = pair_batches(args.data, tokenizer, args.batch, args.query_max_len, args.doc_max_len,
                                 args.epochs, args.seed)
    result = {"data": str(args.data), "tokenizer": args.model, "buckets": list(DEFAULT_BUCKETS), "pairs": pairs,
              "random_docs": random_doc_batches(args.data, tokenizer, args.batch, args.doc_max_len,
                                                args.random_batches, args.seed)}
    if args.time_steps:
        real = pairs["query"]["real_tokens_per_batch"] + pairs["doc"]["real_tokens_per_batch"]
        result["timing"] = time_shapes(shapes, real, args.batch, (args.query_max_len, args.doc_max_len),
                                       args.timed_steps)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
