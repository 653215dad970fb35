"""The step's cell metrics against numpy, and their sums' independence of how cells are blocked."""

import jax.numpy as jnp
import numpy as np

from bixse_jax import cell_stats


def _cells(seed=0, shape=(6, 10)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, shape).astype(np.float32)
    labelled = rng.random(shape) < 0.2
    targets = np.where(labelled, rng.choice([0.0, 0.25, 1.0], shape), 0.0).astype(np.float32)
    mask = rng.random(shape) < 0.9
    return logits, targets, labelled, mask


def test_means_equal_numpy():
    logits, targets, labelled, mask = _cells()
    got = cell_stats.means(cell_stats.block_sums(*map(jnp.asarray, (logits, targets, labelled, mask))))
    sigmoid = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    lab, neg = labelled & mask, mask & ~labelled
    want = {"positive_logit": logits[lab & (targets > 0)].mean(), "negative_logit": logits[neg].mean(),
            "labelled_prob": sigmoid[lab].mean(), "labelled_target": targets[lab].mean(),
            "negative_prob": sigmoid[neg].mean()}
    assert set(got) == set(cell_stats.NAMES) == set(want)
    for k in want:
        np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-5, err_msg=k)
    assert want["labelled_prob"] != want["labelled_target"]  # the two means measure different things


def test_sums_of_blocks_equal_the_whole():
    cells = [jnp.asarray(x) for x in _cells(1, (8, 12))]
    whole = cell_stats.means(cell_stats.block_sums(*cells))
    halves = cell_stats.add(cell_stats.block_sums(*(x[:3] for x in cells)),
                            cell_stats.block_sums(*(x[3:] for x in cells)))
    for k, v in cell_stats.means(cell_stats.add(cell_stats.zeros(), halves)).items():
        np.testing.assert_allclose(float(v), float(whole[k]), rtol=1e-6, err_msg=k)
