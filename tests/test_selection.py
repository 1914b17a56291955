"""select_lr on seeded synthetic range-test curves with known regimes.

Every curve has a plateau up to ``lr_a``, a descent from ``lr_a`` to ``lr_b``,
a flat valley, and a divergence past ``lr_c`` (by default the loss's excess
grows 10x per quarter decade). The sweep stops at the first loss above 4x
the best so far.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from autolr import CurveError, LRChoice, RangeTestResult, select_lr
from autolr.selection import METHODS
from autolr.selection._changepoint import BACKOFF
from autolr.selection._curve import checked_curve
from autolr.selection._fastai import debiased_ema, valley
from autolr.selection._torch_lr_finder import running_average, steepest

PLATEAU, VALLEY = 2.3, 0.5  # loss levels: ln(10) for 10 classes, then trained


def true_loss(log_lr, a=-5.0, b=-3.0, c=-1.0, plateau=PLATEAU, valley=VALLEY, rise=0.25):
    """The noise-free curve; a, b, c are log10 of lr_a, lr_b, lr_c; past c the
    loss's excess over the valley grows 10x every ``rise`` decades."""
    t = np.clip((log_lr - a) / max(b - a, 1e-9), 0.0, 1.0)
    loss = plateau - (plateau - valley) * (1.0 - np.cos(np.pi * t)) / 2.0
    excess = (plateau - valley) * (10.0 ** ((log_lr - c) / rise) - 1.0)
    return loss + np.where(log_lr > c, excess, 0.0)


def synthetic(
    *,
    a=-5.0,
    b=-3.0,
    c=-1.0,
    n=100,
    noise=0.03,
    additive=0.0,
    seed=0,
    mode="exp",
    start_lr=1e-7,
    end_lr=10.0,
    plateau=PLATEAU,
    valley=VALLEY,
    rise=0.25,
) -> RangeTestResult:
    """A range test's result: multiplicative ``noise`` and ``additive`` noise (sds)."""
    rng = np.random.default_rng(seed)
    if mode == "exp":
        lrs = np.geomspace(start_lr, end_lr, n)
    else:
        lrs = np.linspace(start_lr, end_lr, n)
    with np.errstate(divide="ignore"):  # a linear sweep may start at lr=0
        loss = true_loss(np.log10(lrs), a, b, c, plateau, valley, rise)
    loss = loss * (1.0 + noise * rng.standard_normal(n)) + additive * rng.standard_normal(n)
    best = np.minimum.accumulate(loss)
    over = np.flatnonzero(loss > 4.0 * best)
    stop = int(over[0]) + 1 if len(over) else n
    return RangeTestResult(
        lrs[:stop],
        loss[:stop],
        stop_reason="diverged" if len(over) else "completed",
        mode=mode,
        start_lr=start_lr,
        end_lr=end_lr,
        num_iter=n,
    )


def quiet_select(result: RangeTestResult, method: str = "changepoint", **options) -> LRChoice:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return select_lr(result, method, **options)


def decades(lr: float) -> float:
    return float(np.log10(lr))


# --- our rule on known curves ---------------------------------------------------


