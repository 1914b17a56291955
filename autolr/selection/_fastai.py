"""fastai's LR-finder suggestions: valley, steep, minimum and slide.

Re-implemented from fastai's ``fastai/callback/schedule.py`` (``valley``,
``steep``, ``minimum``, ``slide``, ``Learner.lr_find``) and the ``Recorder`` /
``AvgSmoothLoss`` of ``fastai/learner.py``, to compare our rule with theirs on
the same curves:

- fastai records a debiased EMA of the batch loss, beta=0.98
  (``val = lerp(loss, val, beta)``, reported as ``val / (1 - beta**count)``);
- ``lr_find`` keeps ``recorder.lrs[num_it//10:-5]`` (``num_it`` is the planned
  number of iterations, not the number run), then cuts at the first NaN;
- each suggestion then reads that trimmed, smoothed curve.

Our curves are cut at the first NaN/inf before the EMA (by the shared
validation); fastai's own finder stops once the smoothed loss exceeds 4x its
best, so it never keeps an infinite loss either.
"""

from __future__ import annotations

import numpy as np

from autolr.errors import CurveError
from autolr.results import LRChoice
from autolr.selection._curve import RECOMMENDED_ITERS, Curve, peer_choice

BETA = 0.98  # fastai Recorder's AvgSmoothLoss default
SKIP_END = 5  # points lr_find drops from the end


def debiased_ema(losses: np.ndarray, beta: float = BETA) -> np.ndarray:
    """fastai's ``AvgSmoothLoss``: an EMA started at 0 and divided by ``1 - beta**count``."""
    out = np.empty_like(losses)
    value = 0.0
    for i, loss in enumerate(losses):
        value = beta * value + (1.0 - beta) * loss
        out[i] = value / (1.0 - beta ** (i + 1))
    return out


def trimmed(curve: Curve, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``lr_find``'s view of the curve: smoothed, then ``[num_it//10 : -5]``."""
    smoothed = debiased_ema(curve.losses, beta)
    lrs, losses = (
        curve.lrs[curve.num_iter // 10 : -SKIP_END],
        smoothed[curve.num_iter // 10 : -SKIP_END],
    )
    if len(lrs) < 2:
        raise CurveError(
            f"fastai's trimming [num_iter//10 : -{SKIP_END}] leaves {len(lrs)} of "
            f"{len(curve.lrs)} points (num_iter={curve.num_iter}): run the sweep to its "
            f"end or with more iterations."
        )
    return lrs, losses


def valley(curve: Curve, *, beta: float = BETA) -> LRChoice:
    """fastai ``valley``: 2/3 of the way down the longest decreasing run of losses.

    The "run" is the longest strictly decreasing subsequence (not necessarily
    contiguous); fastai takes the index ``start + int(len/3) + int(len/3/2)``,
    with ``start = end - length`` as in its source.
    """
    lrs, losses = trimmed(curve, beta)
    n = len(losses)
    longest = np.ones(n, dtype=int)  # longest decreasing subsequence ending at i
    max_start = max_end = 0
    for i in range(1, n):
        higher = losses[:i] > losses[i]
        if higher.any():
            longest[i] = longest[:i][higher].max() + 1
        if longest[i] > longest[max_end]:
            max_end, max_start = i, i - longest[i]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return peer_choice("valley", "fastai valley", float(lrs[idx]), lrs, losses)


def steep(curve: Curve, *, beta: float = BETA) -> LRChoice:
    """fastai ``steep``: the LR where d loss / d ln(lr) is most negative.

    The finite difference between points i and i+1 is credited to lrs[i].
    """
    lrs, losses = trimmed(curve, beta)
    grads = np.diff(losses) / np.diff(np.log(lrs))
    return peer_choice("steep", "fastai steep", float(lrs[np.argmin(grads)]), lrs, losses)


def minimum(curve: Curve, *, beta: float = BETA) -> LRChoice:
    """fastai ``minimum``: a tenth of the LR at the lowest smoothed loss."""
    lrs, losses = trimmed(curve, beta)
    lr = float(lrs[np.argmin(losses)]) / 10.0
    return peer_choice("minimum", "fastai minimum (lr at min / 10)", lr, lrs, losses)


def slide(
    curve: Curve,
    *,
    beta: float = BETA,
    lr_diff: int = 15,
    thresh: float = 0.005,
    adjust_value: float = 1.0,
) -> LRChoice:
    """fastai ``slide``: slide a window of ``lr_diff`` points down from the end.

    It moves left while the gradients (per index, in loss units) at the
    window's two ends differ by more than ``thresh``, and suggests the LR at the
    window's left end, times ``adjust_value``.
    """
    lrs, losses = trimmed(curve, beta)
    if len(losses) <= lr_diff:
        raise CurveError(
            f"fastai slide needs more than lr_diff={lr_diff} points after trimming, but "
            f"got {len(losses)}: run more iterations (num_iter >= {RECOMMENDED_ITERS})."
        )
    grads = np.gradient(losses)
    right, left = -1, -1 - lr_diff
    local_min_lr = lrs[left]
    while left >= -len(losses) and abs(grads[right] - grads[left]) > thresh:
        local_min_lr = lrs[left]
        right, left = right - 1, left - 1
    lr = float(local_min_lr) * adjust_value
    return peer_choice("slide", "fastai slide", lr, lrs, losses)
