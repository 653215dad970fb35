"""Losses against plain float64 numpy references, plus numerics and gradient checks."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bixse_jax.losses import REGISTRY
from bixse_jax.losses.bixse import bixse

LOSSES = {name: loss.dense for name, loss in REGISTRY.items()}  # each loss's dense form

# ---------------------------------------------------------------- references


def _ref_bixse(l, t, m):
    total, rows = 0.0, 0
    for i in range(l.shape[0]):
        cols = np.flatnonzero(m[i])
        for j in cols:
            total += np.logaddexp(0.0, l[i, j]) - t[i, j] * l[i, j]
        rows += len(cols) > 0
    return total / max(rows, 1)


def _ref_infonce(l, t, m, threshold=0.5):
    per_row = []
    for i in range(l.shape[0]):
        cols = np.flatnonzero(m[i])
        pos = [j for j in cols if t[i, j] >= threshold]
        if pos:
            lse = np.logaddexp.reduce(l[i, cols])
            per_row.append(np.mean([lse - l[i, j] for j in pos]))
    return np.mean(per_row) if per_row else 0.0


def _ref_graded_infonce(l, t, m):
    per_row = []
    for i in range(l.shape[0]):
        cols = np.flatnonzero(m[i])
        pos = [j for j in cols if t[i, j] > 0]
        if pos:
            lse = np.logaddexp.reduce(l[i, cols])
            per_row.append(sum(t[i, j] * (lse - l[i, j]) for j in pos) / len(pos))
    return np.mean(per_row) if per_row else 0.0


def _ref_soft_infonce(l, t, m):
    per_row = []
    for i in range(l.shape[0]):
        cols = np.flatnonzero(m[i])
        total = sum(t[i, j] for j in cols)
        if total > 0:
            lse = np.logaddexp.reduce(l[i, cols])
            per_row.append(sum(t[i, j] / total * (lse - l[i, j]) for j in cols))
    return np.mean(per_row) if per_row else 0.0


def _ref_pairs(l, t, m, term):
    per_row = []
    for i in range(l.shape[0]):
        cols = np.flatnonzero(m[i])
        vals = [term(l[i, j] - l[i, k], t[i, j] - t[i, k])
                for j, k in itertools.product(cols, cols) if t[i, j] > t[i, k]]
        if vals:
            per_row.append(np.mean(vals))
    return np.mean(per_row) if per_row else 0.0


def _ref_pairwise_bce(l, t, m):
    return _ref_pairs(l, t, m, lambda dl, dt: np.logaddexp(0.0, -dl))


def _ref_margin_mse(l, t, m):
    return _ref_pairs(l, t, m, lambda dl, dt: (dl - dt) ** 2)


REFS = {
    "bixse": _ref_bixse,
    "infonce": _ref_infonce,
    "graded_infonce": _ref_graded_infonce,
    "soft_infonce": _ref_soft_infonce,
    "pairwise_bce": _ref_pairwise_bce,
    "margin_mse": _ref_margin_mse,
}
NAMES = sorted(REFS)

# ---------------------------------------------------------------- inputs


def _inputs(seed, q, d, *, scale=3.0, extreme=False):
    """float32 logits, graded targets with 0s and ties, and a mask with one empty row."""
    rng = np.random.default_rng(seed)
    if extreme:
        logits = rng.choice([-1.0, 1.0], (q, d)) * rng.uniform(100, 1000, (q, d))
    else:
        logits = rng.normal(0.0, scale, (q, d))
    targets = rng.choice([0.0, 0.0, 0.25, 0.5, 0.5, 1.0], (q, d))
    mask = rng.random((q, d)) < 0.75
    if q > 1:
        mask[rng.integers(q)] = False
    return logits.astype(np.float32), targets.astype(np.float32), mask


def _ref(name, l, t, m):
    return REFS[name](l.astype(np.float64), t.astype(np.float64), m)


SHAPES = [(1, 1), (4, 4), (5, 7), (9, 3)]


@functools.cache
def _loss(name, **kw):
    """Jitted loss: whole-function compiles are far faster than eager op-by-op dispatch."""
    return jax.jit(functools.partial(LOSSES[name], **kw))


@functools.cache
def _grad(name):
    return jax.jit(jax.grad(LOSSES[name]))

# ---------------------------------------------------------------- tests


def test_registry():
    assert set(LOSSES) == set(REFS)
    assert LOSSES["bixse"] is bixse


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(name, shape):
    fn = _loss(name)
    for seed in range(3):
        l, t, m = _inputs(seed, *shape)
        got = fn(l, t, m)
        assert got.dtype == jnp.float32 and got.shape == ()
        np.testing.assert_allclose(got, _ref(name, l, t, m), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            fn(l, t, None), _ref(name, l, t, np.ones_like(m)), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_match_reference_with_finite_grads(name):
    l, t, m = _inputs(7, 6, 8, extreme=True)
    np.testing.assert_allclose(_loss(name)(l, t, m), _ref(name, l, t, m), rtol=1e-5, atol=1e-3)
    grad = np.asarray(_grad(name)(l, t, m))
    assert np.isfinite(grad).all()
    assert np.abs(grad).max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_masked_cells_get_exactly_zero_gradient(name):
    l, t, m = _inputs(3, 6, 5)
    # Garbage in masked cells must neither change the loss nor leak into gradients.
    l_bad = np.where(m, l, np.nan).astype(np.float32)
    l_bad[~m & (np.arange(5) % 2 == 0)] = np.inf
    np.testing.assert_allclose(
        _loss(name)(l_bad, t, m), _ref(name, l, t, m), rtol=1e-5, atol=1e-6
    )
    grad = np.asarray(_grad(name)(l_bad, t, m))
    assert (grad[~m] == 0.0).all()
    assert np.isfinite(grad).all() and np.abs(grad[m]).max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_batch_gives_zero_and_finite_grads(name):
    l, t, _ = _inputs(0, 3, 4)
    m = np.zeros_like(l, bool)
    assert float(_loss(name)(l, t, m)) == 0.0
    np.testing.assert_array_equal(_grad(name)(l, t, m), np.zeros_like(l))


def test_closed_forms_at_zero_logits():
    q, d = 3, 5
    zeros = np.zeros((q, d), np.float32)
    one_hot = np.eye(q, d, dtype=np.float32)
    graded = np.tile(np.linspace(0.0, 1.0, d, dtype=np.float32), (q, 1))
    np.testing.assert_allclose(_loss("bixse")(zeros, graded), d * np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(_loss("infonce")(zeros, one_hot), np.log(d), rtol=1e-6)
    np.testing.assert_allclose(_loss("soft_infonce")(zeros, graded), np.log(d), rtol=1e-6)
    np.testing.assert_allclose(_loss("pairwise_bce")(zeros, graded), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(_loss("margin_mse")(graded, graded), 0.0, atol=1e-7)
    # Margin-MSE at zero scores: mean over pairs of (t_j - t_k)^2 for the grid 0, .25, ..., 1.
    diffs = [(a - b) ** 2 for a in range(d) for b in range(d) if a > b]
    np.testing.assert_allclose(
        _loss("margin_mse")(zeros, graded), np.mean(diffs) / (d - 1) ** 2, rtol=1e-6
    )


def test_bixse_gradient_is_sigmoid_minus_target_over_rows():
    l, t, m = _inputs(11, 4, 6)
    n_rows = m.any(axis=1).sum()
    expected = np.where(m, (1.0 / (1.0 + np.exp(-l.astype(np.float64))) - t) / n_rows, 0.0)
    np.testing.assert_allclose(_grad("bixse")(l, t, m), expected, rtol=1e-5, atol=1e-7)


def test_infonce_one_positive_equals_optax():
    rng = np.random.default_rng(0)
    l = rng.normal(0.0, 4.0, (6, 9)).astype(np.float32)
    labels = rng.integers(0, 9, 6)
    t = np.zeros_like(l)
    t[np.arange(6), labels] = 1.0
    expected = optax.softmax_cross_entropy_with_integer_labels(l, labels).mean()
    np.testing.assert_allclose(_loss("infonce")(l, t), expected, rtol=1e-6)
    # With one-hot targets the soft-label and the grade-weighted losses are the same thing.
    np.testing.assert_allclose(_loss("soft_infonce")(l, t), expected, rtol=1e-6)
    np.testing.assert_allclose(_loss("graded_infonce")(l, t), expected, rtol=1e-6)


def test_graded_infonce_by_hand():
    """Two rows, logits 0 everywhere in row 0 (log-softmax = -log 3), row 1 its only positive graded 0.04."""
    l = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], np.float32)
    t = np.array([[1.0, 0.5, 0.0], [0.0, 0.04, 0.0]], np.float32)
    row0 = (1.0 + 0.5) * np.log(3.0) / 2  # two positives, weights 1 and 0.5
    row1 = 0.04 * (np.log(np.exp(2.0) + 2.0) - 0.0)  # one positive, weight 0.04
    np.testing.assert_allclose(_loss("graded_infonce")(l, t), (row0 + row1) / 2, rtol=1e-6)
    # The degenerate case: soft InfoNCE gives the 0.04 pair the whole row's mass, 25 times more.
    soft_row1 = np.log(np.exp(2.0) + 2.0)
    soft_row0 = (1.0 / 1.5 + 0.5 / 1.5) * np.log(3.0)
    np.testing.assert_allclose(_loss("soft_infonce")(l, t), (soft_row0 + soft_row1) / 2, rtol=1e-6)


def test_graded_infonce_is_infonce_on_binary_targets():
    for seed in range(3):
        l, t, m = _inputs(seed, 6, 7)
        binary = (t >= 0.5).astype(np.float32)
        np.testing.assert_allclose(_loss("graded_infonce")(l, binary, m), _loss("infonce")(l, binary, m), rtol=1e-6)
        np.testing.assert_allclose(_grad("graded_infonce")(l, binary, m), _grad("infonce")(l, binary, m),
                                   rtol=1e-5, atol=1e-7)


def test_infonce_threshold():
    l, t, m = _inputs(5, 5, 6)
    for thr in (0.25, 1.0):
        np.testing.assert_allclose(
            _loss("infonce", threshold=thr)(l, t, m),
            _ref_infonce(l.astype(np.float64), t.astype(np.float64), m, thr),
            rtol=1e-5,
        )


@pytest.mark.parametrize("name", ["pairwise_bce", "margin_mse"])
def test_pairwise_row_batching_is_equivalent(name):
    l, t, m = _inputs(2, 7, 5)
    np.testing.assert_allclose(
        _loss(name, batch_size=3)(l, t, m), _loss(name)(l, t, m), rtol=1e-6
    )


def test_row_sharded_logits_match_unsharded():
    # Training hands the losses a [B, B] matrix sharded by rows over the data axis.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    l, t, m = _inputs(4, 8, 8)
    rows = NamedSharding(mesh, P("data", None))
    sharded = [jax.device_put(x, rows) for x in (l, t, m)]
    for name in NAMES:
        np.testing.assert_allclose(
            jax.jit(LOSSES[name])(*sharded), _ref(name, l, t, m), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            jax.jit(jax.grad(LOSSES[name]))(*sharded), _grad(name)(l, t, m), rtol=1e-5, atol=1e-7
        )