@pytest.mark.parametrize("noise", [0.0, 0.03, 0.1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_changepoint_max_lr_lies_between_descent_end_and_divergence(noise, seed):
    choice = select_lr(synthetic(noise=noise, seed=seed))
    # The good band: the loss is low (past lr_b = 1e-3) and not yet rising
    # (up to lr_c = 1e-1); by default max_lr sits BACKOFF decades below lr_c.
    assert 1e-3 <= choice.max_lr <= 10**-0.9
    assert abs(decades(choice.max_lr) - (-1.0 - BACKOFF)) < 0.25
    assert choice.confidence > 0.8
    assert choice.warnings == ()


@pytest.mark.parametrize("noise", [0.0, 0.03, 0.1])
def test_changepoint_min_lr_is_near_where_the_descent_starts(noise):
    choice = select_lr(synthetic(noise=noise, seed=3))
    assert abs(decades(choice.min_lr) - (-5.0)) <= 0.5
    assert 0 < choice.min_lr < choice.max_lr


@pytest.mark.parametrize("rise", [0.25, 1.5])  # a sharp and a gradual divergence
def test_changepoint_picks_are_stable_across_noise_seeds(rise):
    picks = [quiet_select(synthetic(noise=0.05, rise=rise, seed=s)) for s in range(10)]
    assert np.std([decades(c.max_lr) for c in picks]) < 0.1
    assert np.std([decades(c.min_lr) for c in picks]) < 0.2


@pytest.mark.parametrize("n", [30, 60, 100, 300])
def test_changepoint_handles_curves_of_30_to_300_points(n):
    choice = select_lr(synthetic(n=n, noise=0.03))
    assert 1e-3 <= choice.max_lr <= 10**-0.9
    assert abs(decades(choice.min_lr) - (-5.0)) <= 0.5


def test_a_v_shaped_curve_puts_max_lr_at_its_bottom_not_past_it():
    choice = select_lr(synthetic(a=-4.5, b=-2.0, c=-2.0, noise=0.03))
    assert 10**-3.0 <= choice.max_lr <= 10**-1.9


def test_backoff_sets_how_many_decades_max_lr_sits_below_the_divergence():
    result = synthetic(noise=0.03)
    near, far = select_lr(result, backoff=0.25), select_lr(result, backoff=1.0)
    assert decades(near.max_lr) - decades(far.max_lr) == pytest.approx(0.75, abs=0.05)


def test_a_curve_that_never_diverges_still_gives_a_pick_with_a_warning():
    result = synthetic(c=3.0, noise=0.03)  # divergence far past end_lr = 10
    assert result.stop_reason == "completed"
    with pytest.warns(UserWarning, match="never rose"):
        choice = select_lr(result)
    assert 1e-3 <= choice.max_lr <= 10.0
    assert abs(decades(choice.min_lr) - (-5.0)) <= 0.5
    assert choice.confidence <= 0.8
    assert any("raise end_lr" in w for w in choice.warnings)


def test_a_curve_with_no_plateau_starts_min_lr_at_the_sweep_start():
    choice = select_lr(synthetic(a=-8.0, b=-4.0, c=-2.0, noise=0.03))
    assert decades(choice.min_lr) <= -6.5  # the descent began before the sweep
    assert 10**-4.0 <= choice.max_lr <= 10**-1.9


def test_a_linear_sweep_is_resampled_on_a_uniform_log_grid():
    result = synthetic(a=-2.0, b=-1.0, c=-0.3, mode="linear", start_lr=1e-4, end_lr=1.0)
    choice = select_lr(result)
    steps = np.diff(choice.log_lrs)
    assert np.allclose(steps, steps[0])
    assert 10**-1.0 <= choice.max_lr < 10**-0.3
    assert abs(decades(choice.min_lr) - (-2.0)) <= 0.5


def test_a_linear_sweep_starting_at_zero_drops_the_zero_lr():
    result = synthetic(a=-2.0, b=-1.0, c=-0.3, mode="linear", start_lr=0.0, end_lr=1.0)
    choice = select_lr(result)
    assert choice.log_lrs[0] == pytest.approx(np.log10(result.lrs[1]))


def test_a_nan_at_the_end_marks_the_divergence():
    clean = synthetic(c=3.0, noise=0.03)
    losses = clean.losses.copy()
    losses[80:] = np.nan  # the sweep blew up at lr = clean.lrs[80]
    result = RangeTestResult(clean.lrs, losses, stop_reason="nonfinite")
    choice = select_lr(result)
    assert choice.max_lr < clean.lrs[80]
    assert "NaN/inf" in choice.reason


def test_the_choice_carries_the_curve_and_the_regime_boundaries():
    result = synthetic(noise=0.03)
    choice = select_lr(result)
    assert choice.log_lrs.shape == choice.smoothed.shape
    assert choice.log_lrs[0] == pytest.approx(-7.0)
    assert all(isinstance(lr, float) for lr in choice.changepoints)
    assert list(choice.changepoints) == sorted(choice.changepoints)
    # The descent starts and ends near lr_a = 1e-5 and lr_b = 1e-3.
    logs = np.log10(choice.changepoints)
    assert np.min(np.abs(logs - (-5.0))) < 0.5
    assert np.min(np.abs(logs - (-3.0))) < 0.5


def borderline(seed: int) -> RangeTestResult:
    """A shallow descent (2.3 to 2.0) under additive noise of sd 0.1."""
    return synthetic(plateau=2.3, valley=2.0, noise=0.0, additive=0.1, seed=seed)


def test_a_borderline_curve_gets_low_confidence_and_a_warning():
    with pytest.warns(UserWarning, match="low confidence"):
        choice = select_lr(borderline(seed=2))
    assert choice.confidence < 0.5
    assert 0 < choice.min_lr < choice.max_lr


def test_borderline_curves_are_mostly_low_confidence_and_each_low_one_warns():
    choices = []
    for seed in range(10):
        try:
            choices.append(quiet_select(borderline(seed)))
        except CurveError as error:  # at this depth some draws look flat
            assert "flat" in str(error)
    assert len(choices) >= 7
    assert np.median([c.confidence for c in choices]) < 0.5
    for choice in choices:
        assert (choice.confidence < 0.5) == any("low confidence" in w for w in choice.warnings)


def test_warnings_are_emitted_and_kept_on_the_choice():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = select_lr(synthetic(c=3.0))
    assert len(choice.warnings) == len(caught) >= 1
    assert all(w in str(c.message) for w, c in zip(choice.warnings, caught, strict=True))


# --- every method ---------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_a_valid_choice_on_a_clean_curve(method):
    result = synthetic(noise=0.03)
    choice = quiet_select(result, method)
    assert choice.method == method
    assert 0 < choice.min_lr < choice.max_lr
    assert result.lrs[0] / 25 <= choice.min_lr and choice.max_lr <= result.lrs[-1]
    assert 0.0 <= choice.confidence <= 1.0
    assert choice.reason
    assert choice.log_lrs.shape == choice.smoothed.shape and len(choice.log_lrs) > 0
    # Every rule should land somewhere in the descent or the valley.
    assert 10**-5.5 <= choice.max_lr < 1e-1


def unusable_curves():
    lrs = np.geomspace(1e-7, 10.0, 100)
    rng = np.random.default_rng(0)
    flat = 2.3 * (1.0 + 0.01 * rng.standard_normal(100))
    nan_early = flat.copy()
    nan_early[3:] = np.nan
    rising = 2.3 * 1.05 ** np.arange(100.0)
    return {
        "nan from the start": (
            RangeTestResult(lrs, nan_early, stop_reason="nonfinite"),
            ["NaN/inf", "lower start_lr", "check the model"],
        ),
        "flat": (
            RangeTestResult(lrs, flat, stop_reason="completed"),
            ["flat", "raise end_lr", "more iterations"],
        ),
        "too few points": (
            RangeTestResult(lrs[:12], flat[:12], stop_reason="completed"),
            ["12 finite points", "num_iter >= 100"],
        ),
        "diverged after a few steps": (
            RangeTestResult(lrs[:8], rising[:8], stop_reason="diverged"),
            ["diverged at once", "lower start_lr"],
        ),
        "rising from the start": (
            RangeTestResult(lrs, rising, stop_reason="completed"),
            ["divergence at once", "lower start_lr"],
        ),
    }


def test_a_curve_that_diverges_without_a_visible_descent_gets_a_low_confidence_pick():
    # The tanh-MLP and ViT curves of the selection issue: a descent within the
    # noise, then a clear blow-up. That is information: the pick sits below it.
    lrs = np.geomspace(1e-7, 10.0, 100)
    flat = 2.3 * (1.0 + 0.01 * np.random.default_rng(0).standard_normal(100))
    losses = np.concatenate([flat[:60], 2.3 * 1.1 * 1.05 ** np.arange(40.0)])
    with pytest.warns(UserWarning, match="before it diverged"):
        choice = select_lr(RangeTestResult(lrs, losses, "completed"))
    assert choice.confidence <= 0.3
    assert choice.max_lr <= lrs[60] and 0 < choice.min_lr < choice.max_lr
    assert any("more iterations" in w for w in choice.warnings)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(unusable_curves()))
def test_unusable_curves_raise_curve_error_with_cause_and_remedy(method, case):
    result, phrases = unusable_curves()[case]
    with pytest.raises(CurveError) as caught:
        select_lr(result, method)
    for phrase in phrases:
        assert phrase in str(caught.value)


@pytest.mark.parametrize("shift", [-10.0, 50.0])
def test_a_constant_added_to_the_loss_does_not_change_the_pick(shift):
    # A descent of 0.97 is clear at any level: at +50 it is under 2% of the level,
    # which once made it "flat".
    base = synthetic(plateau=1.0, valley=0.03, c=2.0, noise=0.0, additive=0.005)
    assert base.stop_reason == "completed"
    shifted = RangeTestResult(base.lrs, base.losses + shift, stop_reason="completed", num_iter=100)
    expected, choice = quiet_select(base), quiet_select(shifted)
    assert choice.max_lr == pytest.approx(expected.max_lr, rel=1e-9)
    assert choice.min_lr == pytest.approx(expected.min_lr, rel=1e-9)
    assert choice.confidence == pytest.approx(expected.confidence, rel=1e-9)


def test_decreasing_lrs_are_rejected():
    result = RangeTestResult(np.geomspace(10.0, 1e-7, 50), np.ones(50), stop_reason="completed")
    with pytest.raises(CurveError, match="strictly increasing"):
        select_lr(result)


def test_an_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="changepoint") as caught:
        select_lr(synthetic(), "fastest")
    assert "steepest" in str(caught.value) and "fastest" in str(caught.value)


