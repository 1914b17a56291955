"""The validation every rule starts from, and helpers the rules share.

`checked_curve` turns a `RangeTestResult` into the finite part of its curve, or
raises `CurveError` naming the cause and the remedy: NaN/inf from the first
steps, too few points, divergence at once, a flat curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter

from autolr._checks import mad_sd
from autolr.errors import CurveError
from autolr.results import LRChoice, RangeTestResult

# The changepoint rule fits up to 5 linear pieces of >= 3 points; below 20
# points there is no room for a plateau, a descent and a rise.
MIN_POINTS = 20
RECOMMENDED_ITERS = 100  # what the error messages suggest: ~12 points per decade over 8
# A change of the loss counts only if it beats 4 noise sds: on flat noisy
# curves of 20-300 points (1000 seeded trials each) the drop of a 5-point
# running median exceeded 3.3-3.7 sds in 5% of them, 4.3-5.1 in 1%.
# Shallower descents are rejected as flat; a flat curve that slips through
# gets ~0 confidence from the changepoint rule (its piecewise-linear fit is
# poor). The test reads the loss's changes, never its level, so a constant
# added to the loss changes nothing; the only level-relative floor is
# float32 rounding (a loss of 50 is stored to ~4e-6): changes below
# FLAT_PRECISION of the loss's magnitude are no changes. Dropping the former
# floor of 2% of the level changed the outcome (error, weak or clear descent)
# of none of the 108 benchmark curves (benchmarks/results/selection/curves.jsonl).
FLAT_NOISE = 4.0
FLAT_PRECISION = 1e-5
# Past its lowest point, a loss that has risen back by a quarter of the
# descent's depth, and by 3 noise sds (a 5-point median's own sd is ~0.5),
# has diverged: the points from there on are cut before smoothing.
DIVERGED_RISE = 0.25
DIVERGED_NOISE = 3.0
ONE_CYCLE_DIV = 25.0
# The adaptive range test extends a sweep until the descent is resolved: at
# least RESOLVED_POINTS points on it, and its drop RESOLVED_SNR times the
# standard error of a mean over those points (noise / sqrt(points)).
RESOLVED_POINTS = 12
RESOLVED_SNR = 20.0  # torch's OneCycleLR div_factor: initial_lr = max_lr / 25


@dataclass(frozen=True, eq=False)
class Curve:
    """The finite, checked part of a range-test curve.

    ``lrs`` are positive and strictly increasing. ``diverged_at`` is the index
    of the first point where the loss had diverged (see ``DIVERGED_RISE``; the
    last point if the range test stopped on divergence), None if it never
    did; ``nonfinite_lr`` the LR of the first NaN/inf loss, where the sweep hit
    one (the curve stops before it); ``noise`` a robust sd of the
    point-to-point noise, in loss units; ``weak`` what makes the descent hard
    to see (a warning for the rules), None if it is clear.
    """

    lrs: np.ndarray
    losses: np.ndarray
    num_iter: int  # the sweep's planned length (fastai trims by it)
    diverged_at: int | None
    nonfinite_lr: float | None
    noise: float
    weak: str | None = None  # why the descent is hard to see, if it is

    @property
    def stable(self) -> slice:
        """The points before the divergence."""
        return slice(0, self.diverged_at)


@dataclass(frozen=True)
class Profile:
    """Robust landmarks of a loss curve, read off a 5-point running median."""

    i_min: int  # index of the lowest point
    i_top: int  # index of the highest point before it
    bottom: float  # the lowest loss
    drop: float  # highest loss before the lowest point, minus bottom
    rise: float  # highest loss after the lowest point, minus bottom
    noise: float  # point-to-point noise sd, from second differences


def running_median(values: np.ndarray) -> np.ndarray:
    """5-point running median: one or two outlier batches do not move it."""
    return median_filter(values, size=5, mode="nearest")


def profile(losses: np.ndarray) -> Profile:
    median = running_median(losses)
    i_min = int(np.argmin(median))
    bottom = float(median[i_min])
    # Second differences cancel the curve's local slope; var = 6 sd^2 for white noise.
    curvature = np.diff(losses, n=2)
    noise = mad_sd(curvature) / np.sqrt(6.0)
    i_top = int(np.argmax(median[: i_min + 1]))
    drop = float(median[i_top]) - bottom
    rise = float(median[i_min:].max()) - bottom
    return Profile(i_min, i_top, bottom, drop, rise, noise)


def unresolved(result: RangeTestResult) -> str | None:
    """Why a sweep with more iterations would show the descent better, or None.

    Used by the adaptive range test: more points per decade put more points on
    a descent, and more points average more noise away.
    """
    keep = result.lrs > 0
    losses = result.losses[keep]
    bad = np.flatnonzero(~np.isfinite(losses))
    n = int(bad[0]) if len(bad) else len(losses)
    if n < MIN_POINTS:
        return f"{n} finite points before the loss diverged, < {MIN_POINTS}"
    prof = profile(losses[:n])
    points = prof.i_min - prof.i_top
    if points < RESOLVED_POINTS:
        return f"{points} points on the descent, < {RESOLVED_POINTS}"
    snr = prof.drop / max(prof.noise, 1e-12) * np.sqrt(points)
    if snr < RESOLVED_SNR:
        return f"the descent is {snr:.1f} standard errors deep, < {RESOLVED_SNR:g}"
    return None


def is_small(change: float, level: float, noise: float) -> bool:
    """Whether a change of the loss is within its noise (or float rounding at ``level``)."""
    return change < max(FLAT_NOISE * noise, FLAT_PRECISION * abs(level))


def checked_curve(result: RangeTestResult, *, min_points: int = MIN_POINTS) -> Curve:
    """The finite part of ``result``'s curve, or `CurveError` if it is unusable."""
    lrs, losses, nonfinite_lr = finite_prefix(result, min_points)
    prof = profile(losses)
    weak = check_descent(lrs, losses, prof)
    ceiling = prof.bottom + max(DIVERGED_RISE * prof.drop, DIVERGED_NOISE * prof.noise)
    above = np.flatnonzero(running_median(losses)[prof.i_min :] > ceiling)
    diverged_at = prof.i_min + int(above[0]) if len(above) else None
    if diverged_at is None and result.stop_reason == "diverged" and nonfinite_lr is None:
        diverged_at = len(losses) - 1  # the range test's own criterion stopped it here
    if diverged_at is not None and diverged_at < min_points // 2:
        raise CurveError(
            f"the loss diverged after {diverged_at} steps (lr={lrs[diverged_at]:.3g}), too "
            f"few to see a descent before it: lower start_lr, or run more iterations "
            f"(num_iter >= {RECOMMENDED_ITERS})."
        )
    return Curve(
        lrs=lrs,
        losses=losses,
        num_iter=result.num_iter if result.num_iter > 0 else len(result.losses),
        diverged_at=diverged_at,
        nonfinite_lr=nonfinite_lr,
        noise=prof.noise,
        weak=weak,
    )


