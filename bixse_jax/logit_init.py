"""`loss.init_logit_params='auto'` (the default): t and b fitted to the starting model before training.

Why: BiXSE's logits are exp(t) * cos + b. Started at the fixed t = log 10, b = -10, a pretrained
encoder's cosines (positives ~0.6, in-batch negatives ~0.15) give every cell a probability near
sigmoid(-4) and sigmoid(-8.5): the positives are pulled hard and the negatives barely pushed, and at
fine-tuning rates b hardly moves in a short run (issue 16: b ended within 0.3 of -10 in every run).

What: with the encoder frozen, the loss as a function of (t, b) alone is

    F(a, b) = sum over the loss's cells (i, j) of  softplus(a s_ij + b) - T_ij (a s_ij + b),  a = exp(t)

over the cosines s and the targets T and mask the loss itself sees (the in-batch matrix of the
run's first `loss.init_fit_batches` global batches: every labelled cell with its grade, every
unlabelled one as a negative, the ablations' targets). This is logistic regression of T on s
(cross-entropy with soft labels is still convex in (a, b)), so its minimiser is the point where
BiXSE's gradient with respect to t and b is zero for the starting encoder: the BiXSE optimum of the
logit parameters for a frozen encoder, which training would drift towards anyway if t and b moved
fast enough. Dividing by rows (the loss's normalisation) does not move the minimiser.

How: Newton's method in float64 numpy on (a, b), with a backtracking line search that keeps a > 0
and never increases F (F is convex, so this converges to the global minimum; deterministic, the same
on every process, since every process reads the same replicated cosines). Only the learnable
scalars are fitted: with `learn_bias=False` ("no bias") b stays at its init and only a is fitted,
likewise t with `learn_temperature=False`. The encoder runs without dropout. At most
`loss.init_fit_rows` rows of each batch are used (all columns), so the fit needs no [B, B] matrix
at large batches; the rows are a batch's first ones, i.e. a random sample (batches are shuffled).

Each loss's record says whether its (t, b) have this optimum (losses.Loss.logistic_optimum): of the
built-in ones only BiXSE's sigmoid BCE does; the softmax and pairwise losses do not use b at all, so
for them (and when both t and b are frozen) `auto` is `fixed` (`init_mode`). A resumed run never
refits: its checkpoint's t and b win.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from bixse_jax import losses, parallel, targets as targets_lib
from bixse_jax.errors import ConfigError
from bixse_jax.models.encoder import SentenceEncoder

MODES = ("fixed", "auto")
_MIN_SCALE = 1e-6  # a = exp(t) is kept above this: a cosine that anti-correlates with the targets has no t


def init_mode(loss_cfg: ml_collections.ConfigDict) -> str:
    """`loss.init_logit_params` resolved: `auto` fits (t, b) where the loss has the logistic optimum and
    one of them is learnable, and is `fixed` elsewhere (nothing to fit)."""
    check(loss_cfg)
    return "auto" if loss_cfg.init_logit_params == "auto" and _has_fit(loss_cfg) else "fixed"


def _has_fit(loss_cfg: ml_collections.ConfigDict) -> bool:
    """The loss has the logistic optimum over (t, b) and one of them is learnable: `auto` fits."""
    return losses.get(loss_cfg.name).logistic_optimum and bool(loss_cfg.learn_temperature or loss_cfg.learn_bias)


def check(loss_cfg: ml_collections.ConfigDict) -> None:
    """ConfigError for a setting `init_logit_params` cannot honour."""
    mode = loss_cfg.init_logit_params
    if mode not in MODES:
        raise ConfigError(f"loss.init_logit_params {mode!r} is not one of {MODES}")
    if mode == "auto" and (loss_cfg.init_fit_batches < 1 or loss_cfg.init_fit_rows < 1):
        raise ConfigError(f"loss.init_fit_batches={loss_cfg.init_fit_batches} and loss.init_fit_rows="
                          f"{loss_cfg.init_fit_rows} must be >= 1")


# --- the fit (numpy, float64) --------------------------------------------------------------------

def bce_sum(scale: float, bias: float, scores: np.ndarray, targets: np.ndarray) -> float:
    """F(a, b) = sum of softplus(L) - T L over the cells, L = a s + b (float64, stable)."""
    logits = scale * scores + bias
    return float(np.sum(np.logaddexp(0.0, logits) - targets * logits))


def fit_logistic(scores: np.ndarray, targets: np.ndarray, *, init_scale: float, init_bias: float,
                 fit_scale: bool = True, fit_bias: bool = True, max_iter: int = 100,
                 tol: float = 1e-10) -> tuple[float, float, dict[str, Any]]:
    """(a, b, info) minimising bce_sum over the free ones of a > 0 and b, the others held at init.

    Newton steps on the free coordinates, halved until F does not increase and a stays positive;
    stops when the step's decrease of F is below tol * (1 + F) or the gradient vanishes.
    """
    s = np.asarray(scores, np.float64).ravel()
    t = np.asarray(targets, np.float64).ravel()
    free = np.array([fit_scale, fit_bias])
    x = np.array([max(init_scale, _MIN_SCALE), init_bias], np.float64)
    f = bce_sum(x[0], x[1], s, t)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        p = 0.5 * (1.0 + np.tanh(0.5 * (x[0] * s + x[1])))  # sigmoid without overflow
        r, w = p - t, p * (1.0 - p)
        grad = np.array([np.dot(r, s), np.sum(r)])[free]
        hess = np.array([[np.dot(w, s * s), np.dot(w, s)], [np.dot(w, s), np.sum(w)]])[np.ix_(free, free)]
        if np.max(np.abs(grad)) < 1e-12 * max(len(s), 1):
            break
        try:
            direction = -np.linalg.solve(hess + 1e-12 * np.eye(len(grad)), grad)
        except np.linalg.LinAlgError:
            direction = -grad
        full = np.zeros(2)
        full[free] = direction
        step, improved = 1.0, False
        for _ in range(60):
            candidate = x + step * full
            if candidate[0] >= _MIN_SCALE:
                fc = bce_sum(candidate[0], candidate[1], s, t)
                if fc <= f:
                    improved = True
                    break
            step *= 0.5
        if not improved:
            break
        decrease = f - fc
        x, f = candidate, fc
        if decrease < tol * (1.0 + abs(f)):
            break
    return float(x[0]), float(x[1]), {"iterations": iterations, "bce_sum": f, "cells": int(s.size),
                                      "at_scale_floor": bool(x[0] <= 2 * _MIN_SCALE)}


# --- the cells of the run's first batches ----------------------------------------------------------

def make_cells_fn(encoder: SentenceEncoder, loss_cfg: ml_collections.ConfigDict, mesh: Mesh,
                  max_rows: int) -> Callable[[dict, dict], tuple[jax.Array, jax.Array, jax.Array]]:
    """jitted (encoder params, global batch) -> (cosines, targets, mask), each [min(B, max_rows), B],
    replicated: the frozen encoder's scores and the loss's own targets and mask for those cells
    (targets.block_cells, which the blocked and ring losses use and which equals targets.batch_targets)."""

    def cells_of(params: dict, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        q = encoder(params, batch["query_input_ids"], batch["query_attention_mask"])
        d = encoder(params, batch["doc_input_ids"], batch["doc_attention_mask"])
        n = q.shape[0]
        r = min(n, max_rows)
        table = targets_lib.pair_table(batch["query_ids"], batch["doc_ids"], batch["grades"])
        rows = targets_lib.first_rows(batch, table, r)
        targets, _, mask = targets_lib.block_cells(loss_cfg, table, rows, batch["doc_ids"],
                                                   jnp.arange(n, dtype=jnp.int32))
        return (q[:r] @ d.T).astype(jnp.float32), targets, mask

    return jax.jit(cells_of, out_shardings=parallel.replicated(mesh))


def fit_from_batches(cells_fn: Callable, encoder_params: dict, batches: Iterable[dict],
                     loss_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Fits (t, b) on the masked-in cells of `batches` (global arrays); returns the fitted values and
    the fit's record (what train.py logs and puts in the summary)."""
    scores, targets = [], []
    for batch in batches:
        s, t, m = jax.device_get(cells_fn(encoder_params, batch))
        m = np.asarray(m, bool)
        scores.append(np.asarray(s, np.float64)[m])
        targets.append(np.asarray(t, np.float64)[m])
    s, t = np.concatenate(scores), np.concatenate(targets)
    scale, bias, info = fit_logistic(s, t, init_scale=math.exp(loss_cfg.init_log_temperature),
                                     init_bias=loss_cfg.init_bias, fit_scale=bool(loss_cfg.learn_temperature),
                                     fit_bias=bool(loss_cfg.learn_bias))
    labelled = t > 0
    return {"log_temperature": math.log(scale), "bias": bias, "batches": len(scores), **info,
            "mean_target": float(t.mean()), "mean_cos_target_positive": float(s[labelled].mean()) if labelled.any() else None,
            "mean_cos_target_zero": float(s[~labelled].mean()) if (~labelled).any() else None}


