"""`bixse-jax data build|lengths`: graded pairs -> TFDS ArrayRecord data set for the grain pipeline.

  bixse-jax data build --kind jsonl|beir|sts --source PATH --out DATA_DIR [--split train]
      [--name NAME] [--tokenizer MODEL --query-prefix TEXT --length-cap 512]
      [--max-grade G --drop-zero-grades --skip-missing-docs]          (beir)
  bixse-jax data lengths --data DATA_DIR/graded_pairs/NAME/1.0.0 --tokenizer MODEL
      [--split train] [--query-prefix TEXT] [--length-cap 512]

`build` writes DATA_DIR/graded_pairs/NAME/1.0.0 (NAME defaults to the source's name) and prints
that folder; train on it with --config.data.kind=arrayrecord --config.data.path=FOLDER. With
--tokenizer (a model folder or name), it also stores the token-length table the pipeline needs
to pick padded lengths; `lengths` adds one later (for another tokenizer or query prefix).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from bixse_jax import errors
from bixse_jax.errors import UserError


def _add_tokenizer_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--tokenizer", required=required, default=None,
                        help="model folder or name whose tokenizer the training run uses")
    parser.add_argument("--query-prefix", default="",
                        help="the run's model.query_prefix (a pair's own instruction wins)")
    parser.add_argument("--length-cap", type=int, default=512,
                        help="lengths are stored up to this many tokens; serves max_len <= it")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build a TFDS ArrayRecord data set from a source")
    build.add_argument("--kind", required=True, choices=("jsonl", "beir", "sts"))
    build.add_argument("--source", required=True, help="JSONL file, BEIR folder or STS .tsv file")
    build.add_argument("--out", required=True, help="TFDS data_dir to write into")
    build.add_argument("--split", default="train", help="split name (beir: also the qrels split read)")
    build.add_argument("--name", default=None, help="data set config name (default: the source's name)")
    build.add_argument("--max-grade", type=float, default=None, help="beir: grade / max_grade")
    build.add_argument("--drop-zero-grades", action="store_true", help="beir: drop grade-0 judgments")
    build.add_argument("--skip-missing-docs", action="store_true",
                       help="beir: drop judgments of documents without text")
    _add_tokenizer_flags(build, required=False)
    errors.add_verbose_flag(build)
    lengths = sub.add_parser("lengths", help="store a token-length table for a tokenizer")
    lengths.add_argument("--data", required=True, help="DATA_DIR/graded_pairs/NAME/1.0.0")
    lengths.add_argument("--split", default="train")
    _add_tokenizer_flags(lengths, required=True)
    errors.add_verbose_flag(lengths)
    return parser


def _load_tokenizer(name_or_path: str):
    from bixse_jax.data.tokenizer import Tokenizer
    from bixse_jax.models.hf_io import resolve_model_dir
    return Tokenizer.from_model_dir(resolve_model_dir(name_or_path))


def main(argv: list[str]) -> None:
    prog = argv[0] if argv else "bixse-jax data"
    args = _parser(prog).parse_args(argv[1:])

    from absl import logging
    logging.set_verbosity(logging.WARNING)  # TFDS logs every file at INFO.
    from bixse_jax.data import tfds_builder
    from bixse_jax.data.grain_pipeline import resolve_dataset_dir
    if args.length_cap < 2:
        raise UserError(f"--length-cap must be >= 2, got {args.length_cap}")
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    start = time.perf_counter()
    if args.action == "build":
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the folder
            folder = tfds_builder.build(
                args.kind, args.source, args.out, name=args.name, split=args.split,
                max_grade=args.max_grade, keep_zero=not args.drop_zero_grades,
                skip_missing_docs=args.skip_missing_docs)
    else:
        folder = resolve_dataset_dir(args.data)
    if tokenizer is not None:
        table = tfds_builder.write_length_table(folder, tokenizer, split=args.split,
                                                query_prefix=args.query_prefix,
                                                cap=args.length_cap)
        print(f"{prog}: token lengths in {table.name}", file=sys.stderr)
    num = len(tfds_builder.open_split(folder, args.split))
    print(f"{prog}: {num} pairs, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(folder)
