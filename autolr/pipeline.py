"""``python -m autolr.pipeline``: range test -> selection -> 1cycle training.

Each stage is a function of the config and the previous stage's frozen
result; MLflow logging happens here, around the stages, never inside them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autolr._checks import probe_writable
from autolr.config import Config, load_config
from autolr.errors import AutoLRError, ConfigError
from autolr.results import (
    BestConfig,
    CurveStats,
    EpochMetrics,
    FinalModel,
    LRChoice,
    PipelineResult,
    RangeTestResult,
    SearchInfo,
    SearchResult,
    TrainResult,
)
from autolr.tasks import Task, build_task, resolve

if TYPE_CHECKING:
    from autolr.tracking import Tracker

log = logging.getLogger("autolr")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "pipelines" / "default.yaml"


def run_range_test(task: Task, cfg: Config) -> RangeTestResult:
    from autolr.range_test import range_test_task

    return range_test_task(
        task,
        cfg.range_test,
        weight_decay=cfg.train.weight_decay,
        bn_momentum=cfg.train.bn_momentum,
        progress=cfg.progress,
    )


def run_selection(result: RangeTestResult, cfg: Config) -> LRChoice:
    from autolr.selection import select_lr

    return select_lr(result, method=cfg.selection.method)


def range_test_table(result: RangeTestResult, choice: LRChoice | None) -> str:
    """CSV of the raw curve with the smoothed curve interpolated onto its LRs."""
    rows = ["lr,loss,smoothed_loss"]
    smoothed = np.full(result.lrs.shape, np.nan)
    if choice is not None and choice.smoothed.size:
        x = np.log10(result.lrs)
        inside = (x >= choice.log_lrs[0]) & (x <= choice.log_lrs[-1])
        smoothed[inside] = np.interp(x[inside], choice.log_lrs, choice.smoothed)
    for lr, loss, sm in zip(result.lrs, result.losses, smoothed, strict=True):
        rows.append(f"{lr:.6e},{loss:.6g},{'' if np.isnan(sm) else f'{sm:.6g}'}")
    return "\n".join(rows) + "\n"


STATE_FILE = "autolr_pipeline.json"  # in the search's folder: what --resume needs
STATE_KEYS = ("config", "run_id", "name", "curve", "choice", "finished")
# Tags on the pipeline's MLflow run. --resume finds a run by them and opens only the
# folder its run recorded, never one it finds on disk: Tune unpickles that folder.
ROLE_TAG = "autolr.role"  # "pipeline"
CONFIG_TAG = "autolr.config"  # _config_key: a run resumes only with the config it started with
FOLDER_TAG = "autolr.search_folder"  # the Tune folder the run owns
DRIVER_TAG = "autolr.driver"  # host:pid:start of the process running it, to spot a dead one


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the pipeline; its runs were ended as KILLED."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def run(
    cfg: Config,
    output: str | Path | None = None,
    *,
    resume: bool | str = False,
    retrain: bool = False,
) -> PipelineResult:
    """Run the whole pipeline; return (and optionally write as JSON) its result.

    The final model is the best trial's last checkpoint when that trial trained
    the final configuration for the full budget (FIFO, the default, with
    ``search.epochs`` unset); otherwise, or with ``retrain``, it is trained.

    With ``resume``, an unfinished pipeline run of this config is continued:
    ``resume`` names its MLflow run id, or is True for the newest such run in
    the tracking store. Same MLflow run, same LR pick, the search restored from
    Tune's checkpoints in the folder that run recorded, then the final training.
    """
    from autolr.tracking import Tracker, resolve_tracking_uri

    clock = StageClock()
    task = build_task(resolve(cfg.task), **cfg.task_params)
    # The search's folder, an absolute path or a URI such as s3://bucket/prefix.
    storage = cfg.search.storage_path or "ray_results"
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    # Where it will write, checked before any work: a failure there would lose the run's end.
    if output is not None:
        _check_writable(Path(output).expanduser().resolve().parent, "--output's folder")
    if cfg.search.enabled and "://" not in storage:
        _check_writable(Path(storage), "the search's storage folder (search.storage_path)")
    elif cfg.search.enabled:
        from autolr.search import check_storage

        check_storage(storage)
    tracker = Tracker(resolve_tracking_uri(cfg.tracking.tracking_uri), cfg.tracking.experiment)
    _fail_dead_runs(tracker)
    saved = _find_resumable(tracker, cfg, resume) if resume else None
    if saved is not None:
        parent, folder = ParentRun(tracker, saved["run_id"]), saved["folder"]
        tracker.reopen_run(parent.run_id)
        parent.set_tags({DRIVER_TAG: _driver()})
        log.info("resuming run %s (search %s)", parent.run_id, folder)
    else:
        if resume:
            log.info("nothing to resume in %s; starting a new run", tracker.tracking_uri)
        parent, folder = _start_run(tracker, cfg, task.name, storage)
    status = "FAILED"
    try:
        with (
            parent.system_metrics(resume=saved is not None),
            tempfile.TemporaryDirectory(prefix="autolr-") as tmp,
        ):
            tmp = Path(tmp)
            if saved is not None:
                curve = RangeTestResult(**saved["curve"])
                choice = LRChoice(**saved["choice"])
            else:
                parent.log_params(_flatten(cfg.to_dict()))
                rt = cfg.range_test
                log.info("range test on %s (%d x %d steps)", task.name, rt.repeats, rt.num_iter)
                with clock.stage("range_test"):
                    curve = run_range_test(task, cfg)
                choice = _pick_lrs(curve, cfg, parent, tmp)
                if cfg.search.enabled:
                    _write_state(folder, _new_state(cfg, parent, folder, curve, choice))
            found = None
            if cfg.search.enabled:
                with clock.stage("search"):
                    found = run_search(task, choice, cfg, parent, folder, resume=saved is not None)
            with clock.stage("train"):
                final = _train_final(task, choice, found, cfg, parent, tmp, retrain=retrain)
            final = _test_final(task, final, parent)
            result = _result(cfg, curve, choice, found, final, parent, clock)
            parent.log_metrics({"wall_seconds": result.wall_seconds})
            (tmp / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
            parent.log_artifact(tmp / "summary.json")
        status = "FINISHED"
        if cfg.search.enabled:
            _mark_finished(folder)
    except KeyboardInterrupt:
        _signals.take()
        status = "KILLED"
        parent.end_trial_runs("KILLED")  # an interrupted search cannot end them
        raise
    finally:
        parent.end(status)
    result = replace(result, mlflow_errors=tuple(tracker.errors))
    if output is not None:
        Path(output).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _start_run(
    tracker: Tracker, cfg: Config, task_name: str, storage: str
) -> tuple[ParentRun, str]:
    """A new pipeline run, tagged to be found by --resume, and its search's folder."""
    # Unique per run: two pipelines started in the same second get their own folders.
    name = f"autolr-{_folder_safe(task_name)}-{time.strftime('%Y%m%d-%H%M%S')}-"
    name += uuid.uuid4().hex[:8]
    tags = {
        ROLE_TAG: "pipeline",
        CONFIG_TAG: _config_key(cfg),
        FOLDER_TAG: f"{storage}/{name}",
        DRIVER_TAG: _driver(),
    }
    run_id = tracker.start_run(cfg.tracking.run_name or f"autolr-{task_name}", tags=tags)
    if run_id is None:  # the store answered a moment ago: nothing would be logged
        raise ConfigError(
            f"cannot create the pipeline's run in the MLflow store {tracker.tracking_uri}: "
            f"{tracker.errors[-1]}"
        )
    return ParentRun(tracker, run_id), f"{storage}/{name}"


