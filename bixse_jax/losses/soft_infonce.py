"""Soft-label InfoNCE: cross-entropy against the row-normalised graded targets. Dense only."""

import jax
import jax.numpy as jnp

from bixse_jax.losses.numerics import masked_log_softmax, prepare, row_mean
from bixse_jax.losses.registry import Loss, register


def soft_infonce(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Cross-entropy against the row-normalised graded targets (soft labels).

    Degenerate when a row has one labelled cell: row-normalising gives it the whole target mass
    whatever its grade (a pair graded 0.04 becomes a perfect positive). Kept for comparison;
    `graded_infonce` is the soft InfoNCE the paper's table uses.
    """
    logits, targets, mask = prepare(logits, targets, mask)
    row_sum = jnp.sum(targets, axis=-1, keepdims=True)
    has_pos = row_sum[:, 0] > 0
    p = targets / jnp.where(row_sum > 0, row_sum, 1.0)
    logp = masked_log_softmax(logits, mask)
    ce = -jnp.sum(p * logp, axis=-1)  # p and logp are both 0 at masked cells.
    return row_mean(ce, has_pos)


LOSS = register(Loss("soft_infonce", dense=soft_infonce))
