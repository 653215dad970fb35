"""Token states -> one vector per text: mean / CLS / last-token pooling and L2 normalisation.

Pooling runs in float32 whatever the compute dtype, so that cosine similarities (and the BiXSE
logits built from them) do not lose precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLING_MODES = ("mean", "cls", "last")


def pool(hidden: jax.Array, attention_mask: jax.Array, mode: str) -> jax.Array:
    """[B, T, H] token states and [B, T] mask -> [B, H] float32."""
    hidden = hidden.astype(jnp.float32)
    mask = attention_mask.astype(jnp.float32)
    if mode == "mean":
        summed = jnp.einsum("bth,bt->bh", hidden, mask)
        return summed / jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":  # the last real token, whether the padding is on the right or the left
        t = attention_mask.shape[1]
        last = t - 1 - jnp.argmax(attention_mask[:, ::-1].astype(bool), axis=1)  # all-padding row: t - 1
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Unit-length rows; eps keeps an all-zero row finite (and its gradient defined)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
