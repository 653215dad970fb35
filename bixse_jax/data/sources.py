"""Readers that turn files on disk into graded (query, document, score) pairs.

Every reader validates its whole input up front and raises `DataError` naming
file, line and field, so a bad row fails in seconds instead of hours into a run.

Supported layouts:
  * jsonl: one {"query", "document", "score"[, "query_id", "doc_id",
    "instruction"]} object per line, score already in [0, 1].
  * beir: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv);
    integer grades are mapped to probabilities.
  * sts: STS Benchmark tab-separated files; score 0..5 is divided by 5.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping

from bixse_jax.errors import ConfigError, UserError

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class GradedPair:
    """One training example: a query, a document and a relevance probability."""
    query: str
    document: str
    grade: float  # relevance in [0, 1]; the files call it "score"
    query_id: str
    doc_id: str
    instruction: str = ""


class DataError(UserError):
    """Bad input; str() reads 'file:17: field "score": must be in [0, 1], got 1.3'."""

    def __init__(self, path: PathLike, line: int | None, field: str | None,
                 message: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f'field "{field}": ' if field else ""
        super().__init__(f"{where}: {what}{message}")


# ----------------------------------------------------------------------------
# Low-level helpers.
# ----------------------------------------------------------------------------


def read_lines(path: PathLike, *, keep_blank: bool = False) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, text without line ending); blank lines skipped unless kept.

    Decodes line by line so an encoding error still names its line. Shared by every reader of
    line-based files (pairs, qrels, STS, TREC runs, encode inputs).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, number, None, f"not valid UTF-8 ({e})") from None
            text = text.rstrip("\r\n")
            if keep_blank or text.strip():
                yield number, text


def parse_json_object(path: PathLike, number: int, text: str) -> dict[str, Any]:
    """One JSONL line as a dict; anything else is an error naming file and line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, number, None, f"malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(path, number, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_objects(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, text in read_lines(path):
        yield number, parse_json_object(path, number, text)


