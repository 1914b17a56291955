"""Our rule: read the regimes of the smoothed curve and pick between them.

1. Take the curve before it diverged (the shared validation finds where),
   resample it on a uniform log10-LR grid and clip isolated spikes: a
   blown-up loss would bend any smoother's end back into the valley.
2. Savitzky-Golay-smooth it (`autolr.smoothing`).
3. Fit continuous linear pieces (`autolr.changepoints`), label each piece
   flat, descent or rise by its slope, and merge neighbours with one label.
4. max_lr = ``backoff`` decades (default 0.55, chosen on the selection
   suite) below the divergence onset: where the first rise after the descent
   leaves the valley, else the last point before the loss diverged. Smith
   puts max_lr at the onset itself; on the suite that fails on the many
   models whose 1cycle runs break just past their best LR (fastai's
   ``minimum`` steps back a decade from the lowest loss for the same reason).
   min_lr = where the deepest descent starts (Smith's CLR base_lr): its
   steepest stretch, extended back to the plateau's level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autolr.changepoints import Segmentation, piecewise_linear
from autolr.errors import ArgumentError
from autolr.results import LRChoice
from autolr.selection._curve import ONE_CYCLE_DIV, Curve, running_median
from autolr.smoothing import POLYORDER, WINDOW_FRACTION, savgol_window, smooth_curve

# Decades from the divergence onset down to max_lr. Smith takes max_lr where the
# loss starts to rise; 1cycle's warm-up makes that LR trainable. On the selection
# benchmark (3 tasks x 5 range-test seeds, grid-interpolated accuracy) the mean
# regret was 0.24 / 0.52 / 0.89 / 1.77 pp at backoff 0 / 0.1 / 0.2 / 0.5, and the
# 1cycle grids only failed about a decade above the onset.
# max_lr = BACKOFF decades below the ANCHOR landmark of the smoothed curve.
# Chosen on the 18-task suite of benchmarks/selection.py (9 families; 1cycle
# grids 1e-5..10 at 4 per decade as the oracle), minimising the mean gap to
# the best grid LR in goal units (1 pp, 0.05 nats, 10 % MSE; capped at 50):
# - the divergence onset beat the smoothed minimum and the steepest descent
#   (onset: 3.06 goal units at 0.6, 3.25 at 0.5; minimum: 4.36 at its best);
# - leave-one-family-out, 8 of 9 folds chose onset and 0.55-0.6, and the held-out
#   mean was 6.0 against 3.0 in-sample: one family (a CNN without normalisation,
#   SGD) trains only 0.5 decade below its onset and fails above it;
# - one backoff per optimizer kind (SGD-like / adaptive) chose 0.6 / 0.55 and did
#   no better held-out (5.7), so one value serves both.
# Smith's rule (backoff 0) scored 9.45; 1cycle runs fail sharply past the best LR
# on 7 of the 18 tasks, which is what the backoff keeps away from.
ANCHOR = "onset"
ANCHORS = ("onset", "minimum", "steepest")
ANCHOR_NAMES = {
    "onset": "divergence onset",
    "minimum": "smoothed loss's lowest point",
    "steepest": "steepest descent",
}
BACKOFF = 0.55  # decades: max_lr = onset / 3.5
N_BKPS = 4  # plateau | descent | valley | divergence, plus one spare for a kinked descent
# A piece is a descent or a rise only if it moves the loss by >= STEP_TOL of the
# depth and >= NOISE_TOL sds of the smoothed noise, at >= SLOPE_TOL depths per
# decade; otherwise it is flat.
STEP_TOL = 0.1
NOISE_TOL = 3.0
SLOPE_TOL = 0.1
RISE_TOL = 0.1  # the loss has left the valley once it is this many depths above it
MIN_DIV = 4.0  # if the descent starts closer than this below max_lr, use max_lr / 25
# Descent depth / sd of the noise left after smoothing at which the noise term
# of confidence is 0.5. On seeded synthetic curves (20 seeds, 50-300 points)
# the picks' spread reached ~0.5 decade for min_lr and ~0.3 for max_lr at a
# depth of 7.7 (50 points), 8.2 (100) and 10.4 (300) smoothed-noise sds.
SNR_HALF = 9.0
LOW_CONFIDENCE = 0.5


@dataclass(frozen=True)
class Regime:
    kind: str  # "flat", "descent" or "rise"
    first: int  # grid index where it starts
    last: int  # grid index where it ends (the next regime's first)
    change: float  # smoothed loss at last minus at first


def regimes(
    y: np.ndarray, seg: Segmentation, step: float, depth: float, noise: float
) -> list[Regime]:
    """Label the linear pieces of ``seg`` and merge equal neighbours.

    ``step`` is the grid spacing in decades, ``noise`` the sd left in ``y``.
    """
    min_change = max(STEP_TOL * depth, NOISE_TOL * noise)
    merged: list[Regime] = []
    for first, last in seg.segments:
        change = float(y[last] - y[first])
        slope = change / ((last - first) * step)  # loss per decade
        kind = "flat"
        if abs(change) >= min_change and abs(slope) >= SLOPE_TOL * depth:
            kind = "descent" if change < 0 else "rise"
        if merged and merged[-1].kind == kind:
            prev = merged.pop()
            first, change = prev.first, prev.change + change
        merged.append(Regime(kind, first, last, change))
    return merged


def descent_start(grid: np.ndarray, y: np.ndarray, descent: Regime) -> float:
    """log10 LR where the line through the descent's middle half meets the level above it.

    A line fitted to many points moves less with noise than the knot itself.
    """
    level, drop = y[descent.first], y[descent.first] - y[descent.last]
    span = np.arange(descent.first, descent.last + 1)
    middle = span[(y[span] <= level - 0.25 * drop) & (y[span] >= level - 0.75 * drop)]
    if len(middle) < 3:
        return float(grid[descent.first])
    slope, intercept = np.polyfit(grid[middle], y[middle], 1)
    if slope >= 0:
        return float(grid[descent.first])
    return float(np.clip((level - intercept) / slope, grid[0], grid[descent.last]))


def last_in_valley(y: np.ndarray, descent: Regime, rise: Regime | None, tol: float) -> int:
    """The last point within ``tol`` of the valley after ``descent``.

    The valley's level is the median of the smoothed loss from the descent's
    end to the rise's start (its minimum would sit noise-low). Taking the last
    such point, not the first one above, skips bumps the loss comes back from.
    """
    end = rise.first if rise is not None else len(y) - 1
    valley = float(np.median(y[descent.last : end + 1]))
    inside = np.flatnonzero(y[descent.last :] <= valley + tol)
    return descent.last + int(inside[-1]) if len(inside) else descent.last


def divergence_evidence(curve: Curve, *, rose: bool) -> str | None:
    """What marks the divergence onset, or None if the sweep never diverged."""
    if rose:
        return "where the loss starts to rise"
    if curve.diverged_at is not None:
        return "the last LR before the loss diverged"
    if curve.nonfinite_lr is not None:
        return "the last LR before the loss became NaN/inf"
    return None


def noise_confidence(snr: float) -> float:
    """0.5 at ``SNR_HALF``, ~0.9 at twice that, ~0.1 at half of it."""
    return 1.0 / (1.0 + (SNR_HALF / max(snr, 1e-12)) ** 3)


def fit_confidence_r2(r2: float) -> float:
    """1 when the linear pieces explain >= 95% of the smoothed curve, 0 at <= 80%."""
    return float(np.clip((r2 - 0.8) / 0.15, 0.0, 1.0))


@dataclass(frozen=True, eq=False)
class Landmarks:
    """Where the smoothed curve's features sit, in log10 LR, and the evidence for them."""

    grid: np.ndarray  # the uniform log10-LR grid
    y: np.ndarray  # the smoothed loss on it
    regimes: tuple[Regime, ...]
    descent: Regime  # the deepest descent
    found_descent: bool  # False: no piece fell steeply enough; highest-to-lowest is used
    onset: float  # the divergence onset: the last point in the valley
    onset_from: str | None  # what marks it, None if the sweep never diverged
    minimum: float  # the smoothed loss's lowest point
    steepest: float  # the steepest point of the descent
    start: float  # where the descent starts (min_lr's anchor)
    snr: float  # descent depth / sd of the noise left after smoothing
    r2: float  # share of the smoothed curve the linear pieces explain

    def at(self, anchor: str) -> float:
        return {"onset": self.onset, "minimum": self.minimum, "steepest": self.steepest}[anchor]


