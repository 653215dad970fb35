"""Losses over an in-batch query x document score matrix.

All losses take `logits` (or scores) [Q, D], graded `targets` [Q, D] in [0, 1]
and an optional bool `mask` [Q, D]; masked cells are dropped entirely, from
sums and from softmax denominators, and get exactly zero gradient. Rows with
nothing to contribute are left out of the normalisation, so padding or fully
masked rows never dilute the loss.

Numerics: inputs are cast to float32; masked logits are first replaced by 0
(so no NaN/inf can leak into gradients through the unselected `where` branch)
and only then, where a softmax needs it, by a large negative number.

BiXSE (`bixse`) is the pointwise sigmoid BCE; the others are the baselines it
is compared against (InfoNCE, grade-weighted InfoNCE, soft-label InfoNCE, RankNet, Margin-MSE).
"""

from typing import Callable

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min  # Finite, so all-masked rows give no NaN.


def _prepare(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 logits/targets with masked cells zeroed, and a bool mask."""
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    if mask is None:
        mask = jnp.ones(logits.shape, jnp.bool_)
    mask = jnp.asarray(mask, jnp.bool_)
    return jnp.where(mask, logits, 0.0), jnp.where(mask, targets, 0.0), mask


def _row_mean(per_row: jax.Array, included: jax.Array) -> jax.Array:
    """Mean of per_row over the included rows; 0 when no row is included."""
    n = jnp.sum(included.astype(jnp.float32))
    return jnp.sum(jnp.where(included, per_row, 0.0)) / jnp.maximum(n, 1.0)


def _masked_log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Row-wise log-softmax over the included columns only; 0 at masked cells."""
    logits = jnp.where(mask, logits, _NEG)
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.where(mask, logp, 0.0)


def bixse(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Sigmoid BCE on graded targets, summed per pair, averaged over queries.

    Dividing by queries, not cells, puts it on the per-query scale of the
    softmax losses and keeps one cell's gradient independent of how many
    other cells of its row are masked.
    """
    logits, targets, mask = _prepare(logits, targets, mask)
    # softplus(L) - T*L, arranged so no large terms cancel when |L| is big.
    bce = jnp.where(
        logits >= 0,
        (1.0 - targets) * logits + jax.nn.softplus(-logits),
        -targets * logits + jax.nn.softplus(logits),
    )
    total = jnp.sum(jnp.where(mask, bce, 0.0))
    n_rows = jnp.sum(jnp.any(mask, axis=-1).astype(jnp.float32))
    return total / jnp.maximum(n_rows, 1.0)


def infonce(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    threshold: float = 0.5,
) -> jax.Array:
    """InfoNCE with every cell of grade >= threshold as a positive.

    Each positive is scored against all included columns of its row (other
    positives included, as in multi-positive contrastive losses); per-row mean
    over positives, then mean over rows that have a positive.
    """
    logits, targets, mask = _prepare(logits, targets, mask)
    pos = (targets >= threshold) & mask
    logp = _masked_log_softmax(logits, mask)
    n_pos = jnp.sum(pos.astype(jnp.float32), axis=-1)
    nll = -jnp.sum(jnp.where(pos, logp, 0.0), axis=-1) / jnp.maximum(n_pos, 1.0)
    return _row_mean(nll, n_pos > 0)


def graded_infonce(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """InfoNCE with every cell of grade g > 0 a positive, its term weighted by g.

    Row i: -(1 / n_i) * sum_{j: T_ij > 0} T_ij * log softmax_j(L_i), n_i its number of positives;
    then the mean over rows that have a positive. On binary targets this is `infonce` exactly (every
    weight is 1). Unlike `soft_infonce`, the grades are not renormalised per row: a row whose one
    judged pair is graded 0.04 contributes 0.04 of an InfoNCE row instead of the full weight of a
    perfect positive, and a row's weight is the mean grade of its positives. The softmax over the
    whole row (its other positives included, as in `infonce`) keeps it a contrastive loss: several
    graded positives of one query compete, the better graded with the larger weight.
    """
    logits, targets, mask = _prepare(logits, targets, mask)
    pos = (targets > 0) & mask
    weight = jnp.where(pos, targets, 0.0)
    logp = _masked_log_softmax(logits, mask)
    n_pos = jnp.sum(pos.astype(jnp.float32), axis=-1)
    nll = -jnp.sum(weight * logp, axis=-1) / jnp.maximum(n_pos, 1.0)
    return _row_mean(nll, n_pos > 0)


def soft_infonce(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Cross-entropy against the row-normalised graded targets (soft labels).

    Degenerate when a row has one labelled cell: row-normalising gives it the whole target mass
    whatever its grade (a pair graded 0.04 becomes a perfect positive). Kept for comparison;
    `graded_infonce` is the soft InfoNCE the paper's table uses.
    """
    logits, targets, mask = _prepare(logits, targets, mask)
    row_sum = jnp.sum(targets, axis=-1, keepdims=True)
    has_pos = row_sum[:, 0] > 0
    p = targets / jnp.where(row_sum > 0, row_sum, 1.0)
    logp = _masked_log_softmax(logits, mask)
    ce = -jnp.sum(p * logp, axis=-1)  # p and logp are both 0 at masked cells.
    return _row_mean(ce, has_pos)


def _pair_loss(
    pair_fn: Callable[[jax.Array, jax.Array], jax.Array],
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    batch_size: int | None,
) -> jax.Array:
    """Per-row mean of pair_fn over ordered pairs (j, k) with T_j > T_k, then row mean.

    Rows go through lax.map so only batch_size (default 1) [D, D] pair grids are live.
    """

    def row(args):
        l, t, m = args
        pairs = m[:, None] & m[None, :] & (t[:, None] > t[None, :])
        vals = pair_fn(l[:, None] - l[None, :], t[:, None] - t[None, :])
        n = jnp.sum(pairs.astype(jnp.float32))
        return jnp.sum(jnp.where(pairs, vals, 0.0)) / jnp.maximum(n, 1.0), n

    per_row, n_pairs = jax.lax.map(row, (logits, targets, mask), batch_size=batch_size)
    return _row_mean(per_row, n_pairs > 0)


def pairwise_bce(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """RankNet: softplus(-(L_j - L_k)) for every pair the targets order as j > k.

    Args:
      batch_size: rows processed together by lax.map (memory O(batch_size*D^2)).
    """
    logits, targets, mask = _prepare(logits, targets, mask)
    return _pair_loss(lambda dl, dt: jax.nn.softplus(-dl), logits, targets, mask, batch_size)


def margin_mse(
    scores: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """Margin-MSE: squared error between score margins and target margins.

    Same pair set as `pairwise_bce`; it regresses the margin instead of only
    its sign, so it needs scores and targets on comparable scales.
    """
    scores, targets, mask = _prepare(scores, targets, mask)
    return _pair_loss(lambda ds, dt: jnp.square(ds - dt), scores, targets, mask, batch_size)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "bixse": bixse,
    "infonce": infonce,
    "graded_infonce": graded_infonce,
    "soft_infonce": soft_infonce,
    "pairwise_bce": pairwise_bce,
    "margin_mse": margin_mse,
}
