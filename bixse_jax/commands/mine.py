"""`bixse-jax mine --model PATH --beir DIR [--split train] --k 50 --out candidates.jsonl`.

Hard-negative mining: each judged query of the split gets its top-k documents of the whole corpus,
written one JSON object per (query, document) line:

  {"query_id", "doc_id", "query", "document", "rank", "retrieval_score", "qrels_grade"}

ready for a labeller to grade. The model's similarity is `retrieval_score`, deliberately not
`score`: training reads `score` as a relevance grade in [0, 1], so these lines cannot be trained
on by mistake before a grade is added. `qrels_grade` is the split's judgment, or null if unjudged.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from bixse_jax.commands.eval import add_model_flags, load_encoder


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_model_flags(parser)
    parser.add_argument("--beir", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    parser.add_argument("--split", default="train", help="whose judged queries to mine for (default: train)")
    parser.add_argument("--k", type=int, required=True, help="candidates per query")
    parser.add_argument("--skip-missing-docs", action="store_true", help="drop judgments of documents without text")
    parser.add_argument("--out", required=True, help="output JSONL")
    args = parser.parse_args(argv[1:])
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")

    from bixse_jax.data import sources
    from bixse_jax.eval import evaluate, run_files

    queries, corpus, qrels = sources.read_beir_eval(args.beir, args.split, skip_missing_docs=args.skip_missing_docs)
    enc = load_encoder(args)
    run = evaluate.retrieve(enc, queries, corpus, args.k)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = 0
    with out.open("w", encoding="utf-8") as f:
        for qid, scores in run.items():
            for rank, (did, score) in enumerate(run_files.ranked(scores), start=1):
                f.write(json.dumps({"query_id": qid, "doc_id": did, "query": queries[qid],
                                    "document": corpus[did], "rank": rank, "retrieval_score": score,
                                    "qrels_grade": qrels[qid].get(did)}, ensure_ascii=False) + "\n")
                lines += 1
    print(json.dumps({"out": str(out), "queries": len(run), "lines": lines, "k": args.k,
                      "model_source": enc.source}))
