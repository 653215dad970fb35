"""BiXSE: the pointwise sigmoid BCE on graded targets, the loss this library is for.

Its row value is a sum over the row's cells, so the ring fold derives from the row form; and its
logits' (t, b) have a logistic optimum for a frozen encoder (logit_init's `auto`).
"""

import jax
import jax.numpy as jnp

from bixse_jax.losses.numerics import bce, prepare
from bixse_jax.losses.registry import Loss, register


def bixse(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Sigmoid BCE on graded targets, summed per pair, averaged over queries.

    Dividing by queries, not cells, puts it on the per-query scale of the
    softmax losses and keeps one cell's gradient independent of how many
    other cells of its row are masked.
    """
    logits, targets, mask = prepare(logits, targets, mask)
    total = jnp.sum(jnp.where(mask, bce(logits, targets), 0.0))
    n_rows = jnp.sum(jnp.any(mask, axis=-1).astype(jnp.float32))
    return total / jnp.maximum(n_rows, 1.0)


def rows(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-row BCE sum, row has a cell)."""
    logits, targets, mask = prepare(logits, targets, mask)
    return jnp.sum(jnp.where(mask, bce(logits, targets), 0.0), axis=-1), jnp.any(mask, axis=-1)


LOSS = register(Loss("bixse", dense=bixse, rows=rows, additive=True, logistic_optimum=True))
