"""`bixse-jax eval`: retrieval / re-ranking metrics on a BEIR folder, or correlations on STS.

  bixse-jax eval --model PATH --beir DIR [--split test] [--k 10,100] [--run-out FILE] [--out FILE]
  bixse-jax eval --model PATH --beir DIR --rerank RUNFILE|qrels [--rerank-depth N] ...
  bixse-jax eval --model PATH --sts FILE [--out FILE]
  bixse-jax eval --model PATH --mteb (--beir DIR [--split S] | --sts FILE) [--mteb-results DIR]  (mteb's scores)
  bixse-jax eval --model PATH --calibration (--beir DIR [--split S] | --sts FILE) [--calibration-fit FILE|DIR]
                 [--log-temperature T --bias B] [--plot FILE.png]

PATH is a HF / sentence-transformers folder, a hub name, or a training workdir (its newest
checkpoint); `--dim N` scores a Matryoshka model's first N coordinates. `--rerank qrels` re-ranks each query's judged documents that have text (graded
re-ranking, the TREC-DL 2019 protocol here); `--rerank RUNFILE` re-ranks a TREC run's candidates.
Metrics read the qrels as given, like trec_eval: a judged document without text in corpus.jsonl
cannot be ranked but still counts in the ideal DCG and recall (`judged_without_text` says how many
judgments that is); `--skip-missing-docs` drops such judgments instead, and its numbers are not
comparable with published ones. Prints one JSON object and, with --out, writes it to a file.

`--calibration` scores every judged pair with text (a BEIR split's qrels, grade / max grade; an STS
file's pairs, score / 5) and reports expected calibration error (15 bins) and Brier score of
p = sigmoid(exp(t) cos + b) against the targets (bixse_jax/eval/calibration.py), with t and b the
model's own (a workdir's or an export's) or --log-temperature / --bias; `--calibration-fit` adds
Platt scaling sigmoid(a cos + c) fitted on other judged pairs (an STS file or a BEIR folder, split
--fit-split), the baseline for a model without meaningful t and b; `--plot` draws the reliability diagram.
"""

from __future__ import annotations

import argparse
import pathlib
import time

from bixse_jax.commands import _eval_mteb as eval_mteb
from bixse_jax.commands.flags import add_model_flags, load_encoder, parse_ks, write_json
from bixse_jax.errors import UserError


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--beir", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    data.add_argument("--sts", help="STS Benchmark file (tab-separated)")
    parser.add_argument("--split", default="test", help="qrels split (default: test)")
    parser.add_argument("--k", default="10,100", help="cut-offs for nDCG@k and Recall@k (default: 10,100)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="retrieval depth; MAP is over it (default: max(100, largest --k))")
    parser.add_argument("--rerank", default=None, metavar="RUNFILE|qrels",
                        help="re-rank each query's candidates from a TREC run, or its judged documents")
    parser.add_argument("--rerank-depth", type=int, default=None, help="candidates taken per query from the run")
    parser.add_argument("--skip-missing-docs", action=argparse.BooleanOptionalAction, default=False,
                        help="drop judgments of documents without text from the qrels (default: off, "
                             "trec_eval's convention: they count as relevant documents not ranked)")
    parser.add_argument("--run-out", default=None, help="write the ranking as a TREC run file")
    parser.add_argument("--tag", default="bixse-jax", help="run tag in --run-out")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calibration", action="store_true",
                       help="ECE and Brier score of predicted relevance probabilities on the judged pairs")
    calib.add_argument("--calibration-fit", default=None, metavar="FILE|DIR",
                       help="dev pairs (STS file or BEIR folder) to fit Platt scaling sigmoid(a cos + c) on")
    calib.add_argument("--fit-split", default="dev", help="qrels split of a --calibration-fit BEIR folder (default: dev)")
    calib.add_argument("--log-temperature", type=float, default=None, help="t (default: the model's own)")
    calib.add_argument("--bias", type=float, default=None, help="b (default: the model's own)")
    calib.add_argument("--max-grade", type=float, default=None,
                       help="BEIR grades become grade / max grade (default: the largest grade in the qrels file)")
    calib.add_argument("--plot", default=None, metavar="FILE.png", help="write the reliability diagram here")
    eval_mteb.add_flags(parser)
    return parser


