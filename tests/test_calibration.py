"""Calibration metrics (ECE, Brier, reliability bins) and Platt scaling, on numbers worked by hand."""

import numpy as np
import pytest

from bixse_jax.eval import calibration


def test_ece_and_brier_by_hand():
    """15 bins of width 1/15: 0.10 and 0.11 share bin 1, 0.9 is in bin 13.
    ECE = 2/3 |0.105 - 0.25| + 1/3 |0.9 - 1| = 0.13; Brier = (0.01 + 0.1521 + 0.01) / 3."""
    p, y = np.array([0.10, 0.11, 0.9]), np.array([0.0, 0.5, 1.0])
    assert calibration.expected_calibration_error(p, y) == pytest.approx(0.13, abs=1e-12)
    assert calibration.brier_score(p, y) == pytest.approx(0.1721 / 3, abs=1e-12)
    bins = calibration.reliability(p, y)
    assert len(bins) == 15 and [b["count"] for b in bins if b["count"]] == [2, 1]
    assert bins[1]["mean_probability"] == pytest.approx(0.105) and bins[1]["mean_target"] == pytest.approx(0.25)
    assert bins[13]["low"] == pytest.approx(13 / 15) and bins[0]["mean_target"] is None


def test_edges_zero_and_one_fall_in_the_first_and_last_bins():
    bins = calibration.reliability(np.array([0.0, 1.0, 1 / 15]), np.array([0.0, 1.0, 0.0]))
    assert bins[0]["count"] == 1 and bins[14]["count"] == 1 and bins[1]["count"] == 1
    assert calibration.expected_calibration_error(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0.0


def test_calibrated_samples_have_small_ece_and_a_shifted_copy_its_shift():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.2, 0.8, 200_000)
    y = (rng.uniform(size=p.shape) < p).astype(float)
    assert calibration.expected_calibration_error(p, y) < 0.01
    # Every prediction 0.1 too high: each bin's gap is 0.1 (up to sampling noise).
    assert calibration.expected_calibration_error(p + 0.1, y) == pytest.approx(0.1, abs=0.01)


def test_platt_recovers_a_known_map():
    rng = np.random.default_rng(1)
    s = rng.uniform(-0.3, 1.0, 20_000)
    a, c = calibration.fit_platt(s, calibration.sigmoid(7.0 * s - 3.0))
    assert (a, c) == pytest.approx((7.0, -3.0), rel=1e-6)
    labels = (rng.uniform(size=s.shape) < calibration.sigmoid(7.0 * s - 3.0)).astype(float)
    a, c = calibration.fit_platt(s, labels)
    assert a == pytest.approx(7.0, rel=0.1) and c == pytest.approx(-3.0, rel=0.1)


def test_plot_writes_a_png(tmp_path):
    p, y = np.array([0.1, 0.5, 0.9]), np.array([0.0, 1.0, 1.0])
    calibration.plot(tmp_path / "r.png", {"model": calibration.report(p, y)}, "title")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
