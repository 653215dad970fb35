"""`bixse-jax label`: grade (query, document) pairs with an LLM teacher: the expected grade under its token probabilities.

  bixse-jax label --teacher MODEL.gguf|HF_FOLDER --input candidates.jsonl --out graded.jsonl
  bixse-jax label --teacher http://HOST:PORT/v1 --model NAME --input candidates.jsonl --out graded.jsonl
  bixse-jax label --teacher ... --beir DIR --split test --out graded.jsonl --compare-qrels DIR/qrels/test.tsv
  bixse-jax label --out graded.jsonl --compare-qrels QRELS           (agreement of an existing file only)

Each output row is the input row plus `score` = E[grade] / max grade (ready for `bixse-jax train`),
`grade_probs` (softmax over the grade tokens' logits only), `grade` (argmax) and `teacher`. The
prompt (--prompt FILE with {query} and {document}; default: UMBRELA-style 0-3) is wrapped in the
model's chat template when it has one. Rows already in --out (same query id, doc id, teacher) are
skipped, output is flushed per batch, and SIGTERM / Ctrl-C stop after the current batch, so a rerun
finishes the file. Rows a teacher cannot label go to OUT.failed.jsonl with the reason.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from bixse_jax import errors
from bixse_jax.errors import UserError


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    errors.add_verbose_flag(parser)
    parser.add_argument("--teacher", help="decoder LLM (HF folder or .gguf file), or an OpenAI-compatible "
                        "server's base URL (http[s]://HOST:PORT/v1)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", help="JSONL rows with query, document and optional query_id, doc_id "
                        "(e.g. `bixse-jax mine` output)")
    source.add_argument("--beir", help="instead of --input: every judged pair with text of a BEIR folder's split")
    parser.add_argument("--split", default="test", help="qrels split for --beir (default: test)")
    parser.add_argument("--out", required=True, help="output JSONL (appended to; rows already in it are skipped)")
    parser.add_argument("--prompt", default=None, help="prompt template file with {query} and {document}")
    parser.add_argument("--grades", default="0,1,2,3", help="grades, each one token (default: 0,1,2,3)")
    parser.add_argument("--no-chat-template", action="store_true", help="use the prompt as is, without the "
                        "model's chat template (in-process teacher)")
    parser.add_argument("--teacher-name", default=None, help="name recorded in `teacher` (default: the file or "
                        "folder name, or --model)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per forward pass (in-process, default 16) or rows written per batch (HTTP, "
                        "default 4 x --concurrency)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows handed to the teacher at a time, in "
                        "input order (the in-process teacher sorts each chunk by prompt length)")
    local = parser.add_argument_group("in-process teacher")
    local.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    local.add_argument("--matmul-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                       help="matmul inputs; auto: bfloat16 (float32 accumulation) on a CPU with native bfloat16")
    local.add_argument("--dense-impl", default="xla", choices=("auto", "xla", "mkl"),
                       help="dense layers' matmul on a CPU (see `bixse-jax eval --help`)")
    local.add_argument("--max-len", type=int, default=None, help="most prompt tokens (default: the model's limit)")
    local.add_argument("--max-doc-tokens", type=int, default=384, help="documents are cut to this many tokens")
    local.add_argument("--fsdp", type=int, default=1, help="devices that split the teacher's parameters")
    http = parser.add_argument_group("HTTP teacher")
    http.add_argument("--model", default=None, help="the served model's name")
    http.add_argument("--api", default="chat", choices=("chat", "completions"),
                      help="/v1/chat/completions (logprobs + top_logprobs) or /v1/completions (logprobs)")
    http.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    http.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    http.add_argument("--max-retries", type=int, default=5, help="retries on 429 / 5xx / connection errors")
    http.add_argument("--api-key-env", default="OPENAI_API_KEY",
                      help="environment variable holding the API key (sent as a bearer token, never printed)")
    http.add_argument("--top-logprobs", type=int, default=20, help="alternatives asked per token")
    compare = parser.add_argument_group("agreement with human grades")
    compare.add_argument("--compare-qrels", default=None, help="qrels TSV: agreement of --out's rows with it")
    compare.add_argument("--compare-out", default=None, help="agreement JSON (default: OUT.agreement.json; "
                         "the plot beside it as .png)")
    return parser


def _teacher(args: argparse.Namespace, grades: list[int]):
    from bixse_jax.label import prompts
    template = prompts.load_template(args.prompt)
    if args.teacher.startswith(("http://", "https://")):
        from bixse_jax.label.http_teacher import HttpTeacher
        if not args.model:
            raise UserError("--model is required with an HTTP teacher (the served model's name)")
        return HttpTeacher(args.teacher, args.model, grades=grades, template=template, api=args.api,
                           concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
                           api_key_env=args.api_key_env, top_logprobs=args.top_logprobs,
                           batch_size=args.batch_size, name=args.teacher_name)
    from bixse_jax import parallel
    from bixse_jax.commands.flags import resolve_matmul_dtype
    from bixse_jax.label.jax_teacher import JaxTeacher
    from bixse_jax.models import compute_policy
    parallel.one_cpu_device_per_core()  # on a CPU: every core runs part of each batch
    matmul_dtype = resolve_matmul_dtype(args)
    return JaxTeacher(args.teacher, grades=grades, template=template, use_chat_template=not args.no_chat_template,
                      dtype=args.dtype, matmul_dtype=matmul_dtype,
                      dense_impl=compute_policy.resolve_dense_impl(args.dense_impl, args.dtype, matmul_dtype),
                      batch_size=args.batch_size or 16, max_len=args.max_len, max_doc_tokens=args.max_doc_tokens,
                      mesh=parallel.make_mesh(fsdp=args.fsdp), name=args.teacher_name)


def main(argv: list[str]) -> None:
    parser = _parser(argv[0])
    args = parser.parse_args(argv[1:])
    if args.teacher is None and args.compare_qrels is None:
        parser.error("give --teacher (to label) and/or --compare-qrels (to measure agreement)")
    for flag in ("batch_size", "chunk_size", "concurrency", "max_len", "max_doc_tokens", "fsdp"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    report = {}
    if args.teacher is not None:
        if not (args.input or args.beir):
            parser.error("--teacher needs --input or --beir")
        from bixse_jax.label import grades as grades_lib, rows as rows_lib, run
        grades = grades_lib.parse_grades(args.grades)
        rows = rows_lib.read_candidates(args.input) if args.input else rows_lib.beir_judged_rows(args.beir, args.split)
        teacher = _teacher(args, grades)
        with rows_lib.GracefulStop() as stop, rows_lib.ResumableWriter(args.out) as writer:
            report["label"] = run.label_rows(teacher, rows, writer, stop=stop, chunk_size=args.chunk_size)
        report["label"]["out"] = args.out
    if args.compare_qrels is not None:
        from bixse_jax.label import agreement
        out = pathlib.Path(args.compare_out or f"{args.out}.agreement.json")
        report["agreement"] = agreement.compare_files(args.out, args.compare_qrels, out,
                                                      teacher=args.teacher_name or report.get("label", {}).get("teacher"))
    print(json.dumps(report, indent=2))