@dataclass(frozen=True)
class ParentRun:
    """The pipeline's MLflow run, the parent of its trials' runs: every stage logs through it."""

    tracker: Tracker
    run_id: str

    @property
    def tracking_uri(self) -> str:
        return self.tracker.tracking_uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step=step)

    def log_series(self, series: Mapping[str, Sequence[float]]) -> None:
        self.tracker.log_series(self.run_id, series)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.tracker.log_artifact(self.run_id, path, folder)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def system_metrics(self, *, resume: bool) -> contextlib.AbstractContextManager[None]:
        return self.tracker.system_metrics(self.run_id, resume=resume)

    def end_trial_runs(self, status: str) -> None:
        """End the trial runs under this run that are still RUNNING."""
        from autolr.tracking import PARENT_TAG

        for record in self.tracker.find_runs({PARENT_TAG: self.run_id}):
            if record.status == "RUNNING":
                self.tracker.end_run(record.run_id, status)

    def end(self, status: str) -> None:
        self.tracker.end_run(self.run_id, status)


class StageClock:
    """Wall time since the pipeline started, and of each stage in the order they ran."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block; a stage that raises is not recorded."""
        t0 = time.perf_counter()
        yield
        self._seconds[name] = time.perf_counter() - t0

    def stage_seconds(self) -> dict[str, float]:
        return {name: round(seconds, 2) for name, seconds in self._seconds.items()}

    def wall_seconds(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def _check_writable(folder: Path, what: str) -> None:
    """Make ``folder`` and write a file in it, or fail in one line."""
    try:
        probe_writable(folder)
    except OSError as exc:
        raise ConfigError(
            f"{what} {folder} is not writable ({exc.strerror or exc}); expected a folder "
            "autolr can write in"
        ) from exc


def _folder_safe(name: str) -> str:
    """A task name as part of a folder name: runs of other characters become one '_'."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_.") or "task"


def _driver() -> str:
    """This process as ``host:pid:start``; the start time tells a reused pid apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:  # Linux: field 22 of /proc/<pid>/stat, in clock ticks since boot
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _driver_alive(driver: str | None) -> bool:
    """Whether the process that a run's driver tag names still runs; True when it can't tell."""
    try:
        host, pid, start = (driver or "").rsplit(":", 2)
        pid_number = int(pid)
    except ValueError:
        return True  # no tag, or not ours: leave the run alone
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return _start_time(pid_number) == start


def _in_use(record) -> bool:
    """Whether a pipeline run is finished or may still have its driver; else it is resumable.

    Only a RUNNING run can have a live driver. One that ended KILLED (SIGTERM) or
    FAILED is resumable from any host, also when its driver ran on another one, as
    when Kubernetes reruns a job whose head pod was evicted in a new pod.
    """
    return record.status == "FINISHED" or (
        record.status == "RUNNING" and _driver_alive(record.tags.get(DRIVER_TAG))
    )


def _fail_dead_runs(tracker: Tracker) -> None:
    """End as FAILED the pipeline runs whose driver died without ending them (e.g. SIGKILL)."""
    for record in tracker.find_runs({ROLE_TAG: "pipeline"}):
        if record.status == "RUNNING" and not _driver_alive(record.tags.get(DRIVER_TAG)):
            log.info(
                "run %s: its driver %s is gone; ending it as FAILED",
                record.run_id,
                record.tags.get(DRIVER_TAG),
            )
            dead = ParentRun(tracker, record.run_id)
            dead.end_trial_runs("FAILED")
            dead.end("FAILED")


def _pick_lrs(curve: RangeTestResult, cfg: Config, parent: ParentRun, tmp: Path) -> LRChoice:
    """Selection on the range test's curve, with the curve and the picks logged."""
    choice = None
    try:
        choice = run_selection(curve, cfg)
    finally:  # the curve is evidence, also when no LR can be picked from it
        _log_curve(parent, curve, choice, tmp)
    # The final max_lr/min_lr (the search may scale these) are logged when training starts.
    parent.log_params({"curve_max_lr": choice.max_lr, "curve_min_lr": choice.min_lr})
    parent.log_metrics({"lr_confidence": choice.confidence})
    log.info(
        "the curve picked max_lr=%.3g min_lr=%.3g (confidence %.2f): %s",
        choice.max_lr,
        choice.min_lr,
        choice.confidence,
        choice.reason,
    )
    return choice


def run_search(
    task: Task, choice: LRChoice, cfg: Config, parent: ParentRun, folder: str, *, resume: bool
) -> SearchResult:
    """The Ray Tune stage, in ``folder``; its best configuration is logged on the parent run."""
    from autolr.search import search

    storage, _, name = folder.rpartition("/")
    found = search(
        replace(task, test_set=None),  # the test split is the final model's alone
        choice,
        cfg.search,
        epochs=cfg.search.epochs or _epochs(task, cfg),
        tracking_uri=parent.tracking_uri,
        experiment_id=parent.tracker.experiment_id,
        parent_run_id=parent.run_id,
        storage_path=storage,
        name=name,
        resume=resume,
        ray_address=cfg.search.ray_address,
        progress=cfg.progress,
        range_test=cfg.range_test,
        selection_method=cfg.selection.method,
        train_seed=cfg.train.seed,  # the final run's: it can then reproduce the best trial
    )
    best = {
        "best_weight_decay": found.weight_decay,
        "best_lr_scale": found.lr_scale,
        "best_trial": found.best_trial_id,
    }
    if found.bn_searched:
        best["best_bn_momentum"] = found.bn_momentum
    parent.log_params(best)
    parent.log_metrics({f"best_trial_val_{found.metric}": found.val_metric})
    for note in found.notes:
        log.info("search: %s", note)
    return found


MODEL_ARTIFACT = "model/state_dict.pt"  # the final model's weights, on the pipeline's run


@dataclass(frozen=True, eq=False)
class FinalRun:
    """The final model: its training (or its trial's), its weights, where it came from."""

    trained: TrainResult
    weights: dict  # its state_dict, on the CPU
    source: FinalModel
    test_metric: float | None = None  # on the task's test split, if it has one
    test_loss: float | None = None


def _train_final(
    task: Task,
    choice: LRChoice,
    found: SearchResult | None,
    cfg: Config,
    parent: ParentRun,
    tmp: Path,
    *,
    retrain: bool = False,
) -> FinalRun:
    """1cycle for the full budget, with the search's best weight decay, BN momentum and LRs.

    When the best trial trained exactly that (same settings, seed and budget),
    its last checkpoint is the final model: it is only evaluated, not trained
    again (unless ``retrain``). Its weights are logged as `MODEL_ARTIFACT`.
    """
    import torch

    from autolr.plotting import plot_training
    from autolr.tracking import epoch_metrics
    from autolr.training import train

    wd, bn, threads = cfg.train.weight_decay, cfg.train.bn_momentum, None
    if found is not None:
        from autolr.search import trial_threads

        wd = found.weight_decay
        bn = found.bn_momentum if found.bn_searched else bn
        threads = trial_threads(found.resources)  # the trials' rounding: see `train`
    max_lr, min_lr = _final_lrs(choice, found)
    setup = {  # train()'s settings, as its checkpoints record them
        "max_lr": max_lr,
        "min_lr": min_lr,
        "epochs": _epochs(task, cfg),
        "weight_decay": wd,
        "bn_momentum": bn,
        "schedule": cfg.train.schedule,
        "seed": cfg.train.seed,
        "accumulation_steps": cfg.range_test.accumulation_steps,  # the LR's effective batch
    }
    # What the final model trained with, under the names the trial runs use, so that
    # the parent's row lines up with its trials' in the UI (train.* is the config).
    lr_scale = found.lr_scale if found is not None else 1.0
    parent.log_params({**{k: setup[k] for k in FINAL_PARAMS}, "lr_scale": lr_scale})
    metric_key = f"val_{task.metric_name}"
    if retrain and found is not None:
        state, why = None, "--retrain asked for it"
    else:
        state, why = _best_trial_state(task, found, setup, threads)
    if state is not None:
        best = found.best_trial_id
        source = FinalModel(reused_trial=best, reason=why)
        log.info("final model: trial %s's checkpoint, not trained again (%s)", best, why)
        history = tuple(EpochMetrics(**m) for m in state["history"])
        trained = TrainResult(
            history=history,
            metric=task.metric_name,
            val_metric=history[-1].val_metric,
            val_loss=history[-1].val_loss,
            seconds=sum(m.seconds for m in history),
        )
        for metrics in history:
            parent.log_metrics(epoch_metrics(metrics, metric_key), step=metrics.epoch)
        weights = state["model"]
    else:
        source = FinalModel(reused_trial=None, reason=why)
        log.info("final training with max_lr=%.3g min_lr=%.3g (%s)", max_lr, min_lr, why)
        final: dict[str, dict] = {}

        def on_epoch(metrics, state) -> None:
            parent.log_metrics(epoch_metrics(metrics, metric_key), step=metrics.epoch)
            if metrics.epoch == setup["epochs"]:
                final["weights"] = {k: v.cpu() for k, v in state()["model"].items()}

        trained = train(task, **setup, threads=threads, on_epoch=on_epoch, progress=cfg.progress)
        weights = final["weights"]
    parent.set_tags({FINAL_TAG: source.reused_trial or "trained"})
    parent.log_metrics({f"final_val_{trained.metric}": trained.val_metric})
    plot_training(trained, tmp / "training.png")
    parent.log_artifact(tmp / "training.png", "training")
    path = tmp / MODEL_ARTIFACT
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, path)  # plain tensors: loads with weights_only=True
    parent.log_artifact(path, str(Path(MODEL_ARTIFACT).parent))
    return FinalRun(trained, weights, source)


