"""Hard negatives from exact retrieval, with sentence-transformers' `mine_hard_negatives` filters.

For each query with a judged positive (grade > 0), the model's ranking of the corpus less its
positives is a list of candidates, rank 1 first. A candidate may become a negative when

  range_min < rank <= range_max                          a window of the model's ranking
  min_score <= s <= max_score                             s: the teacher's score if given, else the model's
  s <= p - absolute_margin                                p: the query's lowest positive score (the same
  s <= p - |p| * relative_margin                             scorer), as sentence-transformers uses
  (teacher given) the teacher scored the pair

and `num_negatives` of the survivors are kept: the highest-scoring (`top`) or a seeded uniform
sample (`random`), listed best first. Judged documents of grade 0 are candidates like unjudged ones
(known negatives). Unlike sentence-transformers, whose range counts the candidates that survive
the score filters, the window here is over the model's ranking itself, so a negative's `rank`
says where the model put it.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Iterator

import numpy as np

from bixse_jax.data.sources import DataError, parse_json_object, read_lines
from bixse_jax.errors import UserError

Scores = dict[str, dict[str, float]]  # query id -> doc id -> score
SAMPLING = ("top", "random")


@dataclasses.dataclass(frozen=True)
class Filters:
    num_negatives: int = 3
    range_min: int = 0
    range_max: int | None = None  # None: sentence-transformers' default (below)
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling: str = "top"
    seed: int = 0

    def window(self) -> int:
        """range_max, defaulting as sentence-transformers does: room for 10x the negatives when scores filter."""
        if self.range_max is not None:
            return self.range_max
        filtered = any(v is not None for v in (self.max_score, self.min_score, self.absolute_margin,
                                               self.relative_margin))
        return self.range_min + self.num_negatives * (10 if filtered else 1)

    def check(self) -> None:
        if self.num_negatives < 1:
            raise UserError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.range_min < 0:
            raise UserError(f"range_min must be >= 0, got {self.range_min}")
        if self.window() - self.range_min < self.num_negatives:
            raise UserError(f"range_min {self.range_min} and range_max {self.window()} leave fewer than "
                            f"num_negatives = {self.num_negatives} candidates")
        if self.sampling not in SAMPLING:
            raise UserError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        for name in ("max_score", "min_score", "absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value}")


@dataclasses.dataclass(frozen=True)
class Negative:
    query_id: str
    doc_id: str
    rank: int  # 1-based, in the model's ranking of the corpus less the query's positives
    retrieval_score: float  # the model's
    score: float  # what the filters read: the teacher's, else retrieval_score
    positive_score: float | None  # p, the query's lowest positive score (the same scorer)


def mine(query_ids: list[str], doc_ids: list[str], ranked: np.ndarray, ranked_scores: np.ndarray,
         positives: dict[str, dict[str, float]], positive_model_scores: Scores, filters: Filters,
         teacher: Scores | None = None) -> tuple[dict[str, list[Negative]], dict[str, int]]:
    """({query id: its negatives, best first}, counts of what each filter removed).

    ranked [Q, K] / ranked_scores [Q, K]: each query's top-K corpus indices and model scores, best
    first (K >= window + the query's positive count); positives: query id -> {doc id: grade > 0}.
    """
    filters.check()
    rng = np.random.default_rng(filters.seed)
    skipped = dict.fromkeys(("range", "no_teacher_score", "min_score", "max_score", "absolute_margin",
                             "relative_margin", "no_positive_score"), 0)
    out, short = {}, 0
    margin = filters.absolute_margin is not None or filters.relative_margin is not None
    for row, qid in enumerate(query_ids):
        pos = positives[qid]
        scorer = positive_model_scores[qid] if teacher is None else teacher.get(qid, {})
        pos_scores = [scorer[d] for d in pos if d in scorer]
        p = min(pos_scores) if pos_scores else None
        survivors = []
        rank = 0
        for j, model_score in zip(ranked[row].tolist(), ranked_scores[row].tolist()):
            if j < 0 or not math.isfinite(model_score):
                continue
            did = doc_ids[j]
            if did in pos:
                continue
            rank += 1
            if rank > filters.window():
                break
            if rank <= filters.range_min:
                skipped["range"] += 1
                continue
            if teacher is not None and did not in scorer:
                skipped["no_teacher_score"] += 1
                continue
            s = model_score if teacher is None else scorer[did]
            reason = _filtered_by(s, p, filters)
            if reason is None and margin and p is None:
                reason = "no_positive_score"
            if reason:
                skipped[reason] += 1
                continue
            survivors.append(Negative(qid, did, rank, model_score, s, p))
        survivors.sort(key=lambda n: (-n.score, n.rank))
        if filters.sampling == "random" and len(survivors) > filters.num_negatives:
            picked = sorted(rng.choice(len(survivors), filters.num_negatives, replace=False).tolist())
            survivors = [survivors[i] for i in picked]
        out[qid] = survivors[:filters.num_negatives]
        short += len(out[qid]) < filters.num_negatives
    return out, {**{f"skipped_{k}": v for k, v in skipped.items()}, "queries_short_of_negatives": short}


def _filtered_by(s: float, p: float | None, f: Filters) -> str | None:
    """The first filter that rejects score s (positive score p), or None."""
    if f.min_score is not None and s < f.min_score:
        return "min_score"
    if f.max_score is not None and s > f.max_score:
        return "max_score"
    if p is not None and f.absolute_margin is not None and s > p - f.absolute_margin:
        return "absolute_margin"
    if p is not None and f.relative_margin is not None and s > p - abs(p) * f.relative_margin:
        return "relative_margin"
    return None


def read_teacher_scores(path: str | pathlib.Path) -> Scores:
    """A teacher's (query, document) scores: JSONL rows with `query_id`, `doc_id`, `score` (e.g.
    `bixse-jax label`'s output) or a TREC run (`qid Q0 docid rank score tag`, a cross-encoder's)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path}: teacher score file not found")
    scores: Scores = {}
    for number, qid, did, score in _teacher_rows(path):
        if not math.isfinite(score):
            raise DataError(path, number, "score", f"must be a finite number, got {score}")
        if did in scores.setdefault(qid, {}):
            raise DataError(path, number, None, f"pair ({qid!r}, {did!r}) is scored twice")
        scores[qid][did] = score
    if not scores:
        raise DataError(path, None, None, "contains no scores")
    return scores


def _teacher_rows(path: pathlib.Path) -> Iterator[tuple[int, str, str, float]]:
    if path.suffix == ".jsonl":
        for number, text in read_lines(path):
            obj = parse_json_object(path, number, text)
            values = []
            for field in ("query_id", "doc_id", "score"):
                value: Any = obj.get(field)
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if field == "score"
                      else isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip())
                if not ok:
                    raise DataError(path, number, field, "missing" if value is None else f"invalid: {value!r}")
                values.append(float(value) if field == "score" else str(value))
            yield number, values[0], values[1], values[2]
        return
    for number, text in read_lines(path):
        fields = text.split()
        if len(fields) != 6:
            raise DataError(path, number, None, "expected a TREC run line `qid Q0 docid rank score tag` "
                            f"(or a .jsonl file of query_id, doc_id, score), got {len(fields)} fields")
        try:
            score = float(fields[4])
        except ValueError:
            raise DataError(path, number, "score", f"not a number: {fields[4]!r}") from None
        yield number, fields[0], fields[2], score
