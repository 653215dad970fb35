"""Margin-MSE: squared error between score margins and target margins. Dense only, on the scores."""

import jax
import jax.numpy as jnp

from bixse_jax.losses.pairs import pair_loss
from bixse_jax.losses.registry import Loss, register


def margin_mse(scores: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *,
               batch_size: int | None = None) -> jax.Array:
    """Margin-MSE: squared error between score margins and target margins.

    Same pair set as `pairwise_bce`; it regresses the margin instead of only
    its sign, so it needs scores and targets on comparable scales (the cosines, not the logits).
    """
    return pair_loss(lambda ds, dt: jnp.square(ds - dt), scores, targets, mask, batch_size)


LOSS = register(Loss("margin_mse", dense=margin_mse, reads_scores=True))
