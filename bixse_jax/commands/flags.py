"""The flags of every command that encodes texts (eval, encode, mine), and their small helpers.

Declared once here so that eval, encode and mine cannot drift apart. What the compute flags mean is
decided in the library (models/compute_policy.py for the matmul dtype and dense implementation,
eval/evaluate.py for loading a model to encode with), not in the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from bixse_jax import errors
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
    parser.add_argument("--dim", type=int, default=None,
                        help="Matryoshka: keep each embedding's first N coordinates, renormalised (default: all)")
    errors.add_verbose_flag(parser)


def check_model_flags(args: argparse.Namespace) -> None:
    """The model flags' errors that need no model: call before reading data, so they fail first."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.dim is not None and args.dim < 1:
        raise UserError(f"--dim must be >= 1, got {args.dim}")


def resolve_matmul_dtype(args: argparse.Namespace) -> str | None:
    """--matmul-dtype resolved (auto: models/compute_policy.py). Call after the device split."""
    from bixse_jax.models import compute_policy
    return compute_policy.resolve_matmul_dtype(args.matmul_dtype, args.dtype, training=False)[0]


def load_encoder(args: argparse.Namespace):
    """The model of `add_model_flags`, loaded for encoding on every core (eval.evaluate.TextEncoder)."""
    from bixse_jax import parallel
    from bixse_jax.eval.evaluate import load_text_encoder
    from bixse_jax.models import compute_policy
    check_model_flags(args)
    parallel.one_cpu_device_per_core()  # on a CPU: every core encodes (JAX_NUM_CPU_DEVICES=1 to opt out)
    matmul_dtype = resolve_matmul_dtype(args)
    dense = compute_policy.resolve_dense_impl(args.dense_impl, args.dtype, matmul_dtype)  # may measure: after the device split
    enc = load_text_encoder(args.model, dtype=args.dtype, matmul_dtype=matmul_dtype, dense_impl=dense,
                            batch_size=args.batch_size, max_len=args.max_len,
                            query_max_len=args.query_max_len, query_prefix=args.query_prefix,
                            pooling=args.pooling, normalize=args.normalize, append_eos=args.append_eos,
                            step=args.step, show_progress=True)
    width = enc.encoder.config.hidden_size
    if args.dim is not None and args.dim > width:
        raise UserError(f"--dim {args.dim} is more than the model's {width} embedding coordinates")
    return dataclasses.replace(enc, dim=args.dim)


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