def landmarks(
    curve: Curve,
    *,
    n_bkps: int = N_BKPS,
    window_fraction: float = WINDOW_FRACTION,
    polyorder: int = POLYORDER,
) -> Landmarks:
    """Smooth the curve before its divergence, find its regimes and read its landmarks."""
    lrs, losses = curve.lrs[curve.stable], curve.losses[curve.stable]
    # A spike above every 5-point median is one bad batch, not the curve.
    losses = np.minimum(losses, running_median(losses).max())
    sm = smooth_curve(
        lrs, losses, window=savgol_window(len(lrs), window_fraction), polyorder=polyorder
    )
    grid, y = sm.log_lrs, sm.smoothed
    i_min = int(np.argmin(y))
    depth = float(y[: i_min + 1].max() - y[i_min])
    seg = piecewise_linear(y, n_bkps)
    found = regimes(y, seg, sm.step, depth, sm.smoothed_noise)
    descents = [r for r in found if r.kind == "descent"]
    if descents:
        descent = min(descents, key=lambda r: r.change)
    else:
        top = int(np.argmax(y[: i_min + 1]))
        descent = Regime("descent", top, i_min, float(y[i_min] - y[top]))
    rises = [r for r in found if r.kind == "rise" and r.first >= descent.last]
    tol = max(RISE_TOL * depth, NOISE_TOL * sm.smoothed_noise)
    last = last_in_valley(y, descent, rises[0] if rises else None, tol)
    slope = np.gradient(y, grid)
    i_steep = descent.first + int(
        np.argmin(slope[descent.first : max(descent.last, descent.first + 1)])
    )
    return Landmarks(
        grid=grid,
        y=y,
        regimes=tuple(found),
        descent=descent,
        found_descent=bool(descents),
        onset=float(grid[last]),
        onset_from=divergence_evidence(curve, rose=last < len(y) - 1),
        minimum=float(grid[i_min]),
        steepest=float(grid[i_steep]),
        start=descent_start(grid, y, descent),
        snr=-descent.change / max(sm.smoothed_noise, 1e-12 * max(depth, 1.0)),
        r2=seg.r2,
    )


