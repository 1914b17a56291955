"""Regime boundaries of a smoothed curve: a thin wrapper over ruptures.

The smoothed loss vs log10(lr) is approximated by a continuous piecewise-linear
function (ruptures' ``"clinear"`` cost, solved exactly by dynamic programming);
its knots are where the curve changes regime (plateau, descent, valley,
divergence). The signal must be sampled on a uniform grid, since the cost
measures slopes per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import ruptures as rpt

from autolr.errors import ArgumentError

MAX_POINTS = 100  # Dynp is O(n^2) segment costs: subsample longer signals to ~this many ends


@dataclass(frozen=True, eq=False)
class Segmentation:
    """A continuous piecewise-linear fit of a signal.

    ``knots`` are the sample indices where the linear pieces meet, first and
    last sample included; ``fitted`` is the fit on every sample and ``r2`` its
    coefficient of determination.
    """

    knots: tuple[int, ...]
    fitted: np.ndarray
    r2: float

    @property
    def segments(self) -> list[tuple[int, int]]:
        """``(first, last)`` sample index of each linear piece."""
        return list(pairwise(self.knots))


def piecewise_linear(signal: np.ndarray, n_bkps: int, *, min_size: int = 3) -> Segmentation:
    """Fit ``n_bkps + 1`` continuous linear pieces to ``signal`` (ruptures Dynp, exact).

    Fewer pieces are fitted when the signal is too short for ``n_bkps`` of at
    least ``min_size`` samples each.
    """
    signal = np.asarray(signal, dtype=np.float64)
    n = len(signal)
    if n_bkps < 0 or min_size < 3:
        raise ArgumentError(f"need n_bkps >= 0 and min_size >= 3, but got {n_bkps=}, {min_size=}.")
    if n < 2 * min_size:
        raise ArgumentError(f"signal must have >= {2 * min_size} samples, but got {n}.")
    n_bkps = min(n_bkps, n // min_size - 1)
    if n_bkps > 0:
        algo = rpt.Dynp(model="clinear", min_size=min_size, jump=math.ceil(n / MAX_POINTS))
        ends = algo.fit(signal).predict(n_bkps=n_bkps)
    else:
        ends = [n]
    # ruptures' clinear piece [start, end) runs from sample start-1 to end-1.
    knots = (0, *(end - 1 for end in ends))
    fitted = np.interp(np.arange(n), knots, signal[list(knots)])
    total = float(np.sum((signal - signal.mean()) ** 2))
    r2 = 1.0 - float(np.sum((signal - fitted) ** 2)) / total if total > 0 else 1.0
    return Segmentation(knots, fitted, r2)