# --- following the encoder: the same fit inside the step -----------------------------------------

FOLLOW_MODES = ("auto", "adam", "refit")
_LINE_SEARCH = 2.0 ** -np.arange(12)  # step sizes a Newton step may be cut to


def follow_mode(loss_cfg: ml_collections.ConfigDict) -> str:
    """`loss.follow_logit_params` resolved: `auto` is `refit` for a loss with the logistic optimum
    (BiXSE) and `adam` for the others (their t and b, if they read them at all, have no such fit),
    with both t and b frozen (nothing to refit), and with Matryoshka prefixes (one t and b serve
    every width; the fit is of one)."""
    check_follow(loss_cfg)
    if loss_cfg.follow_logit_params == "auto":
        can_refit = _has_fit(loss_cfg) and not tuple(loss_cfg.get("matryoshka_dims", ()))
        return "refit" if can_refit else "adam"
    return loss_cfg.follow_logit_params


def check_follow(loss_cfg: ml_collections.ConfigDict) -> None:
    """ConfigError for a `loss.follow_logit_params` the loss cannot honour."""
    mode = loss_cfg.follow_logit_params
    if mode not in FOLLOW_MODES:
        raise ConfigError(f"loss.follow_logit_params {mode!r} is not one of {FOLLOW_MODES}")
    if mode == "refit" and tuple(loss_cfg.get("matryoshka_dims", ())):
        raise ConfigError(f"loss.follow_logit_params={mode!r} refits t and b on one width; with "
                          f"loss.matryoshka_dims={tuple(loss_cfg.matryoshka_dims)} (one t and b for all prefixes) "
                          "use 'adam' (or 'auto', which does)")
    if mode == "refit" and not losses.get(loss_cfg.name).logistic_optimum:
        raise ConfigError(f"loss.follow_logit_params='refit' fits BiXSE's sigmoid BCE over (t, b); loss.name="
                          f"{loss_cfg.name!r} has no such optimum (softmax and pairwise losses ignore b): use 'adam'")


