"""RankNet (`pairwise_bce`): softplus(-(L_j - L_k)) for every pair the targets order as j > k.

Blocked, each row's pair grid is cut into column chunks; no ring: its pairs compare cells of one
row, which on the ring live on every device, so every pair of shards would have to meet.
"""

import jax
import jax.numpy as jnp

from bixse_jax.losses.numerics import prepare
from bixse_jax.losses.pairs import pair_loss
from bixse_jax.losses.registry import Loss, register


def pairwise_bce(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *,
                 batch_size: int | None = None) -> jax.Array:
    """RankNet: softplus(-(L_j - L_k)) for every pair the targets order as j > k.

    Args:
      batch_size: rows processed together by lax.map (memory O(batch_size*D^2)).
    """
    return pair_loss(lambda dl, dt: jax.nn.softplus(-dl), logits, targets, mask, batch_size)


def rows(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """RankNet per row of a [r, B] block, each row's pair grid in [B, r] column chunks, so no grid is
    larger than the block itself."""
    logits, targets, mask = prepare(logits, targets, mask)
    b = logits.shape[-1]
    chunk = min(logits.shape[0], b)
    pad = -b % chunk
    split = lambda x: jnp.pad(x, (0, pad)).reshape(-1, chunk)

    def row(args):
        l, t, m = args

        @jax.checkpoint
        def over_k(acc, ks):
            lk, tk, mk = ks
            pairs = m[:, None] & mk[None, :] & (t[:, None] > tk[None, :])
            vals = jax.nn.softplus(-(l[:, None] - lk[None, :]))
            return (acc[0] + jnp.sum(jnp.where(pairs, vals, 0.0)), acc[1] + jnp.sum(pairs.astype(jnp.float32))), None

        (total, n), _ = jax.lax.scan(over_k, (jnp.float32(0), jnp.float32(0)), (split(l), split(t), split(m)))
        return total / jnp.maximum(n, 1.0), n > 0

    return jax.lax.map(jax.checkpoint(row), (logits, targets, mask))


LOSS = register(Loss("pairwise_bce", dense=pairwise_bce, rows=rows))
