"""`run`: range test -> selection -> search -> final model, each stage a function of the
config and the previous stages' frozen results; MLflow logging happens here, around the
stages, never inside them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from autolr._checks import probe_writable
from autolr.config import Config
from autolr.errors import ConfigError
from autolr.pipeline.final import FinalRun, _epochs, _final_lrs, _test_final, _train_final
from autolr.pipeline.parent_run import ParentRun
from autolr.pipeline.resume import (
    _fail_dead_runs,
    _mark_finished,
    _new_state,
    _open_run,
    _write_state,
)
from autolr.pipeline.signals import _signals
from autolr.results import (
    BestConfig,
    CurveStats,
    LRChoice,
    PipelineResult,
    RangeTestResult,
    SearchInfo,
    SearchResult,
)
from autolr.tasks import Task, build_task, resolve

log = logging.getLogger("autolr")


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
    storage = _checked_storage(cfg, output)
    tracker = Tracker(resolve_tracking_uri(cfg.tracking.tracking_uri), cfg.tracking.experiment)
    _fail_dead_runs(tracker)
    parent, folder, saved = _open_run(tracker, cfg, task.name, storage, resume)
    status = "FAILED"
    try:
        with (
            parent.system_metrics(resume=saved is not None),
            tempfile.TemporaryDirectory(prefix="autolr-") as tmp,
        ):
            tmp = Path(tmp)
            if saved is not None:  # the curve and the pick the run made before it stopped
                curve = RangeTestResult(**saved["curve"])
                choice = LRChoice(**saved["choice"])
            else:
                curve, choice = _pick_lrs(task, cfg, parent, tmp, clock)
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


def _checked_storage(cfg: Config, output: str | Path | None) -> str:
    """The search's folder, an absolute path or a URI such as s3://bucket/prefix.

    It and ``output``'s folder are checked before any work: a failure to write
    there would lose the run's end.
    """
    storage = cfg.search.storage_path or "ray_results"
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    if output is not None:
        _check_writable(Path(output).expanduser().resolve().parent, "--output's folder")
    if cfg.search.enabled and "://" not in storage:
        _check_writable(Path(storage), "the search's storage folder (search.storage_path)")
    elif cfg.search.enabled:
        from autolr.search import check_storage

        check_storage(storage)
    return storage


def _check_writable(folder: Path, what: str) -> None:
    """Make ``folder`` and write a file in it, or fail in one line."""
    try:
        probe_writable(folder)
    except OSError as exc:
        raise ConfigError(
            f"{what} {folder} is not writable ({exc.strerror or exc}); expected a folder "
            "autolr can write in"
        ) from exc


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


def _pick_lrs(
    task: Task, cfg: Config, parent: ParentRun, tmp: Path, clock: StageClock
) -> tuple[RangeTestResult, LRChoice]:
    """Range test and selection, with the config, the curve and the picks logged."""
    parent.log_params(_flatten(cfg.to_dict()))
    rt = cfg.range_test
    log.info("range test on %s (%d x %d steps)", task.name, rt.repeats, rt.num_iter)
    with clock.stage("range_test"):
        curve = run_range_test(task, cfg)
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
    return curve, choice


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


def _log_curve(
    parent: ParentRun, curve: RangeTestResult, choice: LRChoice | None, tmp: Path
) -> None:
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


def run_search(
    task: Task, choice: LRChoice, cfg: Config, parent: ParentRun, folder: str, *, resume: bool
) -> SearchResult:
    """The Ray Tune stage, in ``folder``; its best configuration is logged on the parent run."""
    from autolr.search import SearchSite, TrialPlan, search

    storage, _, name = folder.rpartition("/")
    site = SearchSite(
        tracking_uri=parent.tracking_uri,
        experiment_id=parent.tracker.experiment_id,
        parent_run_id=parent.run_id,
        storage_path=storage,
        name=name,
        ray_address=cfg.search.ray_address,
    )
    plan = TrialPlan(
        epochs=cfg.search.epochs or _epochs(task, cfg),
        seed=cfg.train.seed,  # the final run's: it can then reproduce the best trial
        range_test=cfg.range_test,
        selection_method=cfg.selection.method,
    )
    found = search(
        replace(task, test_set=None),  # the test split is the final model's alone
        choice,
        cfg.search,
        site,
        plan,
        resume=resume,
        progress=cfg.progress,
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
