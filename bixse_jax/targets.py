"""Graded in-batch targets, and the ablations on them, for every way the loss is computed.

A global batch holds B (query, doc, grade) pairs. The loss scores every query
of the batch against every document of the batch, so the target matrix must
know the grade of *every* (query_i, doc_j) cell, not only the diagonal: when
ids repeat, an off-diagonal cell can be a judged pair that happens to appear
elsewhere in the batch. Treating such cells as negatives would teach the model
to push true positives away.

Everything is O(B^2): each id is mapped to a canonical representative (the
first index holding it), grades are scattered into a [B, B] grid indexed by
representatives, and the grid is gathered back for every (row, column). It is
plain jnp, so it jits and runs on globally sharded arrays without host syncs.

Without a [B, B] matrix (row blocks, the ring, logit_init's first rows) the same cells come from a
table of the batch's pairs sorted by id: cell (i, j) is labelled iff the table holds (query_id[i],
doc_id[j]), found by a vectorised binary search; duplicates keep the max grade (sorted first), as
graded_targets does. Either way `cells` applies the ablations, so every path sees the same targets.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections


def _first_index(ids: jax.Array) -> jax.Array:
    """Index of the first occurrence of each id: a canonical representative."""
    eq = ids[:, None] == ids[None, :]
    return jnp.argmax(eq, axis=1).astype(jnp.int32)  # argmax of bools = first True.


def graded_targets(
    query_ids: jax.Array, doc_ids: jax.Array, grades: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(targets [B,B] float32, labelled [B,B] bool) for B (query, doc, grade) pairs.

    Row i is the query of pair i, column j the document of pair j. A cell is
    labelled iff some pair k of the batch has the query id of row i and the doc
    id of column j; its target is then that pair's grade (the max, if the same
    (query, doc) pair occurs several times, so the result is deterministic).
    Unlabelled cells get target 0.

    Args:
      query_ids: int [B]; equal ids mean the same query text.
      doc_ids: int [B]; equal ids mean the same document text.
      grades: float [B], relevance of each pair (in [0, 1] for BiXSE).
    """
    b = query_ids.shape[0]
    rep_q = _first_index(query_ids)
    rep_d = _first_index(doc_ids)
    grades = grades.astype(jnp.float32)
    # A separate `seen` grid (rather than a sentinel grade) keeps any grade value legal.
    grid = jnp.full((b, b), -jnp.inf, jnp.float32).at[rep_q, rep_d].max(grades)
    seen = jnp.zeros((b, b), jnp.bool_).at[rep_q, rep_d].set(True)
    targets = jnp.take(jnp.take(grid, rep_q, axis=0), rep_d, axis=1)
    labelled = jnp.take(jnp.take(seen, rep_q, axis=0), rep_d, axis=1)
    return jnp.where(labelled, targets, 0.0), labelled


def _repeated(query_ids: jax.Array) -> jax.Array:
    """Bool [B]: the row's query id occurs more than once in the batch ([B, B] comparison)."""
    return jnp.sum(query_ids[:, None] == query_ids[None, :], axis=1) > 1


def loss_mask(
    query_ids: jax.Array, labelled: jax.Array, mask_unlabelled_of_repeated_queries: bool
) -> jax.Array:
    """Bool [B,B] of the cells that enter the loss.

    A query that occurs several times in a batch was sampled with several
    judged docs, and its other in-batch docs are likelier to be unjudged
    positives than for a one-off query. With the flag on, the unlabelled cells
    of such rows are dropped from the loss instead of being used as negatives.
    """
    b = query_ids.shape[0]
    if not mask_unlabelled_of_repeated_queries:
        return jnp.ones((b, b), jnp.bool_)
    return jnp.logical_or(~_repeated(query_ids)[:, None], labelled)


# --- the batch's pairs as a sorted table (no [B, B] array) ---------------------------------------

class PairTable(NamedTuple):
    """The batch's pairs sorted by (query id, doc id, grade descending)."""
    query_ids: jax.Array
    doc_ids: jax.Array
    grades: jax.Array


def pair_table(query_ids: jax.Array, doc_ids: jax.Array, grades: jax.Array) -> PairTable:
    q, d, neg = jax.lax.sort((query_ids, doc_ids, -grades.astype(jnp.float32)), num_keys=3)
    return PairTable(q, d, -neg)


