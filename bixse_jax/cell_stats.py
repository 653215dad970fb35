"""The step's metrics about its cells: mean logits, and calibration of the labelled cells.

Why: whether t and b follow the encoder shows in one comparison (issue 23): the mean probability
sigmoid(L) of the labelled cells against their mean target, and the mean probability of the
in-batch negatives. At BiXSE's optimum over (t, b) for the current encoder the two labelled means
are equal (dF/db = sum(p - T) = 0 over all cells, and the negatives' share is small); a gap that
persists means t and b lag behind the encoder.

One home for the dense, row-blocked and ring losses: each block adds its sums (`block_sums`), and
`means` turns the totals into the metrics. Metrics carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NAMES = ("positive_logit", "negative_logit", "labelled_prob", "labelled_target", "negative_prob")
Sums = tuple[jax.Array, ...]


def zeros() -> Sums:
    return (jnp.float32(0),) * 8


def block_sums(logits: jax.Array, targets: jax.Array, labelled: jax.Array, mask: jax.Array) -> Sums:
    """Sums and counts over one block of cells (any shape), without gradient.

    positive: labelled with a target > 0; negative: in the loss and unlabelled; labelled: in the
    loss and labelled, whatever its target (a grade of 0 is a labelled cell too).
    """
    logits, targets = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(targets)
    labelled, negative = labelled & mask, mask & ~labelled
    positive = labelled & (targets > 0)
    prob = jax.nn.sigmoid(logits)
    total = lambda x, where: jnp.sum(jnp.where(where, x, 0.0))
    count = lambda where: jnp.sum(where.astype(jnp.float32))
    return (total(logits, positive), count(positive), total(logits, negative), count(negative),
            total(prob, labelled), total(targets, labelled), count(labelled), total(prob, negative))


def add(a: Sums, b: Sums) -> Sums:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def means(sums: Sums) -> dict[str, jax.Array]:
    """The metrics (NAMES) from the summed block_sums; an empty set of cells reads 0."""
    pos, n_pos, neg, n_neg, prob_l, target_l, n_l, prob_neg = sums
    mean = lambda x, n: x / jnp.maximum(n, 1.0)
    return {"positive_logit": mean(pos, n_pos), "negative_logit": mean(neg, n_neg),
            "labelled_prob": mean(prob_l, n_l), "labelled_target": mean(target_l, n_l), "negative_prob": mean(prob_neg, n_neg)}
