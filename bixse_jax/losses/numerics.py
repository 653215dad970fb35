"""The numerics every loss shares: float32 inputs, masked cells zeroed, row means, BCE, log-softmax.

Masked cells are dropped entirely, from sums and from softmax denominators, and get exactly zero
gradient. Inputs are cast to float32; masked logits are first replaced by 0 (so no NaN/inf can leak
into gradients through the unselected `where` branch) and only then, where a softmax needs it, by a
large negative number. Rows with nothing to contribute are left out of the normalisation, so
padding or fully masked rows never dilute the loss.
"""

import jax
import jax.numpy as jnp

NEG = jnp.finfo(jnp.float32).min  # Finite, so all-masked rows give no NaN.


def prepare(logits: jax.Array, targets: jax.Array, mask: jax.Array | None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 logits/targets with masked cells zeroed, and a bool mask."""
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    if mask is None:
        mask = jnp.ones(logits.shape, jnp.bool_)
    mask = jnp.asarray(mask, jnp.bool_)
    return jnp.where(mask, logits, 0.0), jnp.where(mask, targets, 0.0), mask


def row_mean(per_row: jax.Array, included: jax.Array) -> jax.Array:
    """Mean of per_row over the included rows; 0 when no row is included."""
    n = jnp.sum(included.astype(jnp.float32))
    return jnp.sum(jnp.where(included, per_row, 0.0)) / jnp.maximum(n, 1.0)


def bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Sigmoid BCE per cell, softplus(L) - T L, arranged so no large terms cancel when |L| is big."""
    return jnp.where(logits >= 0, (1.0 - targets) * logits + jax.nn.softplus(-logits),
                     -targets * logits + jax.nn.softplus(logits))


def masked_log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Row-wise log-softmax over the included columns only; 0 at masked cells."""
    logits = jnp.where(mask, logits, NEG)
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.where(mask, logp, 0.0)
