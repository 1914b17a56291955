"""The continuous piecewise-linear fit over ruptures."""

from __future__ import annotations

import numpy as np
import pytest

from autolr.changepoints import piecewise_linear


def test_the_knots_of_a_piecewise_linear_signal_are_recovered():
    x = np.arange(90.0)
    knots = (0, 30, 60, 89)  # flat, falling, flat
    signal = np.interp(x, knots, [2.0, 2.0, 0.5, 0.5])
    seg = piecewise_linear(signal, n_bkps=2)
    assert seg.knots == pytest.approx(knots, abs=1)
    assert seg.r2 > 0.999
    assert seg.segments == list(zip(seg.knots[:-1], seg.knots[1:], strict=True))


@pytest.mark.parametrize("n", [150, 300])
def test_long_signals_are_subsampled_but_still_fit_closely(n):
    x = np.linspace(0.0, 1.0, n)
    signal = np.interp(x, [0.0, 0.4, 0.7, 1.0], [2.0, 2.0, 0.5, 1.5])
    seg = piecewise_linear(signal, n_bkps=3)
    assert seg.r2 > 0.99
    assert np.max(np.abs(seg.fitted - signal)) < 0.1


def test_a_short_signal_gets_fewer_pieces():
    seg = piecewise_linear(np.linspace(0.0, 1.0, 7), n_bkps=4)
    assert len(seg.knots) <= 3
    with pytest.raises(ValueError, match=">= 6 samples"):
        piecewise_linear(np.ones(5), n_bkps=1)
