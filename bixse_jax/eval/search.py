"""Exact top-k inner-product search, blocked so memory never holds the full query x corpus matrix.

The corpus is cut into blocks of `corpus_block` rows, each block split over the mesh's data axis.
For every (query block, corpus block) one jitted call scores the block on all devices, takes each
device's local top-k, gathers those few candidates and merges them with the query block's running
top-k. Live memory is O(query_block x corpus_block / devices) for scores plus O(queries x k) for
the results, whatever the corpus size; each corpus block crosses to the devices once.

Ties are broken like a stable sort: equal scores keep the lower corpus index first (lax.top_k
prefers the lower position, and every merge lists earlier, lower-indexed candidates first).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from bixse_jax import parallel

DEFAULT_QUERY_BLOCK = 1024
DEFAULT_CORPUS_BLOCK = 65536


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=16)
def _merge_step(mesh: Mesh, k: int, local_k: int):
    """jit((queries, corpus block, block start, corpus size, best scores, best ids) -> new best)."""
    axis = parallel.DATA_AXIS

    def local_top_k(q, c, start, n):
        # q [qb, H] replicated; c [cb / devices, H] this device's rows of the block.
        scores = q @ c.T
        ids = start + jax.lax.axis_index(axis) * c.shape[0] + jnp.arange(c.shape[0], dtype=jnp.int32)
        scores = jnp.where(ids[None, :] < n, scores, -jnp.inf)  # padding rows never win
        top, pos = jax.lax.top_k(scores, local_k)
        # Devices hold ascending slices of the block, so the tiled gather keeps ids ascending on ties.
        return (jax.lax.all_gather(top, axis, axis=1, tiled=True),
                jax.lax.all_gather(ids[pos], axis, axis=1, tiled=True))

    sharded = jax.shard_map(local_top_k, mesh=mesh, in_specs=(P(), P(axis), P(), P()),
                            out_specs=(P(), P()), check_vma=False)

    def step(q, c, start, n, best, best_ids):
        top, ids = sharded(q, c, start, n)
        # Earlier blocks (lower ids) first, so lax.top_k's lower-position preference is lower-id.
        merged, pos = jax.lax.top_k(jnp.concatenate([best, top], axis=1), k)
        return merged, jnp.take_along_axis(jnp.concatenate([best_ids, ids], axis=1), pos, axis=1)

    return jax.jit(step, donate_argnums=(4, 5))


def top_k_search(queries: np.ndarray, corpus: np.ndarray, k: int, *, mesh: Mesh | None = None,
                 query_block: int = DEFAULT_QUERY_BLOCK, corpus_block: int = DEFAULT_CORPUS_BLOCK
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k'], corpus indices [Q, k']) of each query's k' = min(k, N) best inner products.

    Rows are sorted best first, equal scores by ascending corpus index. Embeddings are scored in
    float32; cosine similarity needs L2-normalised inputs (the encoders normalise by default).
    """
    queries = np.asarray(queries, np.float32)
    corpus = np.asarray(corpus, np.float32)
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"expected [Q, H] queries and [N, H] corpus, got {queries.shape} and {corpus.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if query_block < 1 or corpus_block < 1:
        raise ValueError(f"block sizes must be >= 1, got {query_block} and {corpus_block}")
    n_queries, n_docs = len(queries), len(corpus)
    k = min(k, n_docs)
    if n_queries == 0 or k == 0:
        return np.zeros((n_queries, k), np.float32), np.zeros((n_queries, k), np.int64)

    mesh = mesh or parallel.make_mesh()
    qb = min(query_block, n_queries)
    cb = _round_up(min(corpus_block, n_docs), mesh.size)  # every device gets an equal slice
    step = _merge_step(mesh, k, min(k, cb // mesh.size))
    replicated, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    q_blocks, best = [], []
    for s in range(0, n_queries, qb):
        block = np.zeros((qb, queries.shape[1]), np.float32)  # fixed shape: one compilation
        block[:min(qb, n_queries - s)] = queries[s:s + qb]
        q_blocks.append(jax.device_put(block, replicated))
        best.append((jax.device_put(np.full((qb, k), -np.inf, np.float32), replicated),
                     jax.device_put(np.full((qb, k), -1, np.int32), replicated)))
    n = jnp.int32(n_docs)
    for start in range(0, n_docs, cb):
        block = np.zeros((cb, corpus.shape[1]), np.float32)
        block[:min(cb, n_docs - start)] = corpus[start:start + cb]
        c = jax.device_put(block, rows)
        for j, q in enumerate(q_blocks):
            best[j] = step(q, c, jnp.int32(start), n, *best[j])
    scores = np.concatenate([np.asarray(b[0]) for b in best])[:n_queries]
    ids = np.concatenate([np.asarray(b[1]) for b in best])[:n_queries].astype(np.int64)
    return scores, ids


def top_k_run(query_ids: list[str], doc_ids: list[str], scores: np.ndarray, indices: np.ndarray
              ) -> dict[str, dict[str, float]]:
    """The search result as a run: query id -> {doc id: score}."""
    return {qid: {doc_ids[j]: float(s) for j, s in zip(indices[r], scores[r])}
            for r, qid in enumerate(query_ids)}
