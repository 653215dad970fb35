"""`bixse-jax mine`: candidates for a labeller (--k), or filtered hard negatives as training data.

  bixse-jax mine --model PATH --beir DIR [--split train] --k 50 --out candidates.jsonl
  bixse-jax mine --model PATH --beir DIR --num-negatives 5 [--range-min 10 --range-max 50]
                 [--max-score 0.8] [--min-score S] [--absolute-margin M] [--relative-margin 0.05]
                 [--sampling top|random --seed 0] [--teacher-scores FILE] [--format jsonl|beir] --out OUT

`--k`: each judged query of the split gets its top-k documents of the whole corpus, one JSON object
per (query, document) line, {"query_id", "doc_id", "query", "document", "rank", "retrieval_score",
"qrels_grade"}, ready for a labeller to grade. The model's similarity is `retrieval_score`,
deliberately not `score`: training reads `score` as a relevance grade in [0, 1], so these lines
cannot be trained on by mistake before a grade is added.

`--num-negatives`: sentence-transformers' `mine_hard_negatives` filters (bixse_jax/eval/mining.py):
a window of the model's ranking, score bounds, an absolute and a relative margin to the query's
lowest positive score, top or random sampling, and the scores of a teacher (`--teacher-scores`: JSONL
of query_id, doc_id, score, such as `bixse-jax label`'s output, or a TREC run of a cross-encoder) in
place of the model's. The output trains as it is: JSONL (each query's positives with score = grade
/ top grade, then its negatives with score 0, kind, rank, retrieval_score, teacher_score,
positive_score; `--config.data.kind=jsonl`) or a BEIR folder (corpus and queries of those pairs,
qrels/SPLIT.tsv with the positives' grades and grade 0 for the negatives; `--config.data.kind=beir`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from bixse_jax.commands.flags import add_model_flags, load_encoder
from bixse_jax.errors import UserError


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_model_flags(parser)
    parser.add_argument("--beir", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    parser.add_argument("--split", default="train", help="whose judged queries to mine for (default: train)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--k", type=int, help="candidates per query, unfiltered, for a labeller")
    mode.add_argument("--num-negatives", type=int, help="hard negatives per query, filtered, as training data")
    parser.add_argument("--range-min", type=int, default=0, help="skip the model's first N non-positive documents")
    parser.add_argument("--range-max", type=int, default=None,
                        help="look no deeper than rank N (default: range-min + num-negatives, x10 with a score filter)")
    parser.add_argument("--max-score", type=float, default=None, help="drop candidates scoring above this")
    parser.add_argument("--min-score", type=float, default=None, help="drop candidates scoring below this")
    parser.add_argument("--absolute-margin", type=float, default=None,
                        help="keep a candidate only if it scores at least this much below the query's lowest positive")
    parser.add_argument("--relative-margin", type=float, default=None,
                        help="... at least this fraction of |positive score| below it (0.05: NV-Retriever's 95%%)")
    parser.add_argument("--sampling", default="top", choices=("top", "random"),
                        help="the best survivors, or a uniform sample of them (default: top)")
    parser.add_argument("--seed", type=int, default=0, help="--sampling random's seed")
    parser.add_argument("--teacher-scores", default=None,
                        help="JSONL (query_id, doc_id, score) or TREC run whose scores the filters read")
    parser.add_argument("--format", default="jsonl", choices=("jsonl", "beir"), dest="fmt",
                        help="--num-negatives output: training JSONL or a BEIR folder (default: jsonl)")
    parser.add_argument("--skip-missing-docs", action="store_true", help="drop judgments of documents without text")
    parser.add_argument("--out", required=True, help="output JSONL (a folder for --format beir)")
    return parser


def main(argv: list[str]) -> None:
    parser = _parser(argv[0])
    args = parser.parse_args(argv[1:])
    if args.k is not None and args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    filtering = (args.fmt != "jsonl", args.teacher_scores, args.range_min, args.range_max, args.max_score,
                 args.min_score, args.absolute_margin, args.relative_margin, args.sampling != "top")
    if args.k is not None and any(v not in (None, False, 0) for v in filtering):
        parser.error("--format beir, --teacher-scores, --sampling and the filters go with --num-negatives, not --k")
    from bixse_jax.data import sources
    queries, corpus, qrels = sources.read_beir_eval(args.beir, args.split, skip_missing_docs=args.skip_missing_docs)
    if args.k is not None:
        return _candidates(args, queries, corpus, qrels)
    from bixse_jax.eval import mining
    filters = mining.Filters(args.num_negatives, args.range_min, args.range_max, args.max_score, args.min_score,
                             args.absolute_margin, args.relative_margin, args.sampling, args.seed)
    filters.check()  # before the model loads
    teacher = mining.read_teacher_scores(args.teacher_scores) if args.teacher_scores else None
    positives = {q: {d: g for d, g in judged.items() if g > 0 and d in corpus} for q, judged in qrels.items()}
    positives = {q: p for q, p in positives.items() if p}
    if not positives:
        raise UserError(f"{args.beir}: no query of split {args.split!r} has a positive (grade > 0) with text")
    enc = load_encoder(args)
    negatives, model_pos, counts, seconds = encode_and_mine(enc, queries, corpus, positives, filters, teacher)
    top = max(g for judged in qrels.values() for g in judged.values())
    mined = {q: [(d, g, model_pos[q][d]) for d, g in positives[q].items()] for q in negatives}  # positives
    write = _write_beir if args.fmt == "beir" else _write_jsonl
    out = write(pathlib.Path(args.out), args.split, queries, corpus, mined, negatives, top, teacher is not None)
    print(json.dumps({"out": str(out), "format": args.fmt, "queries": len(positives),
                      "positives": sum(map(len, positives.values())), "negatives": sum(map(len, negatives.values())),
                      **counts, **seconds, "filters": {**vars(filters), "range_max": filters.window()},
                      "teacher_scores": args.teacher_scores, "model_source": enc.source}, indent=2))


def encode_and_mine(enc, queries, corpus, positives, filters, teacher):
    """Encodes, searches and filters: (negatives, the positives' model scores, filter counts, timings)."""
    import numpy as np

    from bixse_jax.eval import mining
    from bixse_jax.eval.search import top_k_search
    qids, dids = list(positives), list(corpus)
    start = time.perf_counter()
    q = enc.queries([queries[i] for i in qids])
    d = enc.documents([corpus[i] for i in dids])
    encoded = time.perf_counter()
    depth = min(len(dids), filters.window() + max(map(len, positives.values())))
    scores, indices = top_k_search(q, d, depth, mesh=enc.mesh)
    searched = time.perf_counter()
    row = {did: i for i, did in enumerate(dids)}
    model_pos = {qid: {did: float(np.dot(q[r], d[row[did]])) for did in positives[qid]} for r, qid in enumerate(qids)}
    negatives, counts = mining.mine(qids, dids, indices, scores, positives, model_pos, filters, teacher)
    return negatives, model_pos, counts, {"encode_seconds": round(encoded - start, 3),
                                          "search_seconds": round(searched - encoded, 3)}


def _write_jsonl(out, split, queries, corpus, positives, negatives, top, with_teacher) -> pathlib.Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for qid, found in negatives.items():
            base = {"query_id": qid, "query": queries[qid]}
            for did, grade, model_score in positives[qid]:
                f.write(json.dumps({**base, "doc_id": did, "document": corpus[did], "score": grade / top,
                                    "kind": "positive", "retrieval_score": model_score}, ensure_ascii=False) + "\n")
            for n in found:
                row = {**base, "doc_id": n.doc_id, "document": corpus[n.doc_id], "score": 0.0, "kind": "negative",
                       "rank": n.rank, "retrieval_score": n.retrieval_score, "positive_score": n.positive_score}
                if with_teacher:
                    row["teacher_score"] = n.score
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def _write_beir(out, split, queries, corpus, positives, negatives, top, with_teacher) -> pathlib.Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; --format beir writes a new folder")
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    rows = [(qid, did, f"{grade:g}") for qid in negatives for did, grade, _ in positives[qid]]
    rows += [(qid, n.doc_id, "0") for qid, found in negatives.items() for n in found]
    docs = list(dict.fromkeys(did for _, did, _ in rows))
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for did in docs:
            f.write(json.dumps({"_id": did, "title": "", "text": corpus[did]}, ensure_ascii=False) + "\n")
    with (out / "queries.jsonl").open("w", encoding="utf-8") as f:
        for qid in negatives:
            f.write(json.dumps({"_id": qid, "text": queries[qid]}, ensure_ascii=False) + "\n")
    with (out / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows))
    return out


def _candidates(args, queries, corpus, qrels) -> None:
    """--k: the top k of the whole corpus per judged query, unfiltered, with `retrieval_score` only."""
    from bixse_jax.eval import evaluate, run_files
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
