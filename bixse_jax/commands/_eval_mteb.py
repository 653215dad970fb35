"""`bixse-jax eval --mteb`: local files scored by the `mteb` package through the bixse-jax encoder.

  bixse-jax eval --model PATH --mteb --beir DIR [--split test] [--out FILE] [--mteb-results DIR]
  bixse-jax eval --model PATH --mteb --sts FILE [--instruction-template T] [--mteb-name ORG/NAME]

A BEIR folder becomes an mteb retrieval task, an STS file an STS task (bixse_jax/eval/mteb_model.py),
so the numbers are mteb's own (its search, pytrec_eval, its correlations), on our data and offline;
on the same data they equal `bixse-jax eval`'s. Prints one JSON object (every mteb score of the task,
and its main score), with --out also a file; --mteb-results DIR also keeps mteb's own result files
(DIR/results/NAME/...), as `mteb.evaluate(cache=ResultCache(DIR))` writes them.
"""

from __future__ import annotations

import argparse
import time

from bixse_jax.commands.flags import load_encoder
from bixse_jax.errors import UserError

ONLY_WITH_MTEB = ("instruction_template", "mteb_name", "mteb_results")
NOT_WITH_MTEB = ("rerank", "run_out", "top_k", "rerank_depth")


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mteb")
    group.add_argument("--mteb", action="store_true",
                       help="score --beir (retrieval) or --sts with the mteb package (pip install 'bixse-jax[mteb]')")
    group.add_argument("--instruction-template", default=None, metavar="T",
                       help="queries get the task's instruction in T (it holds {instruction}) instead of "
                            "the query prefix, e.g. $'Instruct: {instruction}\\nQuery: ' (bash's $'' makes the newline)")
    group.add_argument("--mteb-name", default=None, metavar="ORG/NAME",
                       help="model name in mteb's results (default: a hub name as given, else bixse-jax/FOLDER)")
    group.add_argument("--mteb-results", default=None, metavar="DIR", help="also write mteb's result files here")


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.mteb:
        if any(getattr(args, k) is not None for k in ONLY_WITH_MTEB):
            parser.error("--instruction-template, --mteb-name and --mteb-results need --mteb")
        return
    if args.calibration or args.skip_missing_docs or any(getattr(args, k) is not None for k in NOT_WITH_MTEB):
        parser.error("--mteb runs mteb's own task: it takes no --calibration, --rerank, --rerank-depth, "
                     "--top-k, --run-out or --skip-missing-docs")
    if args.instruction_template is not None and "{instruction}" not in args.instruction_template:
        parser.error(f"--instruction-template must hold {{instruction}}, got {args.instruction_template!r}")
    if args.mteb_name is not None and args.mteb_name.count("/") != 1:
        parser.error(f"--mteb-name must read ORGANIZATION/NAME, got {args.mteb_name!r}")


def run(args: argparse.Namespace) -> dict:
    """The result object of `bixse-jax eval --mteb`."""
    try:
        import mteb
    except ImportError as e:
        raise UserError(f"--mteb needs the mteb package: pip install 'bixse-jax[mteb]' ({e})") from None
    from bixse_jax.eval import mteb_model
    start = time.perf_counter()
    data = args.beir or args.sts
    task = mteb_model.beir_task(data, args.split) if args.beir else mteb_model.sts_task(data)  # data first
    enc = load_encoder(args)
    model = mteb_model.MTEBEncoder(enc, name=args.mteb_name or mteb_model.model_name(args.model),
                                   instruction_template=args.instruction_template)
    cache = mteb.ResultCache(args.mteb_results) if args.mteb_results else None
    # "always": a retrained model keeps its name, and must not be answered from an older run's cache.
    result = mteb.evaluate(model, task, cache=cache, overwrite_strategy="always", show_progress_bar=False)
    (row,) = mteb_model.scores(result)
    out = {"model": args.model, "data": data, "task": "retrieval" if args.beir else "sts", "mteb": True,
           "mteb_version": mteb.__version__, "mteb_task": row["task"], "mteb_name": model.mteb_model_meta.name}
    if args.beir:
        out["split"] = args.split
    out.update(main_score=row["main_score"], metrics=row["scores"], model_source=enc.source,
               query_max_len=enc.query_max_len, doc_max_len=enc.doc_max_len)
    if args.mteb_results:
        out["mteb_results"] = args.mteb_results
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out
