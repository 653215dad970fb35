"""The loop both teachers share: skip rows already labelled, label the rest batch by batch, write each batch.

A teacher has `name`, `grades` and `label(rows) -> iterator of lists of Outcome` (one list per
batch). Rows already in the output (same query id, doc id, teacher) are skipped, and so are
repeats of a key within the input; after each batch the rows are written and flushed, and a
requested stop (SIGTERM, Ctrl-C) ends the loop there.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

from tqdm import tqdm

from bixse_jax.label.grades import labelled_row
from bixse_jax.label.rows import GracefulStop, ResumableWriter, row_key


class Teacher(Protocol):
    name: str
    grades: list[int]
    stats: dict[str, Any]

    def label(self, rows: Sequence[dict[str, Any]]): ...


def failure_row(row: dict[str, Any], teacher: str, reason: str) -> dict[str, Any]:
    key = row_key(row, teacher)
    return {"query_id": key[0], "doc_id": key[1], "teacher": teacher, "reason": reason}


def label_rows(teacher: Teacher, rows: Sequence[dict[str, Any]], writer: ResumableWriter, *,
               stop: GracefulStop | None = None, progress: bool = True, chunk_size: int = 1024) -> dict[str, Any]:
    """Labels every row not yet in the writer's file; returns counts, timing and the teacher's stats."""
    pending, seen, skipped, repeated = [], set(), 0, 0
    for row in rows:
        key = row_key(row, teacher.name)
        if key in writer.done:
            skipped += 1
        elif key in seen:
            repeated += 1
        else:
            seen.add(key)
            pending.append(row)
    labelled = failed = 0
    start = time.perf_counter()
    bar = tqdm(total=len(pending), unit="pair", desc=f"label ({teacher.name})", disable=not progress,
               smoothing=0.1)
    def batches():
        for begin in range(0, len(pending), chunk_size):
            chunk = teacher.label(pending[begin:begin + chunk_size])
            try:
                yield from chunk
            finally:
                if hasattr(chunk, "close"):
                    chunk.close()

    stream = batches()
    try:
        for outcomes in stream:
            good = [labelled_row(o.row, o.grade_logits, teacher.grades, teacher.name, o.grade_mass)
                    for o in outcomes if o.error is None]
            bad = [failure_row(o.row, teacher.name, o.error) for o in outcomes if o.error is not None]
            writer.write(good, bad)
            labelled, failed = labelled + len(good), failed + len(bad)
            bar.update(len(outcomes))
            if stop is not None and stop.requested:
                break
    finally:
        stream.close()
        bar.close()
    seconds = time.perf_counter() - start
    return {"teacher": teacher.name, "input_rows": len(rows), "already_labelled": skipped,
            "repeated_in_input": repeated, "labelled": labelled, "failed": failed,
            "left": len(pending) - labelled - failed, "seconds": round(seconds, 2),
            "pairs_per_s": round((labelled + failed) / seconds, 3) if seconds > 0 else None,
            "stopped_by": stop.requested if stop is not None else None, "teacher_stats": teacher.stats}