def lookup(table: PairTable, row_query_ids: jax.Array, col_doc_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(grade [r, c] float32, labelled [r, c] bool) of every (row query, column doc) cell.

    A lower-bound binary search over the table, vectorised over the cells: log2(B) gathers of
    [r, c] indices; the first match of duplicates holds the max grade.
    """
    n = table.query_ids.shape[0]
    qi, dj = row_query_ids[:, None], col_doc_ids[None, :]
    shape = (row_query_ids.shape[0], col_doc_ids.shape[0])

    def halve(_, bounds):
        lo, hi = bounds
        active = lo < hi
        mid = jnp.minimum((lo + hi) // 2, n - 1)
        mq, md = table.query_ids[mid], table.doc_ids[mid]
        less = (mq < qi) | ((mq == qi) & (md < dj))
        return jnp.where(active & less, mid + 1, lo), jnp.where(active & ~less, mid, hi)

    lo, _ = jax.lax.fori_loop(0, n.bit_length(), halve,
                              (jnp.zeros(shape, jnp.int32), jnp.full(shape, n, jnp.int32)))
    pos = jnp.minimum(lo, n - 1)
    found = (lo < n) & (table.query_ids[pos] == qi) & (table.doc_ids[pos] == dj)
    return jnp.where(found, table.grades[pos], 0.0), found


def repeated_queries(table: PairTable, query_ids: jax.Array) -> jax.Array:
    """Bool per row: its query id occurs more than once in the batch."""
    right = jnp.searchsorted(table.query_ids, query_ids, side="right")
    return right - jnp.searchsorted(table.query_ids, query_ids, side="left") > 1


# --- the cells a loss sees, with the ablations ---------------------------------------------------

class Rows(NamedTuple):
    query_ids: jax.Array  # [r]
    index: jax.Array  # [r] global pair index
    grades: jax.Array  # [r] the row's own pair grade (diagonal_only)
    repeated: jax.Array  # [r] bool
    valid: jax.Array  # [r] bool; False for padding rows


def first_rows(batch: dict, table: PairTable, r: int) -> Rows:
    """The batch's first r rows (all valid)."""
    qids = batch["query_ids"][:r]
    return Rows(qids, jnp.arange(r, dtype=jnp.int32), batch["grades"][:r], repeated_queries(table, qids),
                jnp.ones((r,), jnp.bool_))


def cells(cfg: ml_collections.ConfigDict, rows: Rows, col_index: jax.Array,
          graded: Callable[[], tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(targets, labelled, mask) [r, c] of `rows` x the columns `col_index`, with the ablations the
    paper compares. `graded()` gives those cells' (targets, labelled); diagonal_only never asks."""
    if cfg.diagonal_only:  # ignore duplicate-id labels: only pair i labels (i, i)
        labelled = rows.index[:, None] == col_index[None, :]
        targets = jnp.where(labelled, rows.grades[:, None].astype(jnp.float32), 0.0)
    else:
        targets, labelled = graded()
    if cfg.binarize_threshold is not None:
        targets = (targets >= cfg.binarize_threshold).astype(jnp.float32) * labelled
    mask = jnp.broadcast_to(rows.valid[:, None], targets.shape)
    if cfg.mask_unlabelled_of_repeated_queries:
        mask = mask & (~rows.repeated[:, None] | labelled)
    return targets, labelled, mask


def block_cells(cfg: ml_collections.ConfigDict, table: PairTable, rows: Rows, col_doc_ids: jax.Array,
                col_index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`cells` of a block, its labels looked up in the pair table."""
    return cells(cfg, rows, col_index, lambda: lookup(table, rows.query_ids, col_doc_ids))


def batch_targets(batch: dict, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`cells` of the whole [B, B] global batch (the dense loss), its labels from the id grid."""
    qids = batch["query_ids"]
    n = qids.shape[0]
    index = jnp.arange(n, dtype=jnp.int32)
    rows = Rows(qids, index, batch["grades"], _repeated(qids), jnp.ones((n,), jnp.bool_))
    return cells(cfg, rows, index, lambda: graded_targets(qids, batch["doc_ids"], batch["grades"]))