def finite_prefix(
    result: RangeTestResult, min_points: int
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """lrs and losses up to the first NaN/inf loss, and that loss's LR (None if none)."""
    negative = np.flatnonzero(result.lrs < 0)
    if negative.size:
        first = float(result.lrs[negative[0]])
        raise CurveError(
            f"the range test's lrs must be >= 0, but {negative.size} are negative "
            f"(the first is {first:.3g}): pass the learning rates themselves, not their logs."
        )
    if not (np.all(np.isfinite(result.lrs)) and np.all(np.diff(result.lrs) > 0)):
        raise CurveError(
            "the range test's lrs must be finite and strictly increasing, but they are not: "
            "pass the lrs of one increasing sweep."
        )
    keep = result.lrs > 0  # a linear sweep may start at lr=0, which has no log
    lrs, losses = result.lrs[keep], result.losses[keep]
    bad = np.flatnonzero(~np.isfinite(losses))
    n = int(bad[0]) if len(bad) else len(losses)
    if n < min_points and len(bad):
        raise CurveError(
            f"the loss was NaN/inf from step {n} (lr={lrs[n]:.3g}) on, leaving {n} finite "
            f"points where >= {min_points} are needed: lower start_lr, and check the model "
            f"and data (inputs normalized, loss computed on logits, labels in range)."
        )
    planned = result.num_iter  # 0: not recorded (a hand-built result)
    if n < min_points and result.stop_reason == "diverged" and n > planned // 2 > 0:
        # Past half its planned steps: the sweep was too short, not start_lr too high.
        raise CurveError(
            f"the range test diverged after {n} of its num_iter={planned} steps "
            f"(lr={lrs[n - 1]:.3g}), but a pick needs >= {min_points} points: run more "
            f"iterations (num_iter >= {RECOMMENDED_ITERS})."
        )
    if n < min_points and result.stop_reason == "diverged":
        raise CurveError(
            f"the range test diverged at once, after {n} steps (lr={lrs[n - 1]:.3g}), where "
            f">= {min_points} points are needed: lower start_lr."
        )
    if n < min_points:
        raise CurveError(
            f"the curve has {n} finite points, but >= {min_points} are needed: run more "
            f"iterations (num_iter >= {RECOMMENDED_ITERS})."
        )
    return lrs[:n], losses[:n], float(lrs[n]) if len(bad) else None


def check_descent(lrs: np.ndarray, losses: np.ndarray, prof: Profile) -> str | None:
    """What is weak about the curve's descent (None: nothing), or `CurveError`.

    Only a curve with no information raises: a loss that never moves beyond
    its noise, or one that rose from the sweep's first tenth without falling
    first. A descent within the noise followed by a divergence still says where
    the loss blew up, so it comes back as a weakness for the rule to warn about.
    """
    if np.ptp(losses) == 0:
        raise CurveError(
            f"the loss never changed (it was {losses[0]:.6g} at every step): check that the "
            f"optimizer holds the model's parameters and that they require grad."
        )
    level = prof.bottom + prof.drop
    if not is_small(prof.drop, level, prof.noise):
        return None
    rose = not is_small(prof.rise, level, prof.noise)
    if rose and prof.i_min <= len(lrs) // 10:
        raise CurveError(
            f"the loss rose from lr={lrs[prof.i_min]:.3g} on, in the sweep's first tenth, "
            f"without falling first (divergence at once): lower start_lr."
        )
    if not rose:
        raise CurveError(
            f"the curve is flat: the loss moved by {max(prof.drop, prof.rise):.3g} at most over "
            f"lr {lrs[0]:.3g}..{lrs[-1]:.3g}, within its noise (sd {prof.noise:.3g}): "
            f"widen the range (raise end_lr); if noise hides the descent, run more "
            f"iterations or use a larger batch."
        )
    return (
        f"the loss fell by {prof.drop:.3g} at most over lr {lrs[0]:.3g}..{lrs[prof.i_min]:.3g} "
        f"before it diverged, within its noise (sd {prof.noise:.3g}): the pick rests "
        f"on where it diverged; run more iterations or use a larger batch to see the descent."
    )


def peer_choice(
    method: str, rule: str, lr: float, lrs: np.ndarray, smoothed: np.ndarray
) -> LRChoice:
    """An `LRChoice` around a peer rule's single suggestion.

    The peers suggest one LR; we use it as max_lr and, like torch's OneCycleLR
    default, min_lr = max_lr / 25. Their confidence is fixed at 1.0: the rules
    have no notion of one, and the shared validation has already rejected
    curves with no usable structure.
    """
    return LRChoice(
        max_lr=float(lr),
        min_lr=float(lr) / ONE_CYCLE_DIV,
        confidence=1.0,
        method=method,
        reason=f"{rule}: max_lr={lr:.3g}, min_lr=max_lr/{ONE_CYCLE_DIV:g}.",
        log_lrs=np.log10(lrs),
        smoothed=np.asarray(smoothed, dtype=np.float64),
    )
