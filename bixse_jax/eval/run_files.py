"""TREC run files: `qid Q0 docid rank score tag`, one retrieved document per line.

Written ranked like trec_eval reads them (score descending, ties by doc id descending), so the
rank column agrees with the order every metric sees. Reading validates each line and names file
and line on error, since runs from other systems (BM25, SPLADE, ...) come from outside.
"""

from __future__ import annotations

import math
import os
import pathlib

from bixse_jax.data.sources import DataError, read_lines
from bixse_jax.errors import UserError

Run = dict[str, dict[str, float]]  # query id -> doc id -> score

_FIELDS = ("query-id", "Q0", "doc-id", "rank", "score", "tag")


def ranked(scores: dict[str, float]) -> list[tuple[str, float]]:
    """(doc id, score) best first, ties by doc id descending: trec_eval's order."""
    return sorted(scores.items(), key=lambda x: (x[1], x[0]), reverse=True)


def write_run(path: str | os.PathLike, run: Run, tag: str = "bixse-jax") -> pathlib.Path:
    """Writes every query of `run` in its given order; scores with full float precision."""
    if not tag or any(c.isspace() for c in tag):
        raise UserError(f"run tag must be one word, got {tag!r}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for qid, scores in run.items():
            for ident in (qid, *scores):
                if not ident or any(c.isspace() for c in ident):
                    raise UserError(f"ids in a TREC run must be non-empty and without spaces, got {ident!r}")
            for rank, (did, score) in enumerate(ranked(scores), start=1):
                f.write(f"{qid} Q0 {did} {rank} {float(score)!r} {tag}\n")
    return path


def read_run(path: str | os.PathLike) -> Run:
    """Reads a run; every line needs 6 whitespace-separated fields, an integer rank and a finite score.

    A document listed twice for the same query is an error (trec_eval would silently keep one).
    """
    path = pathlib.Path(path)
    run: Run = {}
    for number, text in read_lines(path):
        fields = text.split()
        if len(fields) != len(_FIELDS):
            raise DataError(path, number, None, f"expected 6 fields ({' '.join(_FIELDS)}), "
                            f"got {len(fields)}")
        qid, _, did, rank, score_text, _ = fields
        try:
            int(rank)
        except ValueError:
            raise DataError(path, number, "rank", f"must be an integer, got {rank!r}") from None
        try:
            score = float(score_text)
        except ValueError:
            raise DataError(path, number, "score", f"must be a number, got {score_text!r}") from None
        if not math.isfinite(score):
            raise DataError(path, number, "score", f"must be finite, got {score_text!r}")
        scores = run.setdefault(qid, {})
        if did in scores:
            raise DataError(path, number, "doc-id", f"{did!r} is listed twice for query {qid!r}")
        scores[did] = score
    if not run:
        raise DataError(path, None, None, "contains no run lines")
    return run
