"""Matryoshka embeddings (Kusupati et al., 2022): every prefix of an embedding is an embedding.

`loss.matryoshka_dims = (64, 128, 256, "full")` trains the first 64, 128, 256 and all coordinates
to work on their own: the objective is computed on each prefix, renormalised (the cosine that a
truncated embedding is used with), and the per-prefix losses are summed with
`loss.matryoshka_weights` (default 1 each). This module is the one home of the idea: it wraps the
objective of embeddings (step.objective), so every loss and every way of computing it (dense,
row-blocked, ring, gradient caching, which differentiates that same objective) gets it unchanged,
and the evaluators, `encode --dim` and the export cut embeddings with `truncate` below.

One t and one b for all prefixes, on purpose: a Matryoshka model is used at a dimension chosen
after training, and `sigmoid(exp(t) cos + b)` should stay the relevance probability at any of
them, which is what the shared scalars train the encoder for (the prefixes' cosines are pulled
onto one scale). Per-prefix scalars would also change the params tree that the checkpoint, the
`auto` fit and the export read. docs/results.md measures what sharing costs on the frozen MiniLM.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bixse_jax.errors import ConfigError

FULL = "full"  # the whole embedding, whatever the model's width
Objective = Callable[..., tuple[jax.Array, dict]]  # (params, q, d, batch) -> (loss, metrics)


def resolve_dims(dims: Sequence[Any], hidden_size: int, where: str = "loss.matryoshka_dims") -> tuple[int, ...]:
    """Prefix sizes as ints ("full" -> hidden_size), increasing; ConfigError naming `where` otherwise."""
    out = []
    for dim in dims:
        if dim == FULL:
            dim = hidden_size
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= hidden_size:
            raise ConfigError(f"{where}={tuple(dims)}: {dim!r} is not 'full' or a size in 1..{hidden_size} "
                              f"(the model's embedding width)")
        out.append(int(dim))
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ConfigError(f"{where}={tuple(dims)}: sizes must increase strictly (as {hidden_size} for 'full')")
    return tuple(out)


def resolve_weights(loss_cfg: ml_collections.ConfigDict) -> tuple[float, ...]:
    """One positive weight per dim: `loss.matryoshka_weights`, or 1 each when it is empty."""
    dims, weights = tuple(loss_cfg.matryoshka_dims), tuple(loss_cfg.matryoshka_weights)
    if not weights:
        return (1.0,) * len(dims)
    if len(weights) != len(dims):
        raise ConfigError(f"loss.matryoshka_weights={weights} needs one weight per entry of "
                          f"loss.matryoshka_dims={dims}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise ConfigError(f"loss.matryoshka_weights={weights}: {w!r} is not a positive number")
    return tuple(float(w) for w in weights)


def check(loss_cfg: ml_collections.ConfigDict, hidden_size: int) -> tuple[int, ...]:
    """The resolved dims (() when off); ConfigError for a bad setting, before training starts."""
    if not isinstance(loss_cfg.matryoshka_dims, (tuple, list)):
        raise ConfigError(f"loss.matryoshka_dims={loss_cfg.matryoshka_dims!r} must be a tuple, e.g. (64, 128, 'full')")
    dims = resolve_dims(loss_cfg.matryoshka_dims, hidden_size)
    if not dims and loss_cfg.matryoshka_weights:
        raise ConfigError(f"loss.matryoshka_weights={tuple(loss_cfg.matryoshka_weights)} is set but "
                          "loss.matryoshka_dims is empty")
    resolve_weights(loss_cfg)
    return dims


def truncate(x: Any, dim: int | None, normalize: bool = True) -> Any:
    """The first `dim` coordinates of each row ([..., H] -> [..., dim]), back to unit length when the
    model normalises its embeddings (a dot-product model's prefix stays as it is). None: x as it is.
    The whole width is renormalised too (a no-op on unit rows), so every prefix is the same function
    of x and their gradients are alike. numpy in, numpy out; jax in, jax out."""
    if dim is None:
        return x
    x = x[..., :dim]
    if not normalize:
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    return x / xp.maximum(xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True)), 1e-12)


def wrap_objective(objective: Objective, loss_cfg: ml_collections.ConfigDict, normalize: bool) -> Objective:
    """`objective` summed over the prefixes of `loss.matryoshka_dims`; as it is when that is empty.

    Metrics: `loss` is the weighted sum, `loss/dimK` each prefix's own loss, and the logit metrics
    (t, b, positive_logit, negative_logit) are the widest prefix's.
    """
    if not tuple(loss_cfg.matryoshka_dims):
        return objective
    weights = resolve_weights(loss_cfg)

    def matryoshka_objective(params, q, d, batch):
        dims = resolve_dims(loss_cfg.matryoshka_dims, q.shape[-1])  # at trace time: shapes are static
        total, per_dim, metrics = 0.0, {}, {}
        for dim, weight in zip(dims, weights):
            loss, metrics = objective(params, truncate(q, dim, normalize), truncate(d, dim, normalize), batch)
            total = total + weight * loss
            per_dim[f"loss/dim{dim}"] = loss
        return total, {**metrics, **per_dim, "loss": total}

    return matryoshka_objective
