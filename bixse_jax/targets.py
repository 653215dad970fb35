"""Graded in-batch targets for BiXSE.

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
"""

import jax
import jax.numpy as jnp


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
    repeated = jnp.sum(query_ids[:, None] == query_ids[None, :], axis=1) > 1
    return jnp.logical_or(~repeated[:, None], labelled)
