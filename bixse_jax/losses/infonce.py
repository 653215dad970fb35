"""InfoNCE: every cell of grade >= loss.infonce_threshold is a positive, of weight 1."""

import jax
import jax.numpy as jnp

from bixse_jax.losses import softmax
from bixse_jax.losses.registry import Loss, register


def positives(targets: jax.Array, mask: jax.Array, *, threshold: float = 0.5) -> tuple[jax.Array, jax.Array]:
    pos = (targets >= threshold) & mask
    return pos, pos.astype(jnp.float32)


rows = softmax.row_form(positives)


def infonce(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *,
            threshold: float = 0.5) -> jax.Array:
    """InfoNCE with every cell of grade >= threshold as a positive.

    Each positive is scored against all included columns of its row (other
    positives included, as in multi-positive contrastive losses); per-row mean
    over positives, then mean over rows that have a positive.
    """
    return softmax.dense_form(rows, logits, targets, mask, threshold=threshold)


LOSS = register(Loss("infonce", dense=infonce, rows=rows, ring=softmax.ring_fold(positives),
                     settings=lambda cfg: {"threshold": cfg.infonce_threshold}))
