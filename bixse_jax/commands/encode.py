"""`bixse-jax encode --model PATH --input FILE --out FILE.npy [--query] [--dim N] [--max-len N] [--batch-size N]`.

FILE is `.txt` (one text per line) or `.jsonl` (objects with "text" and optional "title", joined
as "title text" like BEIR corpora). Writes a float32 [N, H] array in input order. `--query`
encodes the texts as queries: the model's query prompt is prepended and the query length applies.
`--dim N` keeps each embedding's first N coordinates, back to unit length when the model normalises
(a Matryoshka model, trained with loss.matryoshka_dims, is made to work so): [N, dim].
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from bixse_jax.commands.flags import add_model_flags, check_model_flags, load_encoder
from bixse_jax.data.sources import DataError, parse_json_object, read_lines


def read_texts(path: str | pathlib.Path) -> list[str]:
    """Every line is one text; an empty line or text is an error naming file and line."""
    path = pathlib.Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(path, None, None, f"expected a .txt or .jsonl file, got {path.suffix or 'no suffix'!r}")
    texts = []
    for number, line in read_lines(path, keep_blank=True):
        if not line.strip():
            raise DataError(path, number, None, "empty line (every line must hold one text)")
        texts.append(line if path.suffix == ".txt" else _jsonl_text(path, number, line))
    if not texts:
        raise DataError(path, None, None, "contains no texts")
    return texts


def _jsonl_text(path: pathlib.Path, number: int, line: str) -> str:
    obj = parse_json_object(path, number, line)
    if "text" not in obj:
        raise DataError(path, number, "text", "missing")
    for field in ("title", "text"):
        if not isinstance(obj.get(field, ""), str):
            raise DataError(path, number, field, f"must be a string, got {type(obj[field]).__name__}")
    title, text = obj.get("title", "").strip(), obj["text"]
    joined = f"{title} {text}".strip() if title else text
    if not joined.strip():
        raise DataError(path, number, "text", "must not be empty or whitespace-only")
    return joined


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[1])
    add_model_flags(parser)
    parser.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl (text, title)")
    parser.add_argument("--out", required=True, help="output .npy file, float32 [N, H]")
    parser.add_argument("--query", action="store_true", help="encode as queries (query prompt, query length)")
    args = parser.parse_args(argv[1:])
    check_model_flags(args)
    texts = read_texts(args.input)  # before the model loads: bad input fails fast
    enc = load_encoder(args)  # --dim: its first N coordinates
    emb = enc.queries(texts) if args.query else enc.documents(texts)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:  # exactly this path (np.save on a name would append .npy)
        np.save(f, emb.astype(np.float32))
    print(json.dumps({"out": str(out), "shape": list(emb.shape), "query": args.query, "dim": args.dim,
                      "max_len": enc.query_max_len if args.query else enc.doc_max_len}))
