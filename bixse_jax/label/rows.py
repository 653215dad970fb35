"""Candidate rows in, labelled rows out: a resumable JSONL writer and a clean stop between batches.

A row is one JSON object with `query` and `document` texts and optional `query_id` / `doc_id`
(default: the text itself, as in training data), e.g. `bixse-jax mine`'s output. The output file
is appended to and flushed (fsync) after every batch; on start, its rows' (query id, doc id,
teacher) are read and skipped, and a line cut short by `kill -9` is dropped, so a restart finishes
the file with no duplicates. Rows the teacher could not label go to OUT.failed.jsonl with the
reason; that file holds the latest run's failures (they are retried on the next run).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from typing import Any, Iterable

from bixse_jax.errors import UserError


class LabelInputError(UserError):
    """A candidate or output line that cannot be read."""


Key = tuple[str, str, str]


def row_key(row: dict[str, Any], teacher: str) -> Key:
    return (str(row.get("query_id", row["query"])), str(row.get("doc_id", row["document"])), teacher)


def read_candidates(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line of a JSONL file as a dict with non-empty `query` and `document` strings."""
    path = pathlib.Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelInputError(f"{path}:{line_no}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise LabelInputError(f"{path}:{line_no}: expected a JSON object")
            for field in ("query", "document"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise LabelInputError(f"{path}:{line_no}: field {field!r} must be a non-empty string")
            rows.append(row)
    return rows


def beir_judged_rows(folder: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Every judged (query, document) pair of a BEIR split whose document has text, with its grade."""
    from bixse_jax.data import sources
    queries, corpus, qrels = sources.read_beir_eval(folder, split, skip_missing_docs=True)
    return [{"query_id": qid, "doc_id": did, "query": queries[qid], "document": corpus[did],
             "qrels_grade": grade} for qid, judged in qrels.items() for did, grade in judged.items()]


def _complete_lines(path: pathlib.Path) -> list[str]:
    """The file's complete lines; a last line without its newline (a write cut by kill -9) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    return data[:end].decode("utf-8").splitlines()


class ResumableWriter:
    """Appends labelled rows and failures to OUT / OUT.failed.jsonl; knows which keys are done."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.failed_path = self.path.with_name(self.path.name + ".failed.jsonl")
        self.done: set[Key] = set()
        for line_no, line in enumerate(_complete_lines(self.path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.done.add(row_key(row, row["teacher"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LabelInputError(f"{self.path}:{line_no}: not a labelled row ({e}); "
                                      f"resume needs the file as this command wrote it") from None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = self.path.open("a", encoding="utf-8")
        self._failed = self.failed_path.open("w", encoding="utf-8")  # the failures of this run only

    def write(self, labelled: Iterable[dict[str, Any]], failed: Iterable[dict[str, Any]] = ()) -> None:
        for f, rows in ((self._out, labelled), (self._failed, failed)):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            if text:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for row in labelled:
            self.done.add(row_key(row, row["teacher"]))

    def close(self) -> None:
        self._out.close()
        self._failed.close()

    def __enter__(self) -> "ResumableWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GracefulStop:
    """SIGTERM / Ctrl-C set `requested`; the loop finishes its batch, writes it and stops. A second
    Ctrl-C interrupts at once (the rows of that batch are then labelled again on the next run)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing the current batch, then stopping", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the caller stops us
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