def fit_logistic_jax(scores: jax.Array, targets: jax.Array, mask: jax.Array, scale: jax.Array, bias: jax.Array,
                     *, fit_scale: bool, fit_bias: bool, iterations: int = 12) -> tuple[jax.Array, jax.Array]:
    """`fit_logistic` in jnp for one step's cells: (a, b) minimising the masked bce_sum, from (scale, bias).

    A fixed number of Newton steps, each cut to the first of 1, 1/2, ... 1/2^11 that does not
    increase F and keeps a > 0 (none: the step is skipped), so it jits without host control flow.
    Started at the current (a, b), which the previous step's fit left near this step's optimum.
    """
    s, y, m = scores.astype(jnp.float32), targets.astype(jnp.float32), mask.astype(jnp.float32)
    free = jnp.array([fit_scale, fit_bias], jnp.float32)
    steps = jnp.asarray(_LINE_SEARCH, jnp.float32)

    def f(a, b):  # [k] candidates -> [k] sums, one candidate at a time (no [k, rows, B] array)
        def one(ab):
            z = ab[0] * s + ab[1]
            return jnp.sum(m * (jnp.logaddexp(0.0, z) - y * z))
        return jax.lax.map(one, jnp.stack([a, b], axis=-1))

    def newton(_, x):
        p = jax.nn.sigmoid(x[0] * s + x[1])
        r, w = m * (p - y), m * p * (1.0 - p)
        grad = free * jnp.array([jnp.sum(r * s), jnp.sum(r)])
        hess = jnp.array([[jnp.sum(w * s * s), jnp.sum(w * s)], [jnp.sum(w * s), jnp.sum(w)]])
        hess = hess * jnp.outer(free, free) + jnp.diag(1.0 - free) + 1e-6 * jnp.eye(2)
        direction = -jnp.linalg.solve(hess, grad)
        candidates = x[None, :] + steps[:, None] * direction[None, :]
        ok = (f(candidates[:, 0], candidates[:, 1]) <= f(x[None, 0], x[None, 1])) & (candidates[:, 0] >= _MIN_SCALE)
        return jnp.where(jnp.any(ok), candidates[jnp.argmax(ok)], x)

    x = jax.lax.fori_loop(0, iterations, newton, jnp.stack([jnp.maximum(scale, _MIN_SCALE), bias]).astype(jnp.float32))
    return x[0], x[1]


def refit_in_step(loss_cfg: ml_collections.ConfigDict, t: jax.Array, b: jax.Array, q: jax.Array, d: jax.Array,
                  batch: dict) -> tuple[jax.Array, jax.Array]:
    """`loss.follow_logit_params='refit'`: (t, b) at the BiXSE optimum for this step's encoder.

    Why: Adam moves t and b by about their rate a step, while fine-tuning changes the cosines'
    spread several-fold in tens of steps (issue 23); a rate fast enough to follow that jitters
    once it has. Here every step fits (t, b) by logistic regression on its own cells, the loss's
    targets and mask on the batch's first `loss.init_fit_rows` rows against all its documents
    (the cells `auto` fits at the start), with the embeddings held fixed. The loss then uses the
    fitted values, so the encoder's gradient is that of the loss minimised over (t, b) (at an
    optimum dL/dt = dL/db = 0), and the step stores them as the run's t and b. Only the learnable
    ones are fitted (`learn_bias=False`: b stays).
    """
    q, d = jax.lax.stop_gradient(q), jax.lax.stop_gradient(d)
    n = q.shape[0]
    r = min(n, loss_cfg.init_fit_rows)
    table = targets_lib.pair_table(batch["query_ids"], batch["doc_ids"], batch["grades"])
    rows = targets_lib.first_rows(batch, table, r)
    targets, _, mask = targets_lib.block_cells(loss_cfg, table, rows, batch["doc_ids"], jnp.arange(n, dtype=jnp.int32))
    scores = (q[:r] @ d.T).astype(jnp.float32)
    a, bias = fit_logistic_jax(scores, targets, mask, jnp.exp(jax.lax.stop_gradient(t)), jax.lax.stop_gradient(b),
                               fit_scale=bool(loss_cfg.learn_temperature), fit_bias=bool(loss_cfg.learn_bias))
    return jnp.log(a), bias
