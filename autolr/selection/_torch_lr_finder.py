"""torch-lr-finder's suggestion: the steepest gradient.

Re-implemented from ``torch_lr_finder/lr_finder.py`` (``LRFinder.range_test``
and ``LRFinder.plot(suggest_lr=True)``):

- ``range_test`` smooths the loss as it goes with ``smooth_f=0.05``:
  ``loss = smooth_f * loss + (1 - smooth_f) * previous``, the first loss kept
  as is (no debiasing);
- ``plot`` drops ``skip_start=10`` points from the start and ``skip_end=5``
  from the end, and suggests the LR at ``np.gradient(losses).argmin()``.

``np.gradient`` differentiates over the index, not over lr or log(lr): on an
exponential sweep that is d loss / d log(lr) up to a constant, on a linear one
d loss / d lr. We keep that, as their users get it.
"""

from __future__ import annotations

import numpy as np

from autolr.errors import ArgumentError, CurveError
from autolr.results import LRChoice
from autolr.selection._curve import Curve, peer_choice

SMOOTH_F = 0.05  # range_test's default smoothing factor
SKIP_START = 10  # plot's defaults, in points
SKIP_END = 5


def running_average(losses: np.ndarray, smooth_f: float = SMOOTH_F) -> np.ndarray:
    """torch-lr-finder's in-loop EMA: weight ``smooth_f`` on the new loss."""
    out = np.empty_like(losses)
    out[0] = losses[0]
    for i in range(1, len(losses)):
        out[i] = smooth_f * losses[i] + (1.0 - smooth_f) * out[i - 1]
    return out


def steepest(
    curve: Curve,
    *,
    smooth_f: float = SMOOTH_F,
    skip_start: int = SKIP_START,
    skip_end: int = SKIP_END,
) -> LRChoice:
    """torch-lr-finder: the LR at the most negative ``np.gradient`` of the trimmed curve."""
    if not 0.0 <= smooth_f < 1.0 or skip_start < 0 or skip_end < 0:
        raise ArgumentError(
            f"need 0 <= smooth_f < 1, skip_start >= 0 and skip_end >= 0, but got "
            f"{smooth_f=}, {skip_start=}, {skip_end=}."
        )
    losses = running_average(curve.losses, smooth_f) if smooth_f > 0 else curve.losses
    stop = len(losses) - skip_end
    lrs, losses = curve.lrs[skip_start:stop], losses[skip_start:stop]
    if len(losses) < 2:
        raise CurveError(
            f"torch-lr-finder's trimming (skip_start={skip_start}, skip_end={skip_end}) leaves "
            f"{len(losses)} of {len(curve.lrs)} points, too few for a gradient: run more "
            f"iterations."
        )
    lr = float(lrs[np.argmin(np.gradient(losses))])
    return peer_choice("steepest", "torch-lr-finder steepest gradient", lr, lrs, losses)
