"""Tune's trainable: one trial trains its point under 1cycle and reports each epoch.

Ray pickles the trainable by reference, so `_run_trial` and everything it uses
live at module level here, in a module every worker can import.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import tune

from autolr.errors import CurveError, TrainingDivergedError
from autolr.results import EpochMetrics
from autolr.search.plan import SearchSite, TrialPlan
from autolr.tasks.base import Task
from autolr.tracking import Tracker, epoch_metrics, fail_fast_http, trial_run
from autolr.training import train

CHECKPOINT_FILE = "trial.pt"


@dataclass(frozen=True)
class _TrialSetup:
    """What every trial needs besides its sampled config."""

    max_lr: float  # the curve's 1cycle range, before a trial's lr_scale
    min_lr: float
    metric_key: str  # e.g. "val_accuracy"
    threads: int  # torch threads: the CPUs Ray gave the trial
    wd_aware: bool
    plan: TrialPlan  # its seed resolved
    site: SearchSite


def _run_trial(config: dict[str, Any], task: Task, setup: _TrialSetup) -> None:
    """Tune's trainable: train one (weight_decay, bn_momentum, lr_scale) point, report each epoch.

    Resumes from Tune's checkpoint when Tune has one (a retry or a resumed
    search), and reuses the trial's MLflow run from the earlier attempt.
    """
    torch.set_num_threads(setup.threads)
    diverged = _diverged_marker()
    with fail_fast_http():
        saved = _load_checkpoint(tune.get_checkpoint())
        # The run first: a trial whose (wd-aware) range test fails still has one, FAILED.
        run = _TrialRun.open(setup, tune.get_context().get_trial_id())
        lrs = _trial_lrs(config, task, setup, saved)
        run.log_params(config, lrs, setup.plan.epochs)
        on_epoch = _epoch_callback(setup, lrs, run, tune.report, tune.Checkpoint)
        try:
            train(task, on_epoch=on_epoch, **_train_kwargs(config, setup, lrs, saved))
        except TrainingDivergedError as exc:
            diverged.write_text(str(exc))
            raise
        # Reached only when Tune lets the function return (ASHA stops even a trial that
        # reaches max_t inside report()); the driver sets the final status either way.
        run.finish()


@dataclass(frozen=True)
class _TrialRun:
    """A trial's MLflow run (`autolr.tracking.trial_run`): reused across the trial's
    retries, so each param and each epoch's metrics are logged once."""

    tracker: Tracker
    run_id: str | None
    have_params: set[str]  # the params an earlier attempt logged
    logged: set[int]  # the epochs an earlier attempt logged

    @classmethod
    def open(cls, setup: _TrialSetup, trial_id: str) -> _TrialRun:
        site = setup.site
        tracker = Tracker.attach(site.tracking_uri, site.experiment_id)
        run_id, have_params, logged = trial_run(tracker, site.name, trial_id, site.parent_run_id)
        return cls(tracker, run_id, set(have_params), logged)

    def log_params(self, config: dict[str, Any], lrs: dict[str, Any], epochs: int) -> None:
        params = {
            "weight_decay": config["weight_decay"],
            "bn_momentum": config.get("bn_momentum"),
            "epochs": epochs,
            **lrs,
        }
        # MLflow refuses to change a param, so a reused run only gets the ones it lacks.
        self.tracker.log_params(
            self.run_id, {k: v for k, v in params.items() if k not in self.have_params}
        )

    def log_epoch(self, metrics: EpochMetrics, metric_key: str) -> None:
        # An epoch re-run after a crash is already logged, with the same values
        # (training resumes bit-exactly), so it is not logged twice.
        if metrics.epoch not in self.logged:
            self.tracker.log_metrics(
                self.run_id, epoch_metrics(metrics, metric_key), step=metrics.epoch
            )

    def finish(self) -> None:
        self.tracker.end_run(self.run_id, "FINISHED")


