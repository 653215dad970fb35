"""`bixse-jax export`: a run's checkpoint (or any model folder) as a transformers / sentence-transformers folder.

  bixse-jax export --workdir DIR [--step N] --format hf-flax|sentence-transformers|hf|peft --out DIR [--overwrite]
  bixse-jax export --model PATH --format ... --out DIR      a model folder or hub name, untrained

hf-flax: `FlaxBertModel.from_pretrained(DIR)` (transformers 4.x); sentence-transformers:
`SentenceTransformer(DIR)`; hf: `transformers.AutoModel.from_pretrained(DIR)`. Decoder LLMs (llama, qwen2,
qwen3; last-token pooling) and ModernBERT export as sentence-transformers or hf only. All hold bixse.json with the learned t and b, which
`bixse_jax.load_encoder(DIR)` and `bixse_jax.predict_relevance` use. A LoRA run exports merged (W + alpha / r A B),
or as peft: its adapters alone, for `peft.PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), DIR)`.
Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from bixse_jax import errors


def _parser(prog: str) -> argparse.ArgumentParser:
    from bixse_jax.export import FORMATS
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training run folder (config.json + checkpoints/)")
    source.add_argument("--model", help="HF / sentence-transformers / exported folder, or hub name, to convert")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="output format")
    parser.add_argument("--out", required=True, help="output folder (must be absent or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the export is complete")
    parser.add_argument("--max-shard-size", default="10GB",
                        help="hf-flax: largest msgpack file before sharding, e.g. 500MB, 2GiB (default: 10GB)")
    errors.add_verbose_flag(parser)
    return parser


def main(argv: list[str]) -> None:
    parser = _parser(argv[0])
    args = parser.parse_args(argv[1:])
    if args.model and args.step is not None:
        parser.error("--step needs --workdir")
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only checkpoint folder is read-only
    from bixse_jax import checkpoint, export
    from bixse_jax.models.sentence_model import load_encoder
    model = checkpoint.restore_model(args.workdir, args.step) if args.workdir else load_encoder(args.model)
    out = export.export_model(model, args.out, args.fmt, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(json.dumps({"out": str(out), "format": args.fmt, "files": _listing(out), **model.source,
                      "log_temperature": model.log_temperature, "bias": model.bias}, indent=2))


def _listing(out: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
