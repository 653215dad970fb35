"""K-fold cross-validation by query: which queries of a BEIR split are held out in fold k.

Data sets such as TREC-DL 2019 have one judged split of a few dozen queries, so held-out
evaluation means training on k-1 folds of its queries and re-ranking the k-th fold's judged pool.
Folds come from the qrels file itself (every query it names, before any filtering), so the
trainer, which reads pairs, and the evaluator, which reads qrels, agree on them.
"""

from __future__ import annotations

import pathlib

import numpy as np

from bixse_jax.data.sources import DataError, PathLike, _qrels_path, read_lines
from bixse_jax.errors import ConfigError


def assign_folds(query_ids: set[str] | list[str], folds: int, seed: int = 0) -> dict[str, int]:
    """query id -> fold in [0, folds): a seeded shuffle of the sorted ids, dealt round robin.

    Fold sizes differ by at most one; the same ids, folds and seed give the same folds anywhere.
    """
    ids = sorted(set(query_ids))
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    if len(ids) < folds:
        raise ConfigError(f"{len(ids)} queries cannot fill {folds} folds")
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i]: rank % folds for rank, i in enumerate(order)}


def qrels_query_ids(folder: PathLike, split: str) -> set[str]:
    """Every query id named in FOLDER/qrels/SPLIT.tsv (its header line skipped)."""
    path = _qrels_path(pathlib.Path(folder), split)
    ids = set()
    for number, text in read_lines(path):
        fields = text.split("\t")
        if number == 1 and fields[0] == "query-id":
            continue
        if len(fields) < 3 or not fields[0]:
            raise DataError(path, number, "query-id", "expected 'query-id<TAB>corpus-id<TAB>score'")
        ids.add(fields[0])
    return ids


def held_out_queries(folder: PathLike, split: str, folds: int, fold: int, seed: int = 0) -> set[str]:
    """The query ids of `fold` (the evaluation side); the other folds' queries are for training."""
    if not 0 <= fold < folds:
        raise ConfigError(f"fold must be in [0, {folds}), got {fold}")
    assignment = assign_folds(qrels_query_ids(folder, split), folds, seed)
    return {q for q, f in assignment.items() if f == fold}
