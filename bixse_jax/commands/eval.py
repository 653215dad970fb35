"""`bixse-jax eval`: retrieval / re-ranking metrics on a BEIR folder, or correlations on STS.

  bixse-jax eval --model PATH --beir DIR [--split test] [--k 10,100] [--run-out FILE] [--out FILE]
  bixse-jax eval --model PATH --beir DIR --rerank RUNFILE|qrels [--rerank-depth N] ...
  bixse-jax eval --model PATH --sts FILE [--out FILE]
  bixse-jax eval --model PATH --mteb (--beir DIR [--split S] | --sts FILE) [--mteb-results DIR]  (mteb's scores)
  bixse-jax eval --model PATH --calibration (--beir DIR [--split S] | --sts FILE) [--calibration-fit FILE|DIR]
                 [--log-temperature T --bias B] [--plot FILE.png]

PATH is a HF / sentence-transformers folder, a hub name, or a training workdir (its newest
checkpoint). `--rerank qrels` re-ranks each query's judged documents that have text (graded
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
import json
import pathlib
import time

from bixse_jax import errors
from bixse_jax.commands import _eval_mteb as eval_mteb
from bixse_jax.errors import UserError


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every command that encodes texts shares."""
    parser.add_argument("--model", required=True,
                        help="HF / sentence-transformers folder, hub name, or training workdir")
    parser.add_argument("--max-len", type=int, default=None,
                        help="token limit (default: the model's max_seq_length, or a workdir's training lengths)")
    parser.add_argument("--query-max-len", type=int, default=None, help="token limit for queries (default: --max-len)")
    parser.add_argument("--query-prefix", default=None,
                        help="text prepended to queries (default: the model's query prompt / the run's query_prefix)")
    parser.add_argument("--pooling", default=None, choices=("mean", "cls", "last"),
                        help="token states -> one vector (default: the model's own; mean for BERT-family "
                             "encoders, last-token for decoder LLMs)")
    parser.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                        help="L2-normalise embeddings (default: the model's own setting; on for plain folders)")
    parser.add_argument("--append-eos", action="store_true",
                        help="put the eos token after every text (last-token pooling of a decoder whose tokenizer "
                             "adds none; a model folder, not a workdir, which keeps its training setting)")
    parser.add_argument("--batch-size", type=int, default=128, help="texts per encoder call, over all devices")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--matmul-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="dense and attention matmul inputs: bfloat16 with float32 --dtype keeps float32 "
                             "accumulation and activations (1.7x faster on a CPU with AMX: docs/benchmarks.md); "
                             "auto (default): bfloat16 on a CPU with native bfloat16, else --dtype")
    parser.add_argument("--dense-impl", default="auto", choices=("auto", "xla", "mkl"),
                        help="float32 dense matmuls on a CPU: mkl (Intel MKL, pip install 'bixse-jax[mkl]'; "
                             "1.4x faster on an Intel Xeon: docs/benchmarks.md) or xla; auto: whichever a short "
                             "measurement on this host finds faster (cached per host), xla where MKL cannot run")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: newest)")
    errors.add_verbose_flag(parser)


def resolve_matmul_dtype(args: argparse.Namespace) -> str | None:
    """--matmul-dtype resolved (auto: models/compute_policy.py). Call after the device split."""
    from bixse_jax.models import compute_policy
    return compute_policy.resolve_matmul_dtype(args.matmul_dtype, args.dtype, training=False)[0]


def dense_impl(choice: str, dtype: str, matmul_dtype: str | None) -> str:
    """--dense-impl resolved: "auto" is "mkl" for float32 matmuls on a CPU where MKL can run and is
    faster than XLA's dots (`cpu_blas.faster_impl`: measured once per host, cached), else "xla".

    Call after `parallel.one_cpu_device_per_core()`: measuring starts JAX's CPU backend."""
    import jax

    from bixse_jax.models import cpu_blas
    float32 = dtype == "float32" and matmul_dtype in (None, "float32")
    if choice == "auto":
        if not float32 or jax.default_backend() != "cpu" or not cpu_blas.available():
            return "xla"
        return cpu_blas.faster_impl()["choice"]
    if choice == "mkl":
        if not float32:
            raise UserError(f"--dense-impl mkl multiplies in float32; got --dtype {dtype} --matmul-dtype {matmul_dtype}")
        reason = cpu_blas.unavailable_reason()
        if reason:
            raise UserError(f"--dense-impl mkl: {reason}")
    return choice


def load_encoder(args: argparse.Namespace):
    from bixse_jax import parallel
    from bixse_jax.eval.evaluate import load_text_encoder
    parallel.one_cpu_device_per_core()  # on a CPU: every core encodes (JAX_NUM_CPU_DEVICES=1 to opt out)
    matmul_dtype = resolve_matmul_dtype(args)
    dense = dense_impl(args.dense_impl, args.dtype, matmul_dtype)  # may measure: after the device split
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    return load_text_encoder(args.model, dtype=args.dtype, matmul_dtype=matmul_dtype, dense_impl=dense,
                             batch_size=args.batch_size, max_len=args.max_len,
                             query_max_len=args.query_max_len, query_prefix=args.query_prefix,
                             pooling=args.pooling, normalize=args.normalize, append_eos=args.append_eos,
                             step=args.step, show_progress=True)


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise UserError(f"--k must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--k values must be >= 1, got {text!r}")
    return ks


def write_json(obj: dict, out: str | None) -> None:
    text = json.dumps(obj, indent=2)
    print(text)
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


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
        return write_json(eval_mteb.run(args, load_encoder), args.out)
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
                  seconds=round(time.perf_counter() - start, 1))
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
