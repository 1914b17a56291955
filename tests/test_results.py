"""PipelineResult: the summary JSON and the console summary are rendered from it."""

import dataclasses
import json
import math

import pytest

from autolr.pipeline import format_summary
from autolr.results import (
    BestConfig,
    CurveStats,
    EpochMetrics,
    FinalModel,
    LRChoice,
    PipelineResult,
    SearchInfo,
    TrialSummary,
)

SUMMARY_KEYS = [
    "task",
    "metric",
    "val_metric",
    "val_loss",
    "max_lr",
    "min_lr",
    "curve_pick",
    "confidence",
    "method",
    "reason",
    "warnings",
    "epochs",
    "history",
    "range_test",
    "best",
    "trials",
    "search",
    "stage_seconds",
    "mlflow",
    "final_model",
    "test_metric",
    "test_loss",
    "wall_seconds",
]


def searched_result(**changes) -> PipelineResult:
    """A run with a 2-trial search whose best trial's checkpoint is the final model."""
    trials = tuple(
        TrialSummary(
            trial_id=f"t{i}",
            weight_decay=10.0**-i,
            bn_momentum=0.1,
            max_lr=0.2 * i,
            min_lr=0.008 * i,
            val_metric=0.8 + i / 100,
            epochs_run=2,
            status="TERMINATED",
            run_id=f"run{i}",
            seconds=1.5,
            lr_scale=float(i),
            checkpoint=f"/ray/t{i}/checkpoint_000001",
        )
        for i in (1, 2)
    )
    fields = dict(
        task="mnist1d",
        metric="accuracy",
        val_metric=0.82,
        val_loss=0.5,
        max_lr=0.4,
        min_lr=0.016,
        choice=LRChoice(
            max_lr=0.2,
            min_lr=0.008,
            confidence=0.75,
            method="onset",
            reason="the loss falls fastest below 0.2",
            warnings=("the curve is short",),
        ),
        history=(
            EpochMetrics(epoch=1, train_loss=1.0, val_loss=0.7, val_metric=0.7, lr=0.4, seconds=2),
            EpochMetrics(
                epoch=2, train_loss=0.6, val_loss=0.5, val_metric=0.82, lr=0.01, seconds=2
            ),
        ),
        range_test=CurveStats(points=80, stop_reason="diverged", steps=240, note=""),
        best=BestConfig(
            weight_decay=0.01,
            bn_momentum=0.1,
            max_lr=0.4,
            min_lr=0.016,
            lr_scale=2.0,
            val_metric=0.82,
            trial_id="t2",
        ),
        trials=trials,
        search=SearchInfo(
            enabled=True,
            notes=("9 LR scales in turn",),
            bn_searched=True,
            resources_per_trial={"cpu": 1.0},
            experiment_path="/ray/autolr-mnist1d",
        ),
        stage_seconds={"range_test": 3.1, "search": 20.0, "train": 0.4},
        tracking_uri="sqlite:///mlflow.db",
        run_id="abc123",
        final_model=FinalModel(reused_trial="t2", reason="it trained this configuration"),
        test_metric=0.81,
        test_loss=0.52,
        wall_seconds=25.04,
        mlflow_errors=("mlflow was slow once",),
    )
    return PipelineResult(**{**fields, **changes})


def unsearched_result() -> PipelineResult:
    return searched_result(
        trials=(),
        search=SearchInfo(enabled=False, notes=("search disabled",)),
        best=BestConfig(5e-4, None, 0.2, 0.008, 1.0, 0.82, None),
        final_model=FinalModel(reused_trial=None, reason="no search ran"),
        test_metric=None,
        test_loss=None,
        mlflow_errors=None,
    )


@pytest.mark.parametrize("result", [searched_result(), unsearched_result()])
def test_a_result_goes_to_the_summary_json_and_back_unchanged(result):
    summary = result.to_dict()
    assert list(summary) == SUMMARY_KEYS
    text = json.dumps(summary, indent=2)
    again = PipelineResult.from_dict(json.loads(text))
    assert json.dumps(again.to_dict(), indent=2) == text
    assert again.trials == result.trials and again.history == result.history
    assert again.choice.max_lr == result.choice.max_lr
    assert again.choice.warnings == result.choice.warnings


def test_the_summary_json_holds_each_stage_under_todays_names():
    summary = searched_result().to_dict()
    assert summary["curve_pick"] == {"max_lr": 0.2, "min_lr": 0.008, "confidence": 0.75}
    assert summary["confidence"] == 0.75 and summary["epochs"] == 2
    assert summary["warnings"] == ["the curve is short"]
    assert summary["history"][1] == {
        "epoch": 2,
        "train_loss": 0.6,
        "val_loss": 0.5,
        "val_metric": 0.82,
        "lr": 0.01,
        "seconds": 2,
    }
    assert summary["best"]["trial_id"] == "t2" and summary["trials"][1]["lr_scale"] == 2.0
    assert list(summary["search"]) == [
        "enabled",
        "bn_searched",
        "notes",
        "resources_per_trial",
        "experiment_path",
    ]
    assert summary["mlflow"] == {
        "tracking_uri": "sqlite:///mlflow.db",
        "run_id": "abc123",
        "errors": ["mlflow was slow once"],
    }
    assert summary["final_model"] == {
        "reused_trial": "t2",
        "reason": "it trained this configuration",
    }
    # without a search: no trials, and the search block says why in its notes alone
    plain = unsearched_result().to_dict()
    assert plain["search"] == {"enabled": False, "notes": ["search disabled"]}
    assert plain["trials"] == [] and plain["test_metric"] is None
    assert "errors" not in plain["mlflow"]  # not known yet: the run's own copy lacks them


def test_a_nan_trial_metric_survives_the_round_trip():
    trial = dataclasses.replace(searched_result().trials[0], val_metric=math.nan, status="ERROR")
    result = searched_result(trials=(trial,))
    again = PipelineResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert math.isnan(again.trials[0].val_metric) and again.trials[0].status == "ERROR"


def test_the_console_summary_is_rendered_from_the_result():
    lines = format_summary(searched_result()).splitlines()
    assert lines[0] == "task        mnist1d"
    assert lines[1] == "curve pick  max_lr=0.2  min_lr=0.008  confidence=0.75  (onset)"
    assert lines[3] == (
        "search      2 trials: best weight_decay=0.01  bn_momentum=0.1  lr_scale=2  "
        "(trial val_accuracy=0.8200)"
    )
    assert "lr range    max_lr=0.4  min_lr=0.016  (the best trial's)" in lines
    assert (
        "            trial t2's checkpoint, evaluated, not trained again: "
        "it trained this configuration"
    ) in lines
    assert "test        test_accuracy=0.8100 (held out from the search and selection)" in lines
    assert "time        25.0 s  range_test=3.1s  search=20.0s  train=0.4s" in lines
    assert lines[-2:] == ["warning     the curve is short", "warning     mlflow was slow once"]

    plain = format_summary(unsearched_result())
    assert "(the curve's pick)" in plain and "search  " not in plain
    assert "test        " not in plain and "trained again" not in plain
