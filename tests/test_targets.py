"""graded_targets / loss_mask against a brute-force triple loop, and on a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bixse_jax.targets import graded_targets, loss_mask


def brute_force_targets(q, d, g):
    """The target matrix by its definition, in numpy (float64 in, float64 out; float32 otherwise)."""
    b = len(q)
    t = np.zeros((b, b), np.float64 if np.asarray(g).dtype == np.float64 else np.float32)
    lab = np.zeros((b, b), bool)
    for i in range(b):
        for j in range(b):
            for k in range(b):
                if q[k] == q[i] and d[k] == d[j]:
                    t[i, j] = max(t[i, j], g[k]) if lab[i, j] else g[k]
                    lab[i, j] = True
    return t, lab


def _random_batch(rng, b, n_ids=4):
    q = rng.integers(0, n_ids, b).astype(np.int32)
    d = rng.integers(0, n_ids, b).astype(np.int32)
    g = rng.choice([0.0, 0.25, 0.5, 1.0], b).astype(np.float32)
    return q, d, g


def test_tricky_duplicate_labels_off_diagonal_cell():
    # Pairs (q1,d1),(q2,d2),(q1,d3),(q3,d3): cell (0, 3) is (q1, d3), judged via pair 2.
    q = np.array([1, 2, 1, 3], np.int32)
    d = np.array([1, 2, 3, 3], np.int32)
    g = np.array([1.0, 0.5, 0.75, 0.25], np.float32)
    t, lab = graded_targets(q, d, g)
    assert bool(lab[0, 3]) and float(t[0, 3]) == 0.75
    assert bool(lab[3, 2]) and float(t[3, 2]) == 0.25  # (q3, d3) via pair 3.
    assert not bool(lab[0, 1]) and float(t[0, 1]) == 0.0
    np.testing.assert_array_equal(np.diag(np.asarray(t)), g)
    t_ref, lab_ref = brute_force_targets(q, d, g)
    np.testing.assert_array_equal(np.asarray(lab), lab_ref)
    np.testing.assert_array_equal(np.asarray(t), t_ref)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_with_many_duplicates(seed):
    rng = np.random.default_rng(seed)
    q, d, g = _random_batch(rng, 12)
    t, lab = jax.jit(graded_targets)(q, d, g)
    t_ref, lab_ref = brute_force_targets(q, d, g)
    assert t.dtype == jnp.float32 and lab.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(lab), lab_ref)
    np.testing.assert_array_equal(np.asarray(t), t_ref)
    assert np.asarray(lab).sum() > 12  # The random batch really exercises duplicates.


def test_duplicate_pair_takes_max_grade_in_any_order():
    q = np.array([5, 5, 7], np.int32)
    d = np.array([9, 9, 8], np.int32)
    for grades in ([0.2, 0.9, 1.0], [0.9, 0.2, 1.0]):
        t, lab = graded_targets(q, d, np.array(grades, np.float32))
        np.testing.assert_allclose(np.asarray(t)[:2, :2], 0.9)
        assert np.asarray(lab)[:2, :2].all()
        assert not np.asarray(lab)[0, 2] and not np.asarray(lab)[2, 0]


def test_zero_grade_pair_is_labelled():
    t, lab = graded_targets(np.array([0, 1], np.int32), np.array([0, 1], np.int32),
                            np.array([0.0, 1.0], np.float32))
    np.testing.assert_array_equal(np.asarray(lab), np.eye(2, dtype=bool))
    np.testing.assert_array_equal(np.asarray(t), np.diag([0.0, 1.0]))


def test_sharded_jit_equals_unsharded():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.size == 8
    rng = np.random.default_rng(0)
    q, d, g = _random_batch(rng, 16)
    sharding = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, sharding) for x in (q, d, g)]
    t, lab = jax.jit(graded_targets)(*args)
    t_ref, lab_ref = graded_targets(q, d, g)
    np.testing.assert_array_equal(np.asarray(t), np.asarray(t_ref))
    np.testing.assert_array_equal(np.asarray(lab), np.asarray(lab_ref))
    np.testing.assert_array_equal(np.asarray(lab), brute_force_targets(q, d, g)[1])


def test_loss_mask_flag():
    q = np.array([0, 0, 1, 2], np.int32)
    d = np.array([0, 1, 2, 3], np.int32)
    _, lab = graded_targets(q, d, np.ones(4, np.float32))
    assert np.asarray(loss_mask(q, lab, False)).all()
    mask = np.asarray(jax.jit(loss_mask, static_argnums=2)(q, lab, True))
    # Rows 0 and 1 share query 0: only its judged docs (columns 0 and 1) stay.
    expected = np.array(
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], bool
    )
    np.testing.assert_array_equal(mask, expected)


def test_memory_is_quadratic_not_cubic():
    b = 32
    q, d, g = _random_batch(np.random.default_rng(0), b)
    jaxpr = jax.make_jaxpr(graded_targets)(q, d, g).jaxpr
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars]
    assert max(sizes) <= b * b
