"""Rotary position embeddings as HF's Llama / Qwen compute them: inverse frequencies, cos/sin, rotation.

`inverse_frequencies` gives transformers' `inv_freq` for rope_type "default" (theta ** (-2i/d))
and "llama3" (Llama 3.1's frequency-dependent scaling); `rotate` applies the rotation in HF's
"rotate_half" layout (the first and second halves of each head are the pairs), float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "llama3")


def inverse_frequencies(head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                        low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                        original_max_position_embeddings: int = 8192) -> np.ndarray:
    """[head_dim // 2] float32, as transformers' ROPE_INIT_FUNCTIONS[rope_type] computes them."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if rope_type == "default":
        return inv
    if rope_type != "llama3":
        raise ValueError(f"rope_type {rope_type!r} is not one of {ROPE_TYPES}")
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """[B, T] integer positions -> cos, sin of shape [B, T, head_dim] (float32)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, head_dim] rotated by cos/sin [B, T, head_dim]; float32 math, x's dtype out."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
