"""Grade-weighted InfoNCE: every cell of grade g > 0 is a positive, of weight g."""

import jax
import jax.numpy as jnp

from bixse_jax.losses import softmax
from bixse_jax.losses.registry import Loss, register


def positives(targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    pos = (targets > 0) & mask
    return pos, jnp.where(pos, targets, 0.0)


rows = softmax.row_form(positives)


def graded_infonce(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """InfoNCE with every cell of grade g > 0 a positive, its term weighted by g.

    Row i: -(1 / n_i) * sum_{j: T_ij > 0} T_ij * log softmax_j(L_i), n_i its number of positives;
    then the mean over rows that have a positive. On binary targets this is `infonce` exactly (every
    weight is 1). Unlike `soft_infonce`, the grades are not renormalised per row: a row whose one
    judged pair is graded 0.04 contributes 0.04 of an InfoNCE row instead of the full weight of a
    perfect positive, and a row's weight is the mean grade of its positives. The softmax over the
    whole row (its other positives included, as in `infonce`) keeps it a contrastive loss: several
    graded positives of one query compete, the better graded with the larger weight.
    """
    return softmax.dense_form(rows, logits, targets, mask)


LOSS = register(Loss("graded_infonce", dense=graded_infonce, rows=rows, ring=softmax.ring_fold(positives)))