def main(argv: list[str]) -> None:
    parser = _parser(argv[0])
    args = parser.parse_args(argv[1:])
    eval_mteb.check_flags(parser, args)
    if args.mteb:
        return write_json(eval_mteb.run(args), args.out)
    if args.sts and (args.rerank or args.run_out or args.top_k or args.rerank_depth):
        parser.error("--rerank, --rerank-depth, --top-k and --run-out need --beir")
    calibration_only = ("calibration_fit", "log_temperature", "bias", "max_grade", "plot")
    if not args.calibration and any(getattr(args, k) is not None for k in calibration_only):
        parser.error("--calibration-fit, --log-temperature, --bias, --max-grade and --plot need --calibration")
    if args.calibration and (args.rerank or args.run_out):
        parser.error("--calibration scores the judged pairs; it takes no --rerank or --run-out")
    if args.calibration:
        return _calibration(args)
    for name in ("top_k", "rerank_depth"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _evaluate(args)


def _evaluate(args: argparse.Namespace) -> None:
    from bixse_jax.data import sources
    from bixse_jax.eval import evaluate, run_files

    start = time.perf_counter()
    result: dict = {"model": args.model}
    if args.sts:
        pairs = sources.read_sts(args.sts)  # read before the model loads: bad data fails fast
        enc = load_encoder(args)
        result.update(data=args.sts, task="sts", pairs=len(pairs), metrics=evaluate.evaluate_sts(enc, pairs))
    else:
        ks = parse_ks(args.k)
        skip = args.skip_missing_docs
        queries, corpus, qrels = sources.read_beir_eval(args.beir, args.split)  # the qrels as given
        without_text = sources.judged_without_text(qrels, corpus)
        if skip:
            qrels = sources.judged_with_text(qrels, corpus)
            queries = {q: queries[q] for q in qrels}
        result.update(data=args.beir, split=args.split, queries=len(qrels), skip_missing_docs=skip,
                      judged_without_text=without_text)
        if args.rerank:
            if args.rerank == "qrels":
                pools = evaluate.judged_pool(qrels, corpus)
                missing = sum(len(qrels[q]) - len(pools[q]) for q in qrels)
            else:
                pools, missing = evaluate.run_pool(run_files.read_run(args.rerank), corpus, args.rerank_depth)
            enc = load_encoder(args)
            metrics, run = evaluate.evaluate_rerank(enc, queries, corpus, qrels, pools, ks=ks)
            result.update(task="rerank", candidates=args.rerank, candidates_without_text=missing)
        else:
            top_k = args.top_k or max(100, *ks)
            enc = load_encoder(args)
            metrics, run = evaluate.evaluate_retrieval(enc, queries, corpus, qrels, ks=ks, top_k=top_k)
            result.update(task="retrieval", documents=len(corpus), top_k=top_k)
        result["metrics"] = metrics
        if args.run_out:
            run_files.write_run(args.run_out, run, tag=args.tag)
            result["run_file"] = args.run_out
    result.update(model_source=enc.source, query_max_len=enc.query_max_len, doc_max_len=enc.doc_max_len,
                  dim=enc.dim, seconds=round(time.perf_counter() - start, 1))
    write_json(result, args.out)


def _calibration_pairs(path: str, split: str, max_grade: float | None):
    """Judged pairs with text and targets in [0, 1]: an STS file's (score / 5), a BEIR split's (grade /
    max grade, grade-0 judgments kept, judged documents without text left out)."""
    from bixse_jax.data import sources
    if pathlib.Path(path).is_dir():
        return sources.read_beir(path, split, max_grade=max_grade, keep_zero=True, skip_missing_docs=True)
    return sources.read_sts(path)


def _calibration(args: argparse.Namespace) -> None:
    import numpy as np

    from bixse_jax.eval import calibration

    start = time.perf_counter()
    data = args.beir or args.sts
    pairs = _calibration_pairs(data, args.split, args.max_grade)  # bad data fails before the model loads
    fit_pairs = _calibration_pairs(args.calibration_fit, args.fit_split, args.max_grade) if args.calibration_fit else None
    if not pairs or (fit_pairs is not None and not fit_pairs):
        raise UserError(f"no judged pairs with text in {data if not pairs else args.calibration_fit}")
    enc = load_encoder(args)
    t = enc.log_temperature if args.log_temperature is None else args.log_temperature
    b = enc.bias if args.bias is None else args.bias
    if (t is None or b is None) and fit_pairs is None:
        raise UserError(f"{args.model} has no learned t and b: pass --log-temperature and --bias, or "
                        "--calibration-fit DEV_PAIRS for Platt scaling")
    targets = np.array([p.grade for p in pairs])
    scores = calibration.pair_scores(enc, pairs)
    methods, params = {}, {}
    if t is not None and b is not None:
        methods["model"] = calibration.report(calibration.relevance_probability(scores, t, b), targets)
        params["model"] = {"log_temperature": t, "bias": b, "from": "flags" if args.log_temperature is not None
                           or args.bias is not None else "model"}
    if fit_pairs is not None:
        a, c = calibration.fit_platt(calibration.pair_scores(enc, fit_pairs), np.array([p.grade for p in fit_pairs]))
        methods["platt"] = calibration.report(calibration.sigmoid(a * scores + c), targets)
        params["platt"] = {"scale": a, "bias": c, "fit_on": args.calibration_fit, "fit_pairs": len(fit_pairs)}
    result = {"model": args.model, "data": data, "task": "calibration", "pairs": len(pairs),
              "mean_target": float(targets.mean()), "bins": calibration.BINS,
              "metrics": {name: {k: r[k] for k in ("ece", "brier", "mean_probability")} for name, r in methods.items()},
              "parameters": params, "reliability": {name: r["bins"] for name, r in methods.items()}}
    if args.beir:
        result["split"] = args.split
    if args.plot:
        labels = {"model": f"sigmoid(exp(t) cos + b), t={t:.3g}, b={b:.3g}" if t is not None else "",
                  "platt": "Platt: sigmoid(a cos + c) fitted on dev pairs"}
        calibration.plot(args.plot, {labels[k]: r for k, r in methods.items()},
                         f"{enc.source or args.model}\non {data}")
        result["plot"] = args.plot
    result.update(model_source=enc.source, query_max_len=enc.query_max_len, doc_max_len=enc.doc_max_len,
                  seconds=round(time.perf_counter() - start, 1))
    write_json(result, args.out)