FINAL_PARAMS = ("max_lr", "min_lr", "epochs", "weight_decay", "bn_momentum", "schedule")
FINAL_TAG = "autolr.final_model"  # the trial whose checkpoint is the final model, or "trained"


def _best_trial_state(task, found, setup: dict, threads: int | None) -> tuple[dict | None, str]:
    """The best trial's last training state if it trained ``setup`` to its end; else why not.

    The checkpoint's weights are scored on the validation split again: a model
    that does not score what the trial reported is not taken.
    """
    from autolr.training import evaluate_weights, torch_threads

    if found is None:
        return None, "no search ran"
    best = next(t for t in found.trials if t.trial_id == found.best_trial_id)
    if best.epochs_run != setup["epochs"]:
        return None, (
            f"the best trial trained {best.epochs_run} epochs, the final run {setup['epochs']}"
        )
    if best.checkpoint is None:
        return None, "the best trial left no checkpoint"
    from autolr.search.outcome import trial_state

    try:
        state = trial_state(best.checkpoint)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        return None, f"the best trial's checkpoint {best.checkpoint} is unreadable: {exc}"[:500]
    saved = state["setup"]
    if not found.bn_searched:  # no BatchNorm layer: its momentum changes nothing
        saved = {**saved, "bn_momentum": setup["bn_momentum"]}
    changed = {k: (saved.get(k), v) for k, v in setup.items() if saved.get(k) != v}
    if changed or state["epoch"] != setup["epochs"]:
        return None, f"the best trial trained other settings: (trial, final) = {changed}"
    with torch_threads(threads):
        val_loss, val_metric = evaluate_weights(task, state["model"], task.val_set)
    reported = state["history"][-1]
    if not all(
        math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7)
        for got, want in ((val_loss, reported["val_loss"]), (val_metric, reported["val_metric"]))
    ):
        return None, (
            f"the best trial's checkpoint scores val_loss={val_loss:.6g} "
            f"val_{task.metric_name}={val_metric:.6g}, not the "
            f"{reported['val_loss']:.6g} / {reported['val_metric']:.6g} it reported"
        )
    return state, "the best trial trained this configuration for the full budget"