def _epoch_callback(
    setup: _TrialSetup,
    lrs: dict[str, Any],
    run: _TrialRun | None,
    report: Callable[..., None],
    checkpoint_type: type,
) -> Callable[[EpochMetrics, Callable[[], dict]], None]:
    """`train`'s ``on_epoch`` in a trial: log the epoch to ``run``, checkpoint, ``report``.

    ``report`` and ``checkpoint_type`` are Tune's (a trial) or Ray Train's (a rank
    of a data-parallel trial); a rank without a ``run`` (not rank 0) only reports.
    """

    def on_epoch(metrics: EpochMetrics, state: Callable[[], dict]) -> None:
        reported = _reported(metrics, setup, lrs)
        if run is None:
            report(reported)
            return
        # Log before reporting: Tune reports synchronously, and a trial that ASHA stops
        # (or that reaches max_t) exits inside report().
        run.log_epoch(metrics, setup.metric_key)
        with tempfile.TemporaryDirectory(prefix="autolr-ckpt-") as folder:
            torch.save({"train": state(), "lrs": lrs}, Path(folder) / CHECKPOINT_FILE)
            report(reported, checkpoint=checkpoint_type.from_directory(folder))

    return on_epoch


def _trial_lrs(
    config: dict[str, Any], task: Task, setup: _TrialSetup, saved: dict | None
) -> dict[str, Any]:
    """The trial's LR range: the checkpoint's, else the shared (or wd-aware) pick x lr_scale."""
    if saved is not None:  # the LR range must be the one the checkpoint trained with
        return {"lr_scale": 1.0, **saved["lrs"]}  # checkpoints from before lr_scales lack it
    if setup.wd_aware:
        lrs = _wd_aware_lrs(task, setup, config["weight_decay"], config.get("bn_momentum"))
    else:
        lrs = {"max_lr": setup.max_lr, "min_lr": setup.min_lr, "lr_source": "shared"}
    scale = float(config.get("lr_scale", 1.0))
    lrs.update(max_lr=lrs["max_lr"] * scale, min_lr=lrs["min_lr"] * scale, lr_scale=scale)
    return lrs


def _diverged_marker() -> Path:
    """The file that remembers the trial's divergence; raise if an earlier attempt left it.

    Training resumes bit-exactly, so a retry of a diverged trial would diverge again:
    the trial's folder remembers the divergence and the retry fails at once.
    """
    diverged = Path(tune.get_context().get_trial_dir()) / "diverged.txt"
    if diverged.exists():
        raise TrainingDivergedError(diverged.read_text())
    return diverged


def _train_kwargs(
    config: dict[str, Any], setup: _TrialSetup, lrs: dict[str, Any], saved: dict | None
) -> dict[str, Any]:
    """`train`'s arguments for the trial, its callback and device aside."""
    return {
        "max_lr": lrs["max_lr"],
        "min_lr": lrs["min_lr"],
        "epochs": setup.plan.epochs,
        "weight_decay": config["weight_decay"],
        "bn_momentum": config.get("bn_momentum"),
        "schedule": "onecycle",
        "seed": setup.plan.seed,
        "accumulation_steps": setup.plan.range_test.accumulation_steps,
        "resume": saved["train"] if saved is not None else None,
        "progress": False,
    }


def _reported(metrics: EpochMetrics, setup: _TrialSetup, lrs: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports to Tune after an epoch."""
    return {
        "epoch": metrics.epoch,
        setup.metric_key: metrics.val_metric,
        "val_loss": metrics.val_loss,
        "train_loss": metrics.train_loss,
        "max_lr": lrs["max_lr"],
        "min_lr": lrs["min_lr"],
        "lr_scale": lrs["lr_scale"],
    }


def _load_checkpoint(checkpoint: tune.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        # Tensors and plain values only (see `train`'s resume): weights_only refuses
        # anything else, so a planted trial.pt cannot run code when it is restored.
        return torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)


def _wd_aware_lrs(
    task: Task, setup: _TrialSetup, weight_decay: float, bn_momentum: float | None
) -> dict[str, Any]:
    """Re-run the range test at this trial's weight decay and BN momentum, and pick from it.

    A curve with no usable structure falls back to the shared pick rather than
    failing the trial: the trial still measures its weight decay.
    """
    from autolr.range_test import range_test_task
    from autolr.selection import select_lr

    curve = range_test_task(
        task,
        setup.plan.range_test,
        weight_decay=weight_decay,
        bn_momentum=bn_momentum,
        progress=False,
    )
    try:
        choice = select_lr(curve, method=setup.plan.selection_method)
    except CurveError as exc:
        return {
            "max_lr": setup.max_lr,
            "min_lr": setup.min_lr,
            "lr_source": f"shared (the trial's range test gave no pick: {exc})"[:500],
        }
    return {
        "max_lr": choice.max_lr,
        "min_lr": choice.min_lr,
        "lr_source": "wd_aware",
        "lr_confidence": choice.confidence,
    }