class _Row:
    """Typed field access for one parsed record; errors carry file and line."""

    def __init__(self, path: PathLike, line: int, obj: Mapping[str, Any]):
        self.path, self.line, self.obj = path, line, obj

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.path, self.line, field, message)

    def text(self, field: str, *, default: str | None = None,
             allow_empty: bool = False) -> str:
        if field not in self.obj:
            if default is not None:
                return default
            raise self.error(field, "missing")
        value = self.obj[field]
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {_describe(value)}")
        if not allow_empty and not value.strip():
            raise self.error(field, "must not be empty or whitespace-only")
        return value

    def ident(self, field: str, *, default: str | None = None) -> str:
        """Ids may be JSON strings or integers (both common in the wild)."""
        if field not in self.obj and default is not None:
            return default
        value = self.obj.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return self.text(field)

    def score(self, field: str) -> float:
        if field not in self.obj:
            raise self.error(field, "missing")
        value = self.obj[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(field, f"must be a number, got {_describe(value)}")
        return _check_unit(float(value), functools.partial(self.error, field))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {json.dumps(value)[:40]}"


def _check_unit(value: float, error: Callable[[str], DataError]) -> float:
    if not math.isfinite(value):
        raise error(f"must be finite, got {value}")
    if not 0.0 <= value <= 1.0:
        raise error(f"must be in [0, 1], got {value:g}")
    return value


def _parse_number(text: str, error: Callable[[str], DataError]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise error(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise error(f"must be finite, got {text!r}")
    return value


def _nonempty(pairs: list[GradedPair], path: PathLike) -> list[GradedPair]:
    if not pairs:
        raise DataError(path, None, None, "contains no pairs")
    return pairs


# ----------------------------------------------------------------------------
# JSONL pairs.
# ----------------------------------------------------------------------------


def read_jsonl_pairs(path: PathLike) -> list[GradedPair]:
    """Reads graded pairs; a missing id defaults to the text, so equal texts share it."""
    pairs = []
    for number, obj in _json_objects(path):
        row = _Row(path, number, obj)
        query, document = row.text("query"), row.text("document")
        pairs.append(GradedPair(
                query=query,
                document=document,
                grade=row.score("score"),
                query_id=row.ident("query_id", default=query),
                doc_id=row.ident("doc_id", default=document),
                instruction=row.text("instruction", default="", allow_empty=True),
        ))
    return _nonempty(pairs, path)


# ----------------------------------------------------------------------------
# BEIR folders.
# ----------------------------------------------------------------------------

_QRELS_HEADER = ("query-id", "corpus-id", "score")


def _read_beir_texts(path: pathlib.Path, *, with_title: bool) -> dict[str, str]:
    texts: dict[str, str] = {}
    for number, obj in _json_objects(path):
        row = _Row(path, number, obj)
        key = row.ident("_id")
        if key in texts:
            raise row.error("_id", f"duplicate id {key!r}")
        text = row.text("text", allow_empty=with_title)
        if with_title:
            title = row.text("title", default="", allow_empty=True).strip()
            text = f"{title} {text}".strip() if title else text
            if not text.strip():
                raise row.error("text", "title and text are both empty")
        texts[key] = text
    if not texts:
        raise DataError(path, None, None, "contains no records")
    return texts


def _qrels_path(folder: pathlib.Path, split: str) -> pathlib.Path:
    if not folder.is_dir():
        raise DataError(folder, None, None, "BEIR folder not found")
    path = folder / "qrels" / f"{split}.tsv"
    if not path.is_file():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise DataError(folder, None, None,
                        f"unknown split {split!r}; available splits: {available}")
    return path


def _read_qrels(
        path: pathlib.Path,
        queries: Mapping[str, str],
        corpus: Mapping[str, str],
        missing_docs: str,
) -> tuple[list[tuple[int, str, str, float]], float]:
    """Returns validated (line, query id, doc id, raw grade) rows and the file's top grade.

    A judged document absent from corpus.jsonl is an error (`missing_docs="error"`), dropped
    ("skip") or kept ("keep": evaluation against the qrels as given).
    """
    rows, top, with_text = [], 0.0, 0
    for number, text in read_lines(path):
        fields = text.split("\t")
        if number == 1 and tuple(f.strip() for f in fields) == _QRELS_HEADER:
            continue
        if len(fields) != 3:
            raise DataError(path, number, None,
                            f"expected 3 tab-separated fields (query-id, corpus-id, "
                            f"score), got {len(fields)}")
        qid, did, grade_text = (f.strip() for f in fields)
        err = functools.partial(DataError, path, number)
        grade = _parse_number(grade_text, functools.partial(err, "score"))
        if grade < 0:
            raise err("score", f"grades must be >= 0, got {grade_text}")
        if qid not in queries:
            raise err("query-id", f"{qid!r} is not in queries.jsonl")
        top = max(top, grade)
        if did in corpus:
            with_text += 1
        elif missing_docs == "skip":
            continue
        elif missing_docs == "error":
            raise err("corpus-id", f"{did!r} is not in corpus.jsonl "
                      "(pass skip_missing_docs=True to drop such judgments)")
        rows.append((number, qid, did, grade))
    if not rows:
        raise DataError(path, None, None, "contains no usable judgments")
    if not with_text:  # a corpus of another data set, most likely
        raise DataError(path, None, None, "none of its judged documents is in corpus.jsonl")
    return rows, top


def _load_beir(folder: PathLike, split: str, missing_docs: str):
    folder = pathlib.Path(folder)
    qrels_path = _qrels_path(folder, split)
    queries = _read_beir_texts(folder / "queries.jsonl", with_title=False)
    corpus = _read_beir_texts(folder / "corpus.jsonl", with_title=True)
    rows, top = _read_qrels(qrels_path, queries, corpus, missing_docs)
    return qrels_path, queries, corpus, rows, top


def read_beir(
        folder: PathLike,
        split: str = "train",
        *,
        max_grade: float | None = None,
        grade_map: Mapping[float, float] | None = None,
        keep_zero: bool = True,
        skip_missing_docs: bool = False,
) -> list[GradedPair]:
    """Reads a BEIR split as training pairs with grades mapped into [0, 1].

    The mapping is `grade_map[grade]` when given, else `grade / max_grade`, where
    `max_grade` defaults to the largest grade in this qrels file, skipped rows
    included (binary qrels map to 1.0). `keep_zero=False` drops pairs whose probability is 0.
    `skip_missing_docs` drops judgments of documents absent from corpus.jsonl
    (TREC-DL ships judged passages without text).
    """
    if max_grade is not None and not max_grade > 0:
        raise ConfigError(f"max_grade must be > 0, got {max_grade}")
    if grade_map is not None:
        for grade, prob in grade_map.items():
            if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
                raise ConfigError(f"grade_map[{grade}] must be in [0, 1], got {prob}")
    path, queries, corpus, rows, file_top = _load_beir(folder, split, "skip" if skip_missing_docs else "error")
    top = file_top if max_grade is None else max_grade
    pairs = []
    for number, qid, did, grade in rows:
        if grade_map is not None:
            if grade not in grade_map:
                raise DataError(path, number, "score",
                                f"grade {grade:g} is not in grade_map "
                                f"{sorted(grade_map)}")
            prob = float(grade_map[grade])
        elif grade > top:
            raise DataError(path, number, "score",
                            f"grade {grade:g} exceeds max_grade {top:g}")
        else:
            prob = grade / top if top > 0 else 0.0
        if prob == 0.0 and not keep_zero:
            continue
        pairs.append(GradedPair(query=queries[qid], document=corpus[did],
                                grade=prob, query_id=qid, doc_id=did))
    return _nonempty(pairs, path)


def read_beir_eval(
        folder: PathLike,
        split: str,
        *,
        skip_missing_docs: bool = False,
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, float]]]:
    """Returns (queries, corpus, qrels) for evaluation, qrels keeping raw grades.

    Queries are restricted to those judged in this split (retrieval runs over the
    whole corpus). The qrels are those of the file as given, judgments of documents
    absent from corpus.jsonl included, as trec_eval reads them: such a document can be
    neither retrieved nor re-ranked, yet it counts in the ideal DCG and in recall's and
    MAP's number of relevant documents. `skip_missing_docs` drops those judgments
    instead (`judged_with_text`), and queries left without judgments go too.
    """
    _, queries, corpus, rows, _ = _load_beir(folder, split, "keep")
    qrels: dict[str, dict[str, float]] = {}
    for _, qid, did, grade in rows:
        qrels.setdefault(qid, {})[did] = grade
    if skip_missing_docs:
        qrels = judged_with_text(qrels, corpus)
    return {q: queries[q] for q in qrels}, corpus, qrels


def judged_with_text(qrels: Mapping[str, Mapping[str, float]],
                     corpus: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """The judgments whose document has text; queries left without any are dropped."""
    kept = {q: {d: g for d, g in judged.items() if d in corpus} for q, judged in qrels.items()}
    return {q: judged for q, judged in kept.items() if judged}


def judged_without_text(qrels: Mapping[str, Mapping[str, float]], corpus: Mapping[str, str]) -> int:
    """How many (query, document) judgments name a document without text in the corpus."""
    return sum(d not in corpus for judged in qrels.values() for d in judged)


# ----------------------------------------------------------------------------
# STS Benchmark.
# ----------------------------------------------------------------------------

_STS_FIELD_COUNTS = (7, 9)


def read_sts(path: PathLike) -> list[GradedPair]:
    """Reads STS Benchmark rows (fields 5, 6, 7: score, sentence 1, sentence 2).

    No csv quoting: quotes inside sentences are literal. Score 0..5 becomes
    score / 5 and the sentences serve as their own ids.
    """
    pairs = []
    for number, text in read_lines(path):
        fields = text.split("\t")
        if len(fields) not in _STS_FIELD_COUNTS:
            raise DataError(path, number, None,
                            f"expected {' or '.join(map(str, _STS_FIELD_COUNTS))} "
                            f"tab-separated fields, got {len(fields)}")
        err = functools.partial(DataError, path, number)
        score = _parse_number(fields[4], functools.partial(err, "score (5)"))
        if not 0.0 <= score <= 5.0:
            raise err("score (5)", f"must be in [0, 5], got {fields[4]}")
        first, second = fields[5], fields[6]
        for name, sentence in (("sentence1 (6)", first), ("sentence2 (7)", second)):
            if not sentence.strip():
                raise err(name, "must not be empty or whitespace-only")
        pairs.append(GradedPair(query=first, document=second, grade=score / 5.0,
                                query_id=first, doc_id=second))
    return _nonempty(pairs, path)


# ----------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------

_READERS: dict[str, Callable[..., list[GradedPair]]] = {
        "jsonl": read_jsonl_pairs,
        "beir": read_beir,
        "sts": read_sts,
}


def load_pairs(kind: str, path: str, **kw: Any) -> list[GradedPair]:
    """Reads training pairs of a named kind; keyword arguments go to the reader."""
    if kind not in _READERS:
        raise ConfigError(f"unknown data kind {kind!r}; known kinds: {sorted(_READERS)}")
    return _READERS[kind](path, **kw)
