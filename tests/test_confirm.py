"""autolr.confirm_lr: the curve's pick confirmed by training, in this process.

Most tests train a stand-in whose metric is a known function of the LR, so the
answer is known; the last trains a real model with a real 1cycle loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autolr import (
    ArgumentError,
    ConfirmedLR,
    LRChoice,
    TrainingDivergedError,
    confirm_lr,
    range_test,
    select_lr,
)
from autolr.config import LR_SCALES

PICK = LRChoice(max_lr=0.01, min_lr=0.0004, confidence=0.9, method="changepoint", reason="test")


def peaked_at(best_lr: float):
    """A stand-in training run whose accuracy peaks at ``best_lr``; records its calls."""
    calls: list[tuple[float, float]] = []

    def train(max_lr: float, min_lr: float) -> float:
        calls.append((max_lr, min_lr))
        return 0.9 - 0.1 * (math.log10(max_lr) - math.log10(best_lr)) ** 2

    return train, calls


def test_the_best_scale_wins_and_both_ends_of_the_range_scale_with_it():
    train, calls = peaked_at(0.03)
    confirmed = confirm_lr(PICK, train, higher_is_better=True, progress=False)
    assert isinstance(confirmed, ConfirmedLR)
    assert confirmed.scale == 3.3 and confirmed.max_lr == pytest.approx(0.033)
    assert confirmed.min_lr == pytest.approx(0.0004 * 3.3)
    assert len(confirmed.trials) == len(LR_SCALES) == len(calls)
    assert confirmed.choice is PICK and "scale 3.3" in confirmed.reason
    # from the pick outwards: an interrupted confirmation has tried the nearest first
    assert [t.scale for t in confirmed.trials][:3] == [1.0, 0.67, 1.5]
    assert all(min_lr / max_lr == pytest.approx(0.04) for max_lr, min_lr in calls)


def test_a_loss_metric_keeps_the_lowest():
    def loss(max_lr: float, min_lr: float) -> float:
        return (math.log10(max_lr) + 2.3) ** 2  # lowest at 0.005

    confirmed = confirm_lr(PICK, loss, higher_is_better=False, progress=False)
    assert confirmed.scale == 0.45


@pytest.mark.parametrize(
    ("best_lr", "past"),
    [(0.2, 7.6), (0.0005, 0.13), (0.01, None)],
    ids=["above", "below", "inside"],
)
def test_one_run_goes_past_the_edge_when_the_best_lies_on_it(best_lr, past):
    train, calls = peaked_at(best_lr)
    confirmed = confirm_lr(PICK, train, higher_is_better=True, progress=False)
    scales = [t.scale for t in confirmed.trials]
    if past is None:
        assert len(scales) == len(LR_SCALES)
    else:
        assert scales[-1] == past and confirmed.scale == past
        assert len(scales) == len(LR_SCALES) + 1
        assert f"past the edge ({past:g})" in confirmed.reason
    no_step = confirm_lr(PICK, train, higher_is_better=True, extend_at_edge=False, progress=False)
    assert len(no_step.trials) == len(LR_SCALES)


def test_diverged_runs_are_failed_trials_not_errors():
    def train(max_lr: float, min_lr: float) -> float:
        if max_lr > 0.02:
            raise TrainingDivergedError(f"loss nan at {max_lr}")
        return math.nan if max_lr > 0.014 else max_lr  # higher is better, up to the cliff

    confirmed = confirm_lr(PICK, train, higher_is_better=True, progress=False)
    assert confirmed.scale == 1.0
    failed = [t for t in confirmed.trials if math.isnan(t.metric)]
    assert sorted(t.scale for t in failed) == [1.5, 2.2, 3.3, 5.0]
    assert "4 failed" in confirmed.reason


def test_every_run_failing_is_one_error_that_names_the_range():
    def train(max_lr: float, min_lr: float) -> float:
        raise TrainingDivergedError("nan")

    with pytest.raises(TrainingDivergedError, match=r"every one of the 9 .*0\.002 to 0\.05"):
        confirm_lr(PICK, train, higher_is_better=True, progress=False)


def test_other_exceptions_are_the_callers():
    def train(max_lr: float, min_lr: float) -> float:
        raise KeyError("a bug in the user's loop")

    with pytest.raises(KeyError):
        confirm_lr(PICK, train, higher_is_better=True, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"choice": 0.01}, "choice must be an LRChoice"),
        ({"train": "fit"}, "train must be a callable"),
        ({"higher_is_better": "max"}, "higher_is_better must be True or False"),
        ({"scales": ()}, "scales must be distinct finite factors > 0"),
        ({"scales": (0.5, 0.0, 2)}, "scales must be distinct finite factors > 0"),
        ({"scales": (1.0, 1.0)}, "scales must be distinct finite factors > 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    train, calls = peaked_at(0.01)
    args = {"choice": PICK, "train": train, "higher_is_better": True} | kwargs
    with pytest.raises(ArgumentError, match=match):
        confirm_lr(args.pop("choice"), args.pop("train"), progress=False, **args)
    assert calls == []  # nothing trained


def test_a_train_that_returns_no_number_is_named():
    with pytest.raises(ArgumentError, match=r"must return .* as a number, but returned \{'acc'"):
        confirm_lr(PICK, lambda a, b: {"acc": 0.9}, higher_is_better=True, progress=False)


def test_a_real_model_range_test_pick_and_confirmation():
    """range_test -> select_lr -> confirm_lr with a plain torch 1cycle loop (SGD,
    a softmax regression on separable blobs): the confirmed LR trains at least as
    well as the curve's pick, and the model the range test used is untouched."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:384], y[:384]), batch_size=32, shuffle=True, generator=g
    )
    model = torch.nn.Linear(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy
    curve = range_test(model, optimizer, loss_fn, loader, end_lr=1e3, progress=False)
    assert curve.stop_reason == "diverged"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    choice = select_lr(curve)

    def fit(max_lr: float, min_lr: float) -> float:
        torch.manual_seed(1)
        net = torch.nn.Linear(8, 4)
        opt = torch.optim.SGD(net.parameters(), lr=max_lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=max_lr, total_steps=2 * len(loader), div_factor=max_lr / min_lr
        )
        for _ in range(2):
            for xb, yb in loader:
                loss = torch.nn.functional.cross_entropy(net(xb), yb)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"loss {loss.item()} at max_lr={max_lr:.3g}")
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            return float((net(x[384:]).argmax(1) == y[384:]).float().mean())

    confirmed = confirm_lr(choice, fit, higher_is_better=True, progress=False)
    by_scale = {t.scale: t.metric for t in confirmed.trials}
    assert confirmed.metric == np.nanmax(list(by_scale.values())) >= by_scale[1.0]
    assert confirmed.metric > 0.8  # 4 separable classes, chance is 0.25
