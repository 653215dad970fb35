"""What the softmax losses (infonce, graded_infonce) share: a row is -(1 / n) sum of w log-softmax
over its positives, n their number; the two differ only in which cells are positives and their
weights w. Whole rows (dense, blocked) take the log-softmax directly; the ring folds an online
logsumexp over the shards a row meets, and declares its gradient.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from bixse_jax.losses.numerics import masked_log_softmax, prepare, row_mean
from bixse_jax.losses.registry import RingFold

Positives = Callable[..., tuple[jax.Array, jax.Array]]  # (targets, mask, **settings) -> (positive cells, weights)


def row_form(positives: Positives) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """(per-row loss, row has a positive) over whole rows."""

    def rows(logits, targets, mask, **settings):
        logits, targets, mask = prepare(logits, targets, mask)
        pos, weight = positives(targets, mask, **settings)
        n_pos = jnp.sum(pos.astype(jnp.float32), axis=-1)
        logp = masked_log_softmax(logits, mask)
        return -jnp.sum(weight * logp, axis=-1) / jnp.maximum(n_pos, 1.0), n_pos > 0

    return rows


def dense_form(rows: Callable[..., tuple[jax.Array, jax.Array]], logits: jax.Array, targets: jax.Array,
               mask: jax.Array | None, **settings) -> jax.Array:
    """The mean over rows that have a positive."""
    return row_mean(*rows(logits, targets, mask, **settings))


def _online_lse(m: jax.Array, s: jax.Array, logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Folds a block into per-row running (max, sum of exp(l - max)) over the masked-in cells."""
    new_m = jnp.maximum(m, jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1))
    safe = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
    s = s * jnp.exp(m - safe) + jnp.sum(jnp.where(mask, jnp.exp(logits - safe[:, None]), 0.0), axis=-1)
    return new_m, s


def ring_fold(positives: Positives) -> RingFold:
    """a: the weighted sum of positive logits; c: the number of positives; w: the sum of their
    weights; m, s: the online logsumexp. Row loss (w lse - a) / c; gradient (w softmax - weight) / c."""

    def init(shape):
        zeros = jnp.zeros(shape, jnp.float32)
        return {"a": zeros, "c": zeros, "w": zeros, "m": jnp.full(shape, -jnp.inf), "s": zeros}

    def fold(acc, l, targets, mask, **settings):
        pos, weight = positives(targets, mask, **settings)
        m, s = _online_lse(acc["m"], acc["s"], l, mask)
        return {"a": acc["a"] + jnp.sum(weight * l, axis=-1), "c": acc["c"] + jnp.sum(pos.astype(jnp.float32), axis=-1),
                "w": acc["w"] + jnp.sum(weight, axis=-1), "m": m, "s": s}

    def finish(acc):
        included = acc["c"] > 0
        lse = jnp.where(included, acc["m"] + jnp.log(acc["s"]), 0.0)
        return (acc["w"] * lse - acc["a"]) / jnp.maximum(acc["c"], 1.0), included, (lse, acc["c"], acc["w"])

    def grad(l, targets, mask, residuals, **settings):
        lse, n_pos, w_sum = residuals
        _, weight = positives(targets, mask, **settings)
        soft = jnp.where(mask, jnp.exp(l - lse[:, None]), 0.0)
        g = (w_sum[:, None] * soft - weight) / jnp.maximum(n_pos, 1.0)[:, None]
        return jnp.where((n_pos > 0)[:, None], g, 0.0)

    return RingFold(init, fold, finish, grad)