def _test_final(task: Task, final: FinalRun, parent: ParentRun) -> FinalRun:
    """The final model on the task's test split: the one look at it, after every choice.

    A task without a test split (a user's, usually) has no test metric.
    """
    from autolr.training import evaluate_weights

    if task.test_set is None:
        return final
    test_loss, test_metric = evaluate_weights(task, final.weights, task.test_set)
    parent.log_metrics({f"test_{task.metric_name}": test_metric, "test_loss": test_loss})
    log.info("test split: test_%s=%.4f", task.metric_name, test_metric)
    return replace(final, test_metric=test_metric, test_loss=test_loss)


def _epochs(task: Task, cfg: Config) -> int:
    return cfg.train.epochs or task.epochs or 10


def _final_lrs(choice: LRChoice, found) -> tuple[float, float]:
    """The final run's 1cycle range: the best trial's when there was a search, else the curve's."""
    if found is None:
        return choice.max_lr, choice.min_lr
    return found.max_lr, found.min_lr


def _result(
    cfg: Config,
    curve: RangeTestResult,
    choice: LRChoice,
    found: SearchResult | None,
    final: FinalRun,
    parent: ParentRun,
    clock: StageClock,
) -> PipelineResult:
    """The finished run's result, timed up to now."""
    trained = final.trained
    max_lr, min_lr = _final_lrs(choice, found)
    if found is not None:
        best = BestConfig(
            weight_decay=found.weight_decay,
            bn_momentum=found.bn_momentum,
            max_lr=found.max_lr,
            min_lr=found.min_lr,
            lr_scale=found.lr_scale,
            val_metric=found.val_metric,
            trial_id=found.best_trial_id,
        )
        search = SearchInfo(
            enabled=True,
            notes=found.notes,
            bn_searched=found.bn_searched,
            resources_per_trial=dict(found.resources),
            experiment_path=found.experiment_path,
        )
    else:  # the configured values are the best we have
        best = BestConfig(
            weight_decay=cfg.train.weight_decay,
            bn_momentum=cfg.train.bn_momentum,
            max_lr=max_lr,
            min_lr=min_lr,
            lr_scale=1.0,
            val_metric=trained.val_metric,
            trial_id=None,
        )
        search = SearchInfo(
            enabled=False,
            notes=(
                "search disabled: trained with the configured weight_decay and bn_momentum "
                "and the curve's LR range",
            ),
        )
    return PipelineResult(
        task=cfg.task,
        metric=trained.metric,
        val_metric=trained.val_metric,
        val_loss=trained.val_loss,
        max_lr=max_lr,
        min_lr=min_lr,
        choice=choice,
        history=trained.history,
        range_test=CurveStats.of(curve),
        best=best,
        trials=found.trials if found is not None else (),
        search=search,
        stage_seconds=clock.stage_seconds(),
        tracking_uri=parent.tracking_uri,
        run_id=parent.run_id,
        final_model=final.source,
        test_metric=final.test_metric,
        test_loss=final.test_loss,
        wall_seconds=clock.wall_seconds(),
    )


