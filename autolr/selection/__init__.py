"""Pick the 1cycle learning-rate range from a range-test curve.

``select_lr(result, method)`` validates the curve once for every method
(raising `autolr.CurveError` with the cause and the remedy when it has no
usable structure), then applies one rule:

- ``"changepoint"`` (default, ours): Savitzky-Golay smoothing on a log10-LR
  grid, piecewise-linear regimes (plateau, descent, valley, divergence);
  max_lr at the divergence onset (Smith), min_lr where the descent
  starts; a confidence from the descent's depth over the noise and the fit.
- fastai's ``"valley"``, ``"steep"``, ``"minimum"``, ``"slide"`` and
  torch-lr-finder's ``"steepest"``, reproduced from their sources; they give
  one LR, used as max_lr with min_lr = max_lr / 25.

Warnings on the choice (low confidence, no divergence seen) are also emitted
with `warnings.warn`.

Example:
    >>> import numpy as np
    >>> from autolr import RangeTestResult, select_lr
    >>> lrs = np.logspace(-7, 1, 100)
    >>> x = np.log10(lrs)  # plateau, descent from 1e-5 to 1e-3, divergence past 0.1
    >>> loss = 2.3 - 0.9 * (1 + np.tanh(x + 4)) + np.where(x > -1, 10 ** (4 * (x + 1)) - 1, 0)
    >>> noise = 1 + 0.03 * np.random.default_rng(0).standard_normal(100)
    >>> result = RangeTestResult(lrs, loss * noise, stop_reason="completed")
    >>> choice = select_lr(result)
    >>> bool(1e-3 < choice.max_lr < 1e-1 and choice.min_lr < 1e-4), choice.confidence > 0.5
    (True, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from autolr.errors import ArgumentError
from autolr.results import LRChoice, RangeTestResult
from autolr.selection._changepoint import changepoint
from autolr.selection._curve import Curve, checked_curve, unresolved
from autolr.selection._fastai import minimum, slide, steep, valley
from autolr.selection._torch_lr_finder import steepest

_RULES: dict[str, Callable[..., LRChoice]] = {
    "changepoint": changepoint,
    "valley": valley,
    "steep": steep,
    "minimum": minimum,
    "slide": slide,
    "steepest": steepest,
}
METHODS: tuple[str, ...] = tuple(_RULES)


def select_lr(result: RangeTestResult, method: str = "changepoint", **options) -> LRChoice:
    """Pick ``max_lr`` and ``min_lr`` from ``result`` with the rule ``method``.

    ``options`` go to the rule, e.g. ``backoff=1.0`` (decades) for
    ``"changepoint"`` or ``skip_start=5`` for ``"steepest"``.
    Raises `autolr.CurveError` if the curve is unusable.
    """
    if method not in _RULES:
        raise ArgumentError(f"method must be one of {METHODS}, but got {method=}.")
    curve: Curve = checked_curve(result)
    choice = _RULES[method](curve, **options)
    for message in choice.warnings:
        warnings.warn(f"select_lr({method!r}): {message}", UserWarning, stacklevel=2)
    return choice


__all__ = ["METHODS", "select_lr", "unresolved"]
