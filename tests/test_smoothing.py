"""Savitzky-Golay smoothing on a uniform log10-LR grid."""

from __future__ import annotations

import numpy as np
import pytest

from autolr.smoothing import savgol_window, smooth_curve, uniform_log_grid


@pytest.mark.parametrize("n", [5, 6, 20, 30, 100, 101, 300])
def test_the_window_is_odd_about_a_fifth_of_the_curve_and_fits_in_it(n):
    window = savgol_window(n)
    assert window % 2 == 1
    assert 5 <= window <= n
    if n >= 30:
        assert abs(window - 0.2 * n) <= 1


def test_a_too_short_curve_or_a_bad_fraction_is_rejected():
    with pytest.raises(ValueError, match="n must be >= 5"):
        savgol_window(4)
    with pytest.raises(ValueError, match="fraction must be in"):
        savgol_window(100, fraction=0.0)
    lrs = np.geomspace(1e-5, 1.0, 50)
    with pytest.raises(ValueError, match="window must be odd"):
        smooth_curve(lrs, np.ones(50), window=10)


def test_an_exponential_sweep_keeps_its_points_on_the_grid():
    lrs = np.geomspace(1e-6, 1.0, 40)
    losses = np.linspace(3.0, 1.0, 40)
    grid, resampled = uniform_log_grid(lrs, losses)
    assert np.allclose(grid, np.log10(lrs))
    assert np.allclose(resampled, losses)


def test_a_linear_sweep_is_resampled_evenly_in_log_lr():
    lrs = np.linspace(1e-3, 1.0, 50)
    losses = -np.log10(lrs)  # linear in log10(lr), so interpolation is exact
    grid, resampled = uniform_log_grid(lrs, losses)
    assert np.allclose(np.diff(grid), np.diff(grid)[0])
    assert grid[0] == pytest.approx(-3.0) and grid[-1] == pytest.approx(0.0)
    assert np.allclose(resampled, -grid)


def test_decreasing_lrs_are_rejected():
    with pytest.raises(ValueError, match="strictly increasing"):
        uniform_log_grid(np.array([1e-3, 1e-4, 1e-2]), np.ones(3))


def test_a_parabola_passes_unchanged_so_the_valley_does_not_shift():
    # Zero phase and exact for quadratics: the minimum stays where it is,
    # where an EMA would drag it to higher LRs.
    lrs = np.geomspace(1e-5, 1.0, 80)
    x = np.log10(lrs)
    losses = 0.3 * (x + 2.0) ** 2 + 1.0
    curve = smooth_curve(lrs, losses)
    assert np.allclose(curve.smoothed, losses)
    assert curve.log_lrs[np.argmin(curve.smoothed)] == pytest.approx(-2.0, abs=0.05)


def test_smoothing_halves_the_error_of_a_noisy_curve():
    rng = np.random.default_rng(0)
    lrs = np.geomspace(1e-7, 1.0, 100)
    truth = 2.3 - 0.9 * (1.0 + np.tanh(np.log10(lrs) + 4.0))
    noisy = truth + 0.1 * rng.standard_normal(100)
    curve = smooth_curve(lrs, noisy)
    raw_rmse = np.sqrt(np.mean((noisy - truth) ** 2))
    smooth_rmse = np.sqrt(np.mean((curve.smoothed - truth) ** 2))
    assert smooth_rmse < 0.5 * raw_rmse
    assert curve.noise == pytest.approx(0.1, rel=0.25)


def test_the_smoothed_noise_matches_what_is_left_of_white_noise():
    rng = np.random.default_rng(1)
    lrs = np.geomspace(1e-7, 1.0, 300)
    noise = rng.standard_normal((200, 300))
    left = np.std([smooth_curve(lrs, row).smoothed[100:200] for row in noise])
    curve = smooth_curve(lrs, noise[0])
    assert curve.smoothed_noise == pytest.approx(left, rel=0.2)