def _config_key(cfg: Config) -> str:
    """What must match for a run to resume another: the config, less how it is shown."""
    fields = {k: v for k, v in cfg.to_dict().items() if k != "progress"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _write_state(folder: str, state: dict[str, Any]) -> None:
    """Write the resume state atomically: a kill mid-write must not corrupt it."""
    if "://" in folder:  # an object store applies one PUT whole or not at all
        _write_uri(f"{folder}/{STATE_FILE}", json.dumps(state))
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{STATE_FILE}.partial"
    partial.write_text(json.dumps(state))
    os.replace(partial, folder / STATE_FILE)


def _new_state(
    cfg: Config, parent: ParentRun, folder: str, curve: RangeTestResult, choice: LRChoice
) -> dict[str, Any]:
    # to_dict has the scalars and tuples; the evidence curve goes along for the plot
    choice_fields = {
        **choice.to_dict(),
        "log_lrs": choice.log_lrs.tolist(),
        "smoothed": choice.smoothed.tolist(),
    }
    return {
        "config": _config_key(cfg),
        "run_id": parent.run_id,
        "tracking_uri": parent.tracking_uri,
        "experiment": cfg.tracking.experiment,
        "name": folder.rpartition("/")[2],
        "curve": curve.to_dict(),
        "choice": choice_fields,
        "finished": False,
    }


def _find_resumable(tracker: Tracker, cfg: Config, resume: bool | str) -> dict[str, Any] | None:
    """The saved state of the run to resume, with its folder; None if there is none.

    ``resume`` is a run id, or True for the newest unfinished run of this config
    whose driver is gone. Only the folder the run recorded is read, and only if
    the state in it names that run as its owner.
    """
    key = _config_key(cfg)
    if isinstance(resume, str):
        record = tracker.get_run(resume)
        if record is None or record.tags.get(ROLE_TAG) != "pipeline":
            raise ConfigError(
                f"--resume {resume}: expected the id of a pipeline run in experiment "
                f"{cfg.tracking.experiment!r} of {tracker.tracking_uri}, but there is none"
            )
        if record.tags.get(CONFIG_TAG) != key:
            raise ConfigError(
                f"--resume {resume}: the run was started with another config; expected the "
                "same --config, --task and --set values as its first start"
            )
        if _in_use(record):
            what = "finished" if record.status == "FINISHED" else "still running"
            raise ConfigError(f"--resume {resume}: expected an interrupted run, but it is {what}")
        state = _read_state(record)
        if state is None:
            raise ConfigError(
                f"--resume {resume}: the run stopped before its search started, so there is "
                "nothing to resume; start a new run"
            )
        return state
    for record in reversed(tracker.find_runs({CONFIG_TAG: key})):  # newest first
        if _in_use(record):
            continue
        state = _read_state(record)
        if state is not None:
            return state
    return None


def _read_state(record) -> dict[str, Any] | None:
    """The unfinished state in the folder ``record`` recorded, checked; None if it has none."""
    folder = record.tags.get(FOLDER_TAG)
    path = f"{folder}/{STATE_FILE}"
    try:
        text = _read_text(path) if folder else None
        if text is None:
            return None
        state = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the resume state {path}: {exc}") from exc
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(
            f"the resume state {path} lacks {missing}; expected the keys {list(STATE_KEYS)} "
            "that autolr writes"
        )
    if state["run_id"] != record.run_id or state["name"] != folder.rpartition("/")[2]:
        raise ConfigError(
            f"the resume state {path} belongs to run {state['run_id']!r} "
            f"(folder {state['name']!r}), not to run {record.run_id}; refusing to restore it"
        )
    if state["finished"]:
        return None
    state["folder"] = folder
    state["choice"]["log_lrs"] = np.asarray(state["choice"]["log_lrs"])
    state["choice"]["smoothed"] = np.asarray(state["choice"]["smoothed"])
    state["choice"]["changepoints"] = tuple(state["choice"]["changepoints"])
    state["choice"]["warnings"] = tuple(state["choice"]["warnings"])
    return state


def _mark_finished(folder: str) -> None:
    state = json.loads(_read_text(f"{folder}/{STATE_FILE}"))
    _write_state(folder, {**state, "finished": True})


def _read_text(path: str) -> str | None:
    """The text of a local file or of an object at a URI (s3://...); None if there is none."""
    if "://" not in path:
        return Path(path).read_text() if Path(path).is_file() else None
    import pyarrow.fs

    fs, where = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(where).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(where) as stream:
        return stream.read().decode()


def _write_uri(uri: str, text: str) -> None:
    import pyarrow.fs

    fs, where = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(where) as stream:
        stream.write(text.encode())


def _log_curve(parent: ParentRun, curve: RangeTestResult, choice: LRChoice | None, tmp: Path):
    from autolr.plotting import plot_range_test

    (tmp / "range_test.csv").write_text(range_test_table(curve, choice))
    plot_range_test(curve, choice, tmp / "range_test.png")
    for name in ("range_test.csv", "range_test.png"):
        parent.log_artifact(tmp / name, "range_test")
    # also as metric series over the curve's points, so runs overlay in the UI
    parent.log_series(
        {"range_test_loss": curve.losses.tolist(), "range_test_lr": curve.lrs.tolist()}
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def format_summary(result: PipelineResult) -> str:
    """The console's summary of a run."""
    curve, best = result.choice, result.best
    lines = [
        f"task        {result.task}",
        f"curve pick  max_lr={curve.max_lr:.4g}  min_lr={curve.min_lr:.4g}  "
        f"confidence={curve.confidence:.2f}  ({curve.method})",
        f"            {curve.reason}",
    ]
    if result.trials:
        bn = best.bn_momentum
        lines.append(
            f"search      {len(result.trials)} trials: best weight_decay={best.weight_decay:.3g}  "
            + (f"bn_momentum={bn:.3g}  " if bn is not None else "bn_momentum not searched  ")
            + f"lr_scale={best.lr_scale:.3g}  "
            + f"(trial val_{result.metric}={best.val_metric:.4f})"
        )
        lines += [f"            {note}" for note in result.search.notes]
    lines += [
        f"lr range    max_lr={result.max_lr:.4g}  min_lr={result.min_lr:.4g}  "
        + ("(the best trial's)" if result.trials else "(the curve's pick)"),
        f"result      val_{result.metric}={result.val_metric:.4f} after {result.epochs} epochs",
    ]
    source = result.final_model
    if source.reused_trial:
        lines.append(
            f"            trial {source.reused_trial}'s checkpoint, evaluated, not trained "
            f"again: {source.reason}"
        )
    elif result.trials:
        lines.append(f"            trained again: {source.reason}")
    if result.test_metric is not None:
        lines.append(
            f"test        test_{result.metric}={result.test_metric:.4f} "
            "(held out from the search and selection)"
        )
    lines += [
        f"time        {result.wall_seconds:.1f} s  "
        + "  ".join(f"{k}={v:.1f}s" for k, v in result.stage_seconds.items()),
        f"mlflow      run {result.run_id} in {result.tracking_uri} (the model: {MODEL_ARTIFACT})",
    ]
    for warning in curve.warnings:
        lines.append(f"warning     {warning}")
    for error in result.mlflow_errors or ():
        lines.append(f"warning     {error}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m autolr.pipeline",
        description="Pick the 1cycle learning-rate range automatically and train with it.",
    )
    parser.add_argument("--config", help="YAML config (default: pipelines/default.yaml)")
    parser.add_argument("--task", help="built-in task name or module:function (overrides config)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument("--output", help="write the summary JSON here")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: ./mlruns, sqlite)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_ID",
        help="continue an interrupted run of this config: the MLflow run RUN_ID, or without it "
        "the newest one the tracking store records (Tuner.restore of that run's own folder)",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train the final model even when the best trial's checkpoint already holds it",
    )
    parser.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """The config the command line asks for: the file, then --set, then the named options."""
    overrides = list(args.set)
    if args.task:
        overrides.append(f"task={args.task}")
    if args.tracking_uri:
        overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
    if args.ray_address:
        overrides.append(f"search.ray_address={args.ray_address}")
    if args.no_progress:
        overrides.append("progress=false")
    config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return load_config(config_path, overrides)


class _SignalStop:
    """The handler of SIGINT (Ctrl-C) and SIGTERM (`docker stop`, Kubernetes, `ray job stop`).

    It raises `Interrupted` until the pipeline takes it up (`take`), which then
    ends the runs as KILLED; signals after that are ignored, so the cleanup runs
    to its end. Python drops an exception raised in a ``__del__`` or a weakref
    callback (seen in sqlalchemy's), so until it is taken the signal is sent again.
    """

    RESEND_S = 1.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self.taken = self.active = False
        self._lock = threading.Lock()  # no resend once taken or uninstalled
        self._session = 0  # which `installed` block a resend belongs to

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.signum, self.taken, self.active = None, False, True
        self._session += 1
        saved = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        unraisable = sys.unraisablehook

        def quiet(dropped) -> None:  # a dropped Interrupted is sent again: no traceback for it
            if not isinstance(dropped.exc_value, Interrupted):
                unraisable(dropped)

        sys.unraisablehook = quiet
        try:
            yield
        finally:
            with self._lock:
                self.active = False
            sys.unraisablehook = unraisable
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def take(self) -> None:
        with self._lock:
            self.taken = True

    def __call__(self, signum: int, _frame) -> None:
        if self.taken or not self.active:  # taken, or main is returning: let it finish
            log.info("%s: already stopping", signal.Signals(signum).name)
            return
        if self.signum is None:
            self.signum = signum
            resend = threading.Thread(target=self._resend, args=(signum, self._session))
            resend.daemon = True
            resend.start()
        raise Interrupted(self.signum)

    def _resend(self, signum: int, session: int) -> None:
        # A resend still asleep when its run ended must not reach the next run in
        # this process (a notebook, a test): it checks that its session is current.
        while True:
            time.sleep(self.RESEND_S)
            with self._lock:
                if self.taken or not self.active or self._session != session:
                    return
                os.kill(os.getpid(), signum)


_signals = _SignalStop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)  # ours only: mlflow, alembic and ray keep their own levels
    log.setLevel(logging.INFO)
    try:
        with _signals.installed():
            result = run(
                config_from_args(args),
                output=args.output,
                resume=args.resume,
                retrain=args.retrain,
            )
    except KeyboardInterrupt:  # 128 + the signal, as a shell reports it
        # Not the exception's: Ray re-raises an interrupt in its calls as a plain one.
        signum = _signals.signum or signal.SIGINT
        print(
            f"autolr: stopped by {signal.Signals(signum).name}; its MLflow runs are KILLED "
            "(continue with --resume)",
            file=sys.stderr,
        )
        return 128 + signum
    except AutoLRError as exc:  # the user's to fix: one line; anything else is a bug
        if args.debug:
            raise
        print(f"autolr: error: {exc}", file=sys.stderr)
        return 2
    finally:  # a later main() in this process must not write to this one's stderr
        log.removeHandler(handler)
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
