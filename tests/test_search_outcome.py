"""The search's pure parts, on plain records: no Ray cluster starts here.

What Tune hands back is read through four attributes of each result
(``metrics``, ``config``, ``error``, ``checkpoint``), so plain records stand in
for its ResultGrid; the real-Ray tests in test_search.py cover the rest.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from autolr.config import RangeTestConfig
from autolr.errors import ArgumentError, AutoLRError
from autolr.results import TrialSummary
from autolr.search import SearchSite, TrialPlan
from autolr.search.outcome import _best, _last_line, _outcome_notes, _summaries
from autolr.search.trial import _TrialSetup

SITE = SearchSite("sqlite:///m.db", "1", None, "/tmp/ray", "search")


def setup(epochs: int = 3) -> _TrialSetup:
    return _TrialSetup(
        max_lr=0.1,
        min_lr=0.004,
        metric_key="val_accuracy",
        threads=1,
        wd_aware=False,
        plan=TrialPlan(epochs=epochs, seed=0),
        site=SITE,
    )


def result(trial_id, epoch, accuracy=None, *, error=None, lr_scale=None, **config):
    metrics = {"trial_id": trial_id, "epoch": epoch, "time_total_s": 2.5}
    if accuracy is not None:
        metrics |= {"val_accuracy": accuracy, "max_lr": 0.1 * (lr_scale or 1.0)}
    config = {"weight_decay": 1e-4, **config}
    if lr_scale is not None:
        config["lr_scale"] = lr_scale
    return SimpleNamespace(metrics=metrics, config=config, error=error, checkpoint=None)


def trial(trial_id, val_metric, status="TERMINATED") -> TrialSummary:
    return TrialSummary(trial_id, 0.0, None, 0.1, 0.004, val_metric, 3, status, None)


def test_summaries_name_each_trial_s_status_from_its_epochs_and_error_sorted_by_id():
    grid = [
        result("t2", 1, 0.5),  # stopped by ASHA after epoch 1 of 3
        result("t1", 3, 0.9, lr_scale=2.0, bn_momentum=0.1),
        result("t3", 0, error=RuntimeError("Ray wrapper\n\n  ValueError: the real cause  \n")),
    ]
    summaries = _summaries(grid, setup(epochs=3))

    assert [(t.trial_id, t.status, t.epochs_run) for t in summaries] == [
        ("t1", "TERMINATED", 3),
        ("t2", "STOPPED", 1),
        ("t3", "ERROR", 0),
    ]
    full = summaries[0]
    assert (full.max_lr, full.lr_scale, full.bn_momentum, full.val_metric) == (0.2, 2.0, 0.1, 0.9)
    # a trial that reported nothing: the setup's range, a NaN metric, the error's last line
    failed = summaries[2]
    assert (failed.max_lr, failed.min_lr) == (0.1, 0.004)
    assert math.isnan(failed.val_metric)
    assert failed.error == "ValueError: the real cause"


def test_best_prefers_a_full_budget_trial_and_follows_the_metric_s_direction():
    trials = [trial("a", 0.95, "STOPPED"), trial("b", 0.90), trial("c", 0.80), trial("d", math.nan)]
    assert _best(trials, higher_is_better=True).trial_id == "b"  # "a" did not finish
    assert _best(trials, higher_is_better=False).trial_id == "c"
    # with no full-budget trial, the best that reported at all
    assert _best([trial("a", 0.5, "STOPPED"), trial("b", 0.7, "STOPPED")], True).trial_id == "b"


def test_best_raises_with_the_first_error_when_no_trial_reported_a_metric():
    failed = [
        TrialSummary("a", 0.0, None, 0.1, 0.004, math.nan, 0, "ERROR", None, error="diverged")
    ]
    with pytest.raises(AutoLRError, match="all 1 failed.*first error: diverged"):
        _best(failed, higher_is_better=True)


def test_outcome_notes_name_each_failed_trial_and_count_the_stopped_ones():
    trials = [trial("a", 0.9), trial("b", 0.5, "STOPPED"), trial("c", 0.4, "STOPPED")]
    trials.append(TrialSummary("d", 0.0, None, 0.1, 0.004, math.nan, 0, "ERROR", None, "boom"))
    assert _outcome_notes(trials) == ["trial d failed: boom", "ASHA stopped 2 of 4 trials early"]


def test_last_line_falls_back_to_the_error_type_and_is_capped():
    assert _last_line(KeyError()) == "KeyError"
    assert len(_last_line(ValueError("x" * 1000))) == 300


def test_a_site_and_a_plan_refuse_bad_values_in_one_line_naming_what_came():
    with pytest.raises(ArgumentError, match=r"name must be a folder name .* name='a/b'"):
        SearchSite("sqlite:///m.db", "1", None, "/tmp/ray", "a/b")
    for epochs in (0, 1.5, True):
        with pytest.raises(
            ArgumentError, match=rf"epochs must be an int >= 1, but got epochs={epochs!r}"
        ):
            TrialPlan(epochs=epochs)
    assert SearchSite("s3://b", "1", None, "s3://bucket/x/", "run").experiment_path == (
        "s3://bucket/x/run"
    )
    assert TrialPlan(epochs=2).range_test == RangeTestConfig()
