"""Frozen results passed between the pipeline's stages.

Each stage is a function of its inputs and returns one of these; plots and
trackers only read them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from autolr.errors import ArgumentError


@dataclass(frozen=True, eq=False)
class RangeTestResult:
    """The raw curve of an LR range test.

    ``lrs[i]`` is the learning rate used for step ``i`` and ``losses[i]`` the
    loss it gave: the training-batch loss, or the validation loss in
    validation mode. Both are float64 arrays of the same length.
    """

    lrs: np.ndarray
    losses: np.ndarray
    stop_reason: str  # "completed", "diverged" or "nonfinite"
    mode: str = "exp"  # "exp" or "linear" sweep
    loss_kind: str = "train"  # "train" or "val"
    start_lr: float = 0.0
    end_lr: float = 0.0
    num_iter: int = 0
    steps: int = 0  # optimizer steps of every sweep, the adaptive extension's included
    note: str = ""  # why the range test extended itself, if it did
    optimizer: str = ""  # the optimizer's class name, e.g. "AdamW" (the pick depends on it)

    def __post_init__(self) -> None:
        lrs = np.asarray(self.lrs, dtype=np.float64)
        losses = np.asarray(self.losses, dtype=np.float64)
        if lrs.shape != losses.shape or lrs.ndim != 1:
            raise ArgumentError(
                f"lrs and losses must be 1-D arrays of the same length, "
                f"but got shapes {lrs.shape} and {losses.shape}."
            )
        lrs.setflags(write=False)
        losses.setflags(write=False)
        object.__setattr__(self, "lrs", lrs)
        object.__setattr__(self, "losses", losses)

    def to_dict(self) -> dict:
        return {
            "lrs": self.lrs.tolist(),
            "losses": self.losses.tolist(),
            "stop_reason": self.stop_reason,
            "mode": self.mode,
            "loss_kind": self.loss_kind,
            "start_lr": self.start_lr,
            "end_lr": self.end_lr,
            "num_iter": self.num_iter,
            "steps": self.steps,
            "note": self.note,
            "optimizer": self.optimizer,
        }

    def __repr__(self) -> str:  # the arrays run to kilobytes; a notebook wants the gist
        span = f"{self.lrs[0]:.3g}..{self.lrs[-1]:.3g}" if self.lrs.size else "none"
        return (
            f"RangeTestResult(points={self.lrs.size}, lr={span}, "
            f"stop_reason={self.stop_reason!r}, steps={self.steps})"
        )

    def plot(self, choice: LRChoice | None = None, ax: Any = None) -> Any:
        """Draw the curve (and ``choice``'s range) on ``ax``; returns the matplotlib Axes.

        Never switches matplotlib's backend: with no ``ax`` it draws on a new
        pyplot figure when pyplot is already imported (a notebook shows it),
        else on a bare ``matplotlib.figure.Figure``.
        """
        from autolr.plotting import draw_range_test

        return draw_range_test(self, choice, ax)


@dataclass(frozen=True, eq=False)
class LRChoice:
    """The learning-rate range picked from a range test, with its evidence.

    ``max_lr`` and ``min_lr`` bound the 1cycle schedule (``0 < min_lr < max_lr``).
    ``confidence`` in [0, 1] says how clear the curve's structure was.
    ``log_lrs``/``smoothed`` is the curve the pick was made on (log10 LR grid),
    ``changepoints`` the LRs where the curve changes regime.
    """

    max_lr: float
    min_lr: float
    confidence: float
    method: str
    reason: str
    log_lrs: np.ndarray = field(default_factory=lambda: np.empty(0))
    smoothed: np.ndarray = field(default_factory=lambda: np.empty(0))
    changepoints: tuple[float, ...] = ()
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (0.0 < self.min_lr < self.max_lr and np.isfinite(self.max_lr)):
            raise ArgumentError(
                f"an LRChoice needs 0 < min_lr < max_lr, "
                f"but got min_lr={self.min_lr!r}, max_lr={self.max_lr!r}."
            )
        if not 0.0 <= self.confidence <= 1.0:
            raise ArgumentError(f"confidence must be in [0, 1], but got {self.confidence!r}.")

    def to_dict(self) -> dict:
        return {
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "confidence": self.confidence,
            "method": self.method,
            "reason": self.reason,
            "changepoints": list(self.changepoints),
            "warnings": list(self.warnings),
        }

    def __repr__(self) -> str:  # the evidence arrays stay out of it
        return (
            f"LRChoice(max_lr={self.max_lr:.3g}, min_lr={self.min_lr:.3g}, "
            f"confidence={self.confidence:.2f}, method={self.method!r}, "
            f"warnings={len(self.warnings)})"
        )


@dataclass(frozen=True)
class LRTrial:
    """One training run of `autolr.confirm_lr`: the pick times ``scale``."""

    scale: float
    max_lr: float
    min_lr: float
    metric: float  # the run's validation metric; NaN if it diverged


@dataclass(frozen=True, eq=False)
class ConfirmedLR:
    """The LR range that trained best of `autolr.confirm_lr`'s runs, and all the runs."""

    max_lr: float
    min_lr: float
    scale: float  # of the curve's pick
    metric: float  # the best run's validation metric
    trials: tuple[LRTrial, ...]  # in the order they ran
    choice: LRChoice  # the curve's pick the scales multiplied
    reason: str

    def __repr__(self) -> str:
        return (
            f"ConfirmedLR(max_lr={self.max_lr:.3g}, min_lr={self.min_lr:.3g}, "
            f"scale={self.scale:g}, metric={self.metric:.4g}, trials={len(self.trials)})"
        )


@dataclass(frozen=True)
class EpochMetrics:
    """Metrics at the end of one training epoch."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_metric: float
    lr: float  # the learning rate at the epoch's last step
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """A finished training run."""

    history: tuple[EpochMetrics, ...]
    metric: str  # name of the validation metric, e.g. "accuracy"
    val_metric: float  # the metric after the last epoch
    val_loss: float
    seconds: float


@dataclass(frozen=True)
class TrialSummary:
    """One search trial: its hyperparameters, how far it got and where it is logged."""

    trial_id: str
    weight_decay: float
    bn_momentum: float | None  # None: the model has no BatchNorm, so it was not searched
    max_lr: float  # the 1cycle range the trial trained with: the pick times lr_scale
    min_lr: float
    val_metric: float  # after the trial's last epoch; NaN when it reported none
    epochs_run: int
    status: str  # "TERMINATED" (full budget), "STOPPED" (by ASHA) or "ERROR"
    run_id: str | None  # the trial's MLflow child run
    error: str | None = None
    seconds: float = math.nan  # the trial's own wall time (Tune's time_total_s)
    lr_scale: float = 1.0  # the trial's factor on the curve's (or, wd-aware, its own) pick
    checkpoint: str | None = None  # its last Tune checkpoint: a folder, or a URI (s3://...)

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True, eq=False)
class SearchResult:
    """The outcome of a weight-decay / BatchNorm-momentum / LR-scale search.

    The best trial is the best ``val_metric`` among the trials that ran the full
    budget (``TERMINATED``); ``max_lr``/``min_lr`` are the range it trained with:
    the curve's pick (in wd-aware mode, the trial's own pick) times ``lr_scale``.
    """

    weight_decay: float
    bn_momentum: float | None
    val_metric: float
    metric: str  # the validation metric's name, e.g. "accuracy"
    higher_is_better: bool
    max_lr: float
    min_lr: float
    best_trial_id: str
    trials: tuple[TrialSummary, ...]
    bn_searched: bool
    lr_scale: float = 1.0  # the best trial's factor on the pick
    notes: tuple[str, ...] = ()
    resources: dict = field(default_factory=dict)  # requested per trial, e.g. {"cpu": 1.0}
    experiment_path: str = ""  # Ray Tune's experiment folder (restore from here)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "weight_decay": self.weight_decay,
            "bn_momentum": self.bn_momentum,
            "val_metric": self.val_metric,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "lr_scale": self.lr_scale,
            "best_trial_id": self.best_trial_id,
            "trials": [t.to_dict() for t in self.trials],
            "bn_searched": self.bn_searched,
            "notes": list(self.notes),
            "resources": dict(self.resources),
            "experiment_path": self.experiment_path,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class CurveStats:
    """The range test's curve in a pipeline's summary: its size and how it ended."""

    points: int
    stop_reason: str
    steps: int  # every sweep's optimizer steps, all repeats included
    note: str

    @classmethod
    def of(cls, curve: RangeTestResult) -> CurveStats:
        return cls(int(curve.lrs.size), curve.stop_reason, curve.steps, curve.note)


@dataclass(frozen=True)
class BestConfig:
    """The search's best trial; without a search, the configured values and the curve's range."""

    weight_decay: float
    bn_momentum: float | None
    max_lr: float
    min_lr: float
    lr_scale: float
    val_metric: float
    trial_id: str | None  # None: no search ran


@dataclass(frozen=True)
class SearchInfo:
    """How the search ran; the fields after ``notes`` are None when it was disabled."""

    enabled: bool
    notes: tuple[str, ...]
    bn_searched: bool | None = None
    resources_per_trial: dict | None = None  # requested per trial, e.g. {"cpu": 1.0}
    experiment_path: str | None = None  # Ray Tune's experiment folder

    def to_dict(self) -> dict:
        if not self.enabled:
            return {"enabled": False, "notes": list(self.notes)}
        return {
            "enabled": True,
            "bn_searched": self.bn_searched,
            "notes": list(self.notes),
            "resources_per_trial": dict(self.resources_per_trial or {}),
            "experiment_path": self.experiment_path,
        }


@dataclass(frozen=True)
class FinalModel:
    """Where the final model came from: a trial's checkpoint, or training (no ``reused_trial``)."""

    reused_trial: str | None
    reason: str


