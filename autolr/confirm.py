"""Confirm the curve's pick by training: the pick times each LR scale, the best kept.

A curve alone cannot know what the training budget does to the best LR: on the
selection suite the best 1cycle max_lr sits from 0.3 decade above to 1.0 decade
below the divergence onset, and no landmark of the curve predicts where, so the
curve-only pick is 3.6 goal units from the grid's best held out (worst task 21).
The pipeline validates its pick with Ray Tune trials; `confirm_lr` is the same
validation for the user's own training code, in this process and without Ray:
one training run at the pick times each of ``scales``, then, when the best of
them trained at an edge scale, one run a step past that edge.

Example:
    >>> import math
    >>> from autolr import LRChoice, confirm_lr
    >>> choice = LRChoice(max_lr=0.01, min_lr=0.0004, confidence=0.9, method="changepoint",
    ...                   reason="from the curve")
    >>> def fit(max_lr, min_lr):  # the user's 1cycle run; returns the val accuracy
    ...     return 0.9 - 0.1 * (math.log10(max_lr) + 1.5) ** 2
    >>> confirmed = confirm_lr(choice, fit, higher_is_better=True, progress=False)
    >>> round(confirmed.max_lr, 4), round(confirmed.scale, 2), len(confirmed.trials)
    (0.033, 3.3, 9)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from tqdm import tqdm

from autolr.config import LR_SCALES
from autolr.errors import ArgumentError, TrainingDivergedError
from autolr.results import ConfirmedLR, LRChoice, LRTrial

log = logging.getLogger(__name__)


def beyond_edge(scales: Sequence[float], best: float) -> float | None:
    """The scale one step of the scales' spacing past ``best``, or None if ``best`` is
    inside the range (rounded to 2 significant digits, as the scales are written)."""
    low, high = sorted(scales)[:2], sorted(scales)[-2:]
    if best == high[1]:
        return float(f"{best * best / high[0]:.2g}")
    if best == low[0]:
        return float(f"{best * best / low[1]:.2g}")
    return None


def edge_step(
    scales: Sequence[float], ended: list[tuple[float, float, bool]], higher_is_better: bool
) -> float | None:
    """The scale past the edge, given the first trials' ``(scale, metric, full budget)``:
    their best among those that ran the full budget (else among all that reported a
    finite metric; a failed trial reports NaN) decides; None when it is inside."""
    scored = [e for e in ended if math.isfinite(e[1])]
    full = [e for e in scored if e[2]] or scored
    if not full:
        return None
    sign = 1.0 if higher_is_better else -1.0
    return beyond_edge(scales, max(full, key=lambda e: sign * e[1])[0])


def confirm_lr(
    choice: LRChoice,
    train: Callable[[float, float], float],
    *,
    higher_is_better: bool,
    scales: Sequence[float] = LR_SCALES,
    extend_at_edge: bool = True,
    progress: bool = True,
) -> ConfirmedLR:
    """Train at ``choice``'s range times each of ``scales`` and keep the best.

    ``train(max_lr, min_lr)`` runs the user's whole 1cycle training from a fresh
    model and returns its validation metric (``higher_is_better`` says which way
    is better: True for accuracy, False for a loss). A run that raises
    `autolr.TrainingDivergedError` or returns NaN/inf counts as failed; any other
    exception is the caller's and propagates. The runs go from the pick outwards,
    so an interrupted confirmation has tried the likeliest LRs. Cost: one training
    per scale, plus one past the edge when the best lies on it (10 with the
    default 9 scales at most). Raises `autolr.TrainingDivergedError` if every run
    failed.
    """
    if not isinstance(choice, LRChoice):
        raise ArgumentError(f"choice must be an LRChoice (from select_lr), but got {choice!r}.")
    if not callable(train):
        raise ArgumentError(f"train must be a callable (max_lr, min_lr) -> metric, got {train!r}.")
    if not isinstance(higher_is_better, bool):
        raise ArgumentError(f"higher_is_better must be True or False, but got {higher_is_better=}.")
    scales = tuple(scales)
    if not scales or any(not (0 < s < math.inf) for s in scales) or len(set(scales)) < len(scales):
        raise ArgumentError(f"scales must be distinct finite factors > 0, but got {scales=}.")

    order = sorted(scales, key=lambda s: abs(math.log(s)))
    bar = tqdm(total=len(order), desc="confirm_lr", disable=None if progress else True)
    trials: list[LRTrial] = []
    sign = 1.0 if higher_is_better else -1.0

    def run(scale: float) -> None:
        trials.append(_trial(choice, train, scale))
        scored = [t.metric for t in trials if math.isfinite(t.metric)]
        best = max(scored, key=lambda m: sign * m) if scored else math.nan
        bar.set_postfix(max_lr=f"{trials[-1].max_lr:.3g}", best=f"{best:.4g}")
        bar.update()

    with bar:
        for scale in order:
            run(scale)
        past = None
        if extend_at_edge and len(scales) > 1:
            past = edge_step(scales, [(t.scale, t.metric, True) for t in trials], higher_is_better)
        if past is not None:
            bar.total += 1
            log.info("the best run trained at an edge LR scale; one more tries %g", past)
            run(past)

    scored = [t for t in trials if math.isfinite(t.metric)]
    if not scored:
        raise TrainingDivergedError(
            f"every one of the {len(trials)} confirmation runs failed (max_lr "
            f"{min(t.max_lr for t in trials):.3g} to {max(t.max_lr for t in trials):.3g}); "
            f"check train() on the pick alone, or rerun the range test with a smaller end_lr."
        )
    best = max(scored, key=lambda t: sign * t.metric)
    failed = len(trials) - len(scored)
    reason = (
        f"of {len(trials)} training runs at the curve's pick times {len(scales)} scales"
        + (f" and one past the edge ({past:g})" if past is not None else "")
        + f", scale {best.scale:g} (max_lr={best.max_lr:.3g}) gave the best metric "
        f"{best.metric:.4g}" + (f"; {failed} failed" if failed else "") + "."
    )
    return ConfirmedLR(
        max_lr=best.max_lr,
        min_lr=best.min_lr,
        scale=best.scale,
        metric=best.metric,
        trials=tuple(trials),
        choice=choice,
        reason=reason,
    )


def _trial(choice: LRChoice, train: Callable[[float, float], float], scale: float) -> LRTrial:
    max_lr, min_lr = choice.max_lr * scale, choice.min_lr * scale
    try:
        value = train(max_lr, min_lr)
    except TrainingDivergedError as exc:
        log.info("max_lr=%.3g diverged: %s", max_lr, exc)
        value = math.nan
    try:
        if isinstance(value, bool):
            raise TypeError
        metric = float(value)  # a number, numpy scalar or one-element tensor
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentError(
            f"train(max_lr, min_lr) must return the run's validation metric as a number, "
            f"but returned {value!r}."
        ) from None
    return LRTrial(scale=scale, max_lr=max_lr, min_lr=min_lr, metric=metric)
