"""What the pairwise losses (pairwise_bce, margin_mse) share: the mean of a pair function over the
ordered pairs (j, k) of a row's cells that the targets order as T_j > T_k."""

from typing import Callable

import jax
import jax.numpy as jnp

from bixse_jax.losses.numerics import prepare, row_mean

PairFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_j - x_k, T_j - T_k) -> value per pair


def pair_loss(pair_fn: PairFn, x: jax.Array, targets: jax.Array, mask: jax.Array | None,
              batch_size: int | None) -> jax.Array:
    """Per-row mean of pair_fn over ordered pairs (j, k) with T_j > T_k, then row mean.

    Rows go through lax.map so only batch_size (default 1) [D, D] pair grids are live.
    """
    x, targets, mask = prepare(x, targets, mask)

    def row(args):
        l, t, m = args
        pairs = m[:, None] & m[None, :] & (t[:, None] > t[None, :])
        vals = pair_fn(l[:, None] - l[None, :], t[:, None] - t[None, :])
        n = jnp.sum(pairs.astype(jnp.float32))
        return jnp.sum(jnp.where(pairs, vals, 0.0)) / jnp.maximum(n, 1.0), n

    per_row, n_pairs = jax.lax.map(row, (x, targets, mask), batch_size=batch_size)
    return row_mean(per_row, n_pairs > 0)