@dataclass(frozen=True, eq=False)
class PipelineResult:
    """A finished pipeline run: what its summary JSON and its console summary are rendered from.

    ``choice`` is the curve's pick; read back from a summary it has no evidence
    arrays or change points, which the summary does not hold.
    """

    task: str
    metric: str  # the validation metric's name, e.g. "accuracy"
    val_metric: float  # the final model's, after its last epoch
    val_loss: float
    max_lr: float  # the 1cycle range the final model trained with
    min_lr: float
    choice: LRChoice
    history: tuple[EpochMetrics, ...]  # the final training, epoch by epoch
    range_test: CurveStats
    best: BestConfig
    trials: tuple[TrialSummary, ...]
    search: SearchInfo
    stage_seconds: dict[str, float]  # "range_test", "search", "train": each stage's wall time
    tracking_uri: str
    run_id: str  # the pipeline's MLflow run
    final_model: FinalModel
    test_metric: float | None  # None: the task has no test split
    test_loss: float | None
    wall_seconds: float
    # The tracker's errors, known once the run has ended: the run's own copy of the
    # summary is logged before, without them (None).
    mlflow_errors: tuple[str, ...] | None = None

    @property
    def epochs(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        """The summary JSON's fields, in its order."""
        choice = self.choice
        mlflow: dict[str, Any] = {"tracking_uri": self.tracking_uri, "run_id": self.run_id}
        if self.mlflow_errors is not None:
            mlflow["errors"] = list(self.mlflow_errors)
        return {
            "task": self.task,
            "metric": self.metric,
            "val_metric": self.val_metric,
            "val_loss": self.val_loss,
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "curve_pick": {
                "max_lr": choice.max_lr,
                "min_lr": choice.min_lr,
                "confidence": choice.confidence,
            },
            "confidence": choice.confidence,
            "method": choice.method,
            "reason": choice.reason,
            "warnings": list(choice.warnings),
            "epochs": self.epochs,
            "history": [asdict(m) for m in self.history],
            "range_test": asdict(self.range_test),
            "best": asdict(self.best),
            "trials": [t.to_dict() for t in self.trials],
            "search": self.search.to_dict(),
            "stage_seconds": dict(self.stage_seconds),
            "mlflow": mlflow,
            "final_model": asdict(self.final_model),
            "test_metric": self.test_metric,
            "test_loss": self.test_loss,
            "wall_seconds": self.wall_seconds,
        }

    @classmethod
    def from_dict(cls, summary: dict[str, Any]) -> PipelineResult:
        """A summary JSON read back, e.g. ``PipelineResult.from_dict(json.load(f))``."""
        pick, search, mlflow = summary["curve_pick"], summary["search"], summary["mlflow"]
        errors = mlflow.get("errors")
        return cls(
            task=summary["task"],
            metric=summary["metric"],
            val_metric=summary["val_metric"],
            val_loss=summary["val_loss"],
            max_lr=summary["max_lr"],
            min_lr=summary["min_lr"],
            choice=LRChoice(
                max_lr=pick["max_lr"],
                min_lr=pick["min_lr"],
                confidence=pick["confidence"],
                method=summary["method"],
                reason=summary["reason"],
                warnings=tuple(summary["warnings"]),
            ),
            history=tuple(EpochMetrics(**m) for m in summary["history"]),
            range_test=CurveStats(**summary["range_test"]),
            best=BestConfig(**summary["best"]),
            trials=tuple(TrialSummary(**t) for t in summary["trials"]),
            search=SearchInfo(**{**search, "notes": tuple(search["notes"])}),
            stage_seconds=dict(summary["stage_seconds"]),
            tracking_uri=mlflow["tracking_uri"],
            run_id=mlflow["run_id"],
            final_model=FinalModel(**summary["final_model"]),
            test_metric=summary["test_metric"],
            test_loss=summary["test_loss"],
            wall_seconds=summary["wall_seconds"],
            mlflow_errors=None if errors is None else tuple(errors),
        )