def test_invalid_rule_options_are_rejected():
    with pytest.raises(ValueError, match="backoff >= 0"):
        select_lr(synthetic(), backoff=-1.0)


# --- the peers, against their sources --------------------------------------------


def fastai_valley_literal(losses):
    """fastai's valley loop, transcribed literally: the reference for ours."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


@pytest.mark.parametrize("seed", range(5))
def test_valley_matches_fastais_double_loop(seed):
    result = synthetic(noise=0.05, seed=seed)
    curve = checked_curve(result)
    smoothed = debiased_ema(curve.losses)[10:-5]  # num_iter // 10 = 10
    lrs = curve.lrs[10:-5]
    assert valley(curve).max_lr == pytest.approx(lrs[fastai_valley_literal(list(smoothed))])


def test_fastai_ema_is_debiased_and_torch_lr_finder_ema_is_not():
    constant = np.full(20, 3.0)
    assert np.allclose(debiased_ema(constant), 3.0)  # no pull towards the zero start
    losses = np.array([4.0, 2.0, 2.0])
    assert running_average(losses) == pytest.approx([4.0, 3.9, 3.805])


def test_fastai_minimum_is_a_tenth_of_the_lr_at_the_lowest_smoothed_loss():
    result = synthetic(noise=0.0)
    choice = select_lr(result, "minimum")
    curve = checked_curve(result)
    smoothed = debiased_ema(curve.losses)[10:-5]
    assert choice.max_lr == pytest.approx(curve.lrs[10:-5][np.argmin(smoothed)] / 10)
    assert choice.min_lr == pytest.approx(choice.max_lr / 25)


def test_steepest_differentiates_over_the_index_after_skipping_10_and_5_points():
    # On a linear sweep a loss linear in log(lr) falls fastest per index at the
    # lowest lr kept, though per log(lr) it falls equally everywhere.
    lrs = np.linspace(0.01, 1.0, 40)
    losses = 3.0 - np.log10(lrs)
    losses[:10] = 50.0  # skipped: the drop from here would be the steepest
    result = RangeTestResult(lrs, losses, stop_reason="completed", mode="linear")
    choice = steepest(checked_curve(result), smooth_f=0.0)
    assert choice.max_lr == pytest.approx(lrs[10])
    assert choice.confidence == 1.0


def test_negative_lrs_are_named_not_taken_for_too_few_iterations():
    log_lrs = np.linspace(-7.0, 1.0, 100)  # logs of the lrs, not the lrs
    result = RangeTestResult(log_lrs, np.ones(100), stop_reason="completed")
    with pytest.raises(CurveError, match="lrs must be >= 0, but 87 are negative") as caught:
        select_lr(result)
    assert "more iterations" not in str(caught.value)


def test_non_increasing_lrs_are_named():
    lrs = np.r_[np.geomspace(1e-7, 1e-3, 50), np.zeros(50)]  # a sweep padded with zeros
    result = RangeTestResult(lrs, np.ones(100), stop_reason="completed")
    with pytest.raises(CurveError, match="strictly increasing"):
        select_lr(result)


def test_a_sweep_planned_too_short_is_not_said_to_diverge_at_once():
    # num_iter=20 stopped at its 19th step: the sweep was too short, not the start_lr too high.
    lrs, losses = np.geomspace(1e-5, 1.0, 20)[:19], np.r_[np.linspace(2.0, 1.0, 17), 3.0, 9.0]
    result = RangeTestResult(lrs, losses, stop_reason="diverged", num_iter=20)
    with pytest.raises(CurveError, match="diverged after 19 of its num_iter=20") as caught:
        select_lr(result)
    assert "at once" not in str(caught.value) and "num_iter >= 100" in str(caught.value)
