"""One record per loss, registered once; the step, the blocked and ring losses and logit_init read it.

Every loss sees the same cells, built by targets.py for every path: logits exp(t) s + b (or the
cosines s) [Q, D], graded targets [Q, D] in [0, 1] and a bool mask [Q, D]. Its record says in which
forms it can be computed and what else it reads, so that nothing outside this module asks for a
loss by name. A new loss is one module that calls `register` (see bixse.py); a loss defined outside
the package registers the same way before the config names it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from bixse_jax.errors import ConfigError

Settings = Callable[[ml_collections.ConfigDict], dict]


@dataclasses.dataclass(frozen=True)
class RingFold:
    """A loss folded over the column blocks a row meets one at a time (the ring's shards).

    init(shape) -> the per-row accumulators (a dict of arrays of that shape) before any block;
    fold(acc, l, targets, mask, **settings) -> after one more block, l, targets and mask prepared
    (numerics.prepare); finish(acc) -> (per-row value, row included, residuals: a tuple of per-row
    arrays the gradient needs); grad(l, targets, mask, residuals, **settings) -> dL/dl of a block,
    up to the 1 / (included rows) factor. The ring recomputes each block for it, so no [B, B] array.
    """
    init: Callable[[tuple[int, ...]], dict]
    fold: Callable[..., dict]
    finish: Callable[[dict], tuple[jax.Array, jax.Array, tuple]]
    grad: Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss in every form it has.

    dense(x, targets, mask, **settings) -> scalar over the whole [Q, D] matrix (step.objective).
    rows(x, targets, mask, **settings) -> (per-row value, row included), the loss being the mean of
      the included rows' values; whole rows in blocks (blocked_loss). None: no blocked form.
    ring: its RingFold, declared where a row's value is no sum over its cells (the softmax losses'
      online logsumexp). `additive`: the row's value is a sum over its cells (a block whose row is
      not included adds 0), so the fold is derived from `rows`. Neither: no ring form.
    settings(loss config) -> the keyword arguments of its forms (infonce's threshold).
    reads_scores: fed the cosines s instead of the logits (margin_mse; t and b do not enter it).
    logistic_optimum: (t, b) have the logistic optimum that logit_init's `auto` fits (bixse).
    """
    name: str
    dense: Callable[..., jax.Array]
    rows: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    ring: RingFold | None = None
    additive: bool = False
    settings: Settings = lambda cfg: {}
    reads_scores: bool = False
    logistic_optimum: bool = False

    def __post_init__(self):
        if self.additive and self.rows is None:
            raise ValueError(f"loss {self.name!r}: `additive` derives the ring fold from `rows`; give rows")
        if self.reads_scores and (self.rows is not None or self.ring is not None):
            raise ValueError(f"loss {self.name!r}: a loss of the scores has a dense form only here")

    def ring_fold(self) -> RingFold | None:
        """The ring fold: declared, or derived from an additive row form."""
        return self.ring or (additive_fold(self.rows) if self.additive else None)

    @property
    def impls(self) -> tuple[str, ...]:
        """The forms it has, of blocked_loss.IMPLS."""
        return ("dense",) + ("blocked",) * (self.rows is not None) + ("ring",) * (self.ring_fold() is not None)


def additive_fold(rows: Callable[..., tuple[jax.Array, jax.Array]]) -> RingFold:
    """The ring fold of a loss whose row value is a sum over its cells: sum the blocks' row values;
    a block's gradient is the gradient of its row values, zero on rows never included."""

    def init(shape):
        return {"value": jnp.zeros(shape, jnp.float32), "included": jnp.zeros(shape, jnp.bool_)}

    def fold(acc, l, targets, mask, **settings):
        value, included = rows(l, targets, mask, **settings)
        return {"value": acc["value"] + value, "included": acc["included"] | included}

    def finish(acc):
        return acc["value"], acc["included"], (acc["included"],)

    def grad(l, targets, mask, residuals, **settings):
        g = jax.grad(lambda l: jnp.sum(rows(l, targets, mask, **settings)[0]))(l)
        return jnp.where(residuals[0][:, None], g, 0.0)

    return RingFold(init, fold, finish, grad)


REGISTRY: dict[str, Loss] = {}


def register(loss: Loss) -> Loss:
    """Adds a loss under its name (once)."""
    if loss.name in REGISTRY:
        raise ValueError(f"a loss named {loss.name!r} is already registered")
    REGISTRY[loss.name] = loss
    return loss


def get(name: str) -> Loss:
    """The loss `loss.name` names; ConfigError if none."""
    if name not in REGISTRY:
        raise ConfigError(f"loss.name {name!r} is not one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def supporting(impl: str) -> tuple[str, ...]:
    """Names of the losses that have the form `impl`, in the order they were registered."""
    return tuple(name for name, loss in REGISTRY.items() if impl in loss.impls)