# 8 keywords: the curve and the rule's constants, each exposed so the selection benchmark
# can tune them leave-one-family-out and a user can override them by name.
def changepoint(
    curve: Curve,
    *,
    anchor: str = ANCHOR,
    backoff: float = BACKOFF,
    n_bkps: int = N_BKPS,
    window_fraction: float = WINDOW_FRACTION,
    polyorder: int = POLYORDER,
    min_div: float = MIN_DIV,
    fallback_div: float = ONE_CYCLE_DIV,
) -> LRChoice:
    """Pick max_lr ``backoff`` decades below the ``anchor`` landmark and min_lr
    where the descent starts, from the regimes of the smoothed curve."""
    if anchor not in ANCHORS or backoff < 0 or n_bkps < 1 or min_div <= 1 or fallback_div <= 1:
        raise ArgumentError(
            f"need anchor in {ANCHORS}, backoff >= 0 (decades), n_bkps >= 1, min_div > 1 and "
            f"fallback_div > 1, but got {anchor=}, {backoff=}, {n_bkps=}, {min_div=}, "
            f"{fallback_div=}."
        )
    marks = landmarks(curve, n_bkps=n_bkps, window_fraction=window_fraction, polyorder=polyorder)
    grid, y, descent = marks.grid, marks.y, marks.descent
    warnings: list[str] = []
    if curve.weak is not None:
        warnings.append(curve.weak)
    if not marks.found_descent:
        warnings.append(
            "no piece of the curve falls steeply enough to be a descent; the pick uses "
            "the highest and lowest points instead: check the curve's plot."
        )
    onset_from = marks.onset_from
    if onset_from is None:
        onset_from = "the end of the sweep (no divergence)"
        warnings.append(
            f"the loss never rose before the sweep ended at lr={10**marks.onset:.3g}: max_lr "
            f"may be too low; raise end_lr to see where it diverges."
        )

    # Never above the divergence onset, whatever the anchor says.
    log_max = min(marks.at(anchor) - backoff, marks.onset)
    log_min = marks.start
    min_from = "where the descent starts"
    if descent.first == 0:
        min_from = "the sweep's start (the descent was already under way)"
    if log_max - log_min < np.log10(min_div):
        log_min = log_max - np.log10(fallback_div)
        min_from = f"max_lr/{fallback_div:g} (the descent starts too close below max_lr)"

    confidence = noise_confidence(marks.snr) * fit_confidence_r2(marks.r2)
    if marks.onset_from is None:
        confidence *= 0.8  # where it would diverge, and so max_lr's anchor, is a guess
    if not marks.found_descent or curve.weak is not None:
        confidence = min(confidence, 0.3)
    if confidence < LOW_CONFIDENCE:
        warnings.append(
            f"low confidence ({confidence:.2f}): the descent is {marks.snr:.1f}x the noise sd "
            f"and the piecewise-linear fit explains {100 * marks.r2:.0f}% of the smoothed "
            f"curve; check the plot, or rerun with more iterations or a larger batch."
        )
    reason = (
        f"max_lr {backoff:.2g} decades below the {ANCHOR_NAMES[anchor]} "
        f"(lr={10 ** marks.at(anchor):.3g}); divergence onset at {onset_from} "
        f"(lr={10**marks.onset:.3g}); min_lr at {min_from} (lr={10**log_min:.3g})."
    )
    return LRChoice(
        max_lr=float(10**log_max),
        min_lr=float(10**log_min),
        confidence=float(confidence),
        method="changepoint",
        reason=reason,
        log_lrs=grid,
        smoothed=y,
        changepoints=tuple(float(10 ** grid[r.first]) for r in marks.regimes[1:]),
        warnings=tuple(warnings),
    )
