"""Texts -> embeddings with every device: length-sorted, bucketed batches through one jitted call."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from tqdm import tqdm

from bixse_jax import parallel
from bixse_jax.data.batching import DEFAULT_BUCKETS, bucket_length, pad_batch
from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax.models.encoder import SentenceEncoder



@functools.lru_cache(maxsize=32)
def _jitted_encoder(encoder: SentenceEncoder, mesh: Mesh):
    """One jitted function per (encoder, mesh), so repeated calls reuse compiled buckets.

    Each text is encoded alone, so every device runs the whole forward on its slice of the batch
    (shard_map) and nothing is communicated until the embeddings are gathered. Written per device,
    the MKL dense layers (`dense_impl="mkl"`, custom calls that XLA's partitioner cannot split)
    run on each device's slice instead of on an all-gathered batch.
    """
    batch = P(parallel.BATCH_AXES)
    local = jax.shard_map(lambda p, ids, mask: encoder(p, ids, mask), mesh=mesh,
                          in_specs=(P(), batch, batch), out_specs=batch)
    return jax.jit(local, out_shardings=parallel.replicated(mesh))


def encode_texts(encoder: SentenceEncoder, params: dict, tokenizer: Tokenizer, texts: Sequence[str], *,
                 max_len: int, batch_size: int = 128, mesh: Mesh | None = None, prefix: str = "",
                 buckets: Sequence[int] = DEFAULT_BUCKETS, show_progress: bool = False) -> np.ndarray:
    """[N, H] float32 embeddings in the order of `texts`.

    Sorting by length keeps padding small, and the few bucket lengths keep jit's compile cache
    small; the batch is split over the mesh's data axis, so all devices encode at once.
    """
    mesh = mesh or parallel.make_mesh()
    batch_size = -(-batch_size // mesh.size) * mesh.size  # a multiple of the device count
    seqs = tokenizer.encode([prefix + t for t in texts], max_len)
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    sharding = parallel.batch_sharding(mesh)
    params = jax.device_put(params, parallel.replicated(mesh))
    embed = _jitted_encoder(encoder, mesh)
    out: np.ndarray | None = None
    for start in tqdm(range(0, len(seqs), batch_size), desc="encode", disable=not show_progress):
        idx = order[start:start + batch_size]
        chunk = [seqs[i] for i in idx]
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # fixed batch shape; extra rows are dropped
        length = bucket_length(max(len(s) for s in chunk), buckets, max_len)
        ids, mask = pad_batch(chunk, length, tokenizer.pad_id)
        emb = np.asarray(embed(params, jax.device_put(ids, sharding), jax.device_put(mask, sharding)))
        if out is None:
            out = np.zeros((len(seqs), emb.shape[1]), np.float32)
        out[idx] = emb[:len(idx)]
    return out if out is not None else np.zeros((0, encoder.config.hidden_size), np.float32)
