"""``python -m autolr.pipeline``: range test -> selection -> 1cycle training.

Each stage is a function of the config and the previous stage's frozen
result; MLflow logging happens here, around the stages, never inside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from autolr.config import Config, load_config
from autolr.errors import AutoLRError
from autolr.results import LRChoice, RangeTestResult, TrainResult
from autolr.tasks import Task, build_task, resolve

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


def run(cfg: Config, output: str | Path | None = None, *, resume: bool = False) -> dict[str, Any]:
    """Run the whole pipeline; return (and optionally write) the summary.

    With ``resume``, the newest unfinished search of this task under the
    search's storage path is continued: same MLflow run, same LR pick, the
    search restored from Tune's checkpoints, then the final training.
    """
    from autolr.tracking import Tracker, resolve_tracking_uri

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    task = build_task(resolve(cfg.task), **cfg.task_params)
    storage = Path(cfg.search.storage_path or "ray_results").expanduser().resolve()
    saved = _find_resumable(storage, task.name, cfg) if resume else None
    if resume and saved is None:
        log.info("nothing to resume under %s; starting a new run", storage)
    if saved is not None:
        tracker = Tracker(saved["tracking_uri"], saved["experiment"])
        run_id, name = saved["run_id"], saved["name"]
        tracker.reopen_run(run_id)
        log.info("resuming run %s (search %s)", run_id, name)
    else:
        tracker = Tracker(resolve_tracking_uri(cfg.tracking.tracking_uri), cfg.tracking.experiment)
        run_id = tracker.start_run(cfg.tracking.run_name or f"autolr-{task.name}")
        name = f"autolr-{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tracker.log_params(run_id, _flatten(cfg.to_dict()))
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory(prefix="autolr-") as tmp:
            tmp = Path(tmp)
            if saved is not None:
                curve = RangeTestResult(**saved["curve"])
                choice = LRChoice(**saved["choice"])
            else:
                curve, choice = _pick_lrs(task, cfg, tracker, run_id, tmp, seconds)
                if cfg.search.enabled:
                    _write_state(
                        storage / name, _new_state(cfg, tracker, run_id, name, curve, choice)
                    )
            found = None
            if cfg.search.enabled:
                t0 = time.perf_counter()
                found = run_search(
                    task, choice, cfg, tracker, run_id, storage, name, resume=saved is not None
                )
                seconds["search"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            trained = _train_final(task, choice, found, cfg, tracker, run_id, tmp)
            seconds["train"] = time.perf_counter() - t0
            summary = _summary(cfg, curve, choice, found, trained, tracker, run_id, seconds)
            summary["wall_seconds"] = round(time.perf_counter() - started, 2)
            tracker.log_metrics(run_id, {"wall_seconds": summary["wall_seconds"]})
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
            tracker.log_artifact(run_id, tmp / "summary.json")
        status = "FINISHED"
        if cfg.search.enabled:
            _mark_finished(storage / name)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_run(run_id, status)
    summary["mlflow"]["errors"] = list(tracker.errors)
    if output is not None:
        Path(output).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _pick_lrs(task, cfg, tracker, run_id, tmp: Path, seconds) -> tuple[RangeTestResult, LRChoice]:
    """Range test and selection, with the curve and the picks logged."""
    t0 = time.perf_counter()
    rt = cfg.range_test
    log.info("range test on %s (%d x %d steps)", task.name, rt.repeats, rt.num_iter)
    curve = run_range_test(task, cfg)
    seconds["range_test"] = time.perf_counter() - t0
    choice = None
    try:
        choice = run_selection(curve, cfg)
    finally:  # the curve is evidence, also when no LR can be picked from it
        _log_curve(tracker, run_id, curve, choice, tmp)
    # The final max_lr/min_lr (the search may scale these) are logged when training starts.
    tracker.log_params(run_id, {"curve_max_lr": choice.max_lr, "curve_min_lr": choice.min_lr})
    tracker.log_metrics(run_id, {"lr_confidence": choice.confidence})
    log.info(
        "the curve picked max_lr=%.3g min_lr=%.3g (confidence %.2f): %s",
        choice.max_lr,
        choice.min_lr,
        choice.confidence,
        choice.reason,
    )
    return curve, choice


def run_search(task, choice, cfg: Config, tracker, run_id, storage: Path, name: str, *, resume):
    """The Ray Tune stage; its best configuration is logged on the parent run."""
    from autolr.search import search

    found = search(
        task,
        choice,
        cfg.search,
        epochs=cfg.search.epochs or _epochs(task, cfg),
        tracking_uri=tracker.tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=run_id,
        storage_path=str(storage),
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
    tracker.log_params(run_id, best)
    tracker.log_metrics(run_id, {f"best_trial_val_{found.metric}": found.val_metric})
    for note in found.notes:
        log.info("search: %s", note)
    return found


def _train_final(task, choice, found, cfg: Config, tracker, run_id, tmp: Path) -> TrainResult:
    """1cycle for the full budget, with the search's best weight decay, BN momentum and LRs."""
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
    tracker.log_params(run_id, {"max_lr": max_lr, "min_lr": min_lr})
    log.info("final training with max_lr=%.3g min_lr=%.3g", max_lr, min_lr)
    metric_key = f"val_{task.metric_name}"
    trained = train(
        task,
        max_lr=max_lr,
        min_lr=min_lr,
        epochs=_epochs(task, cfg),
        weight_decay=wd,
        bn_momentum=bn,
        schedule=cfg.train.schedule,
        seed=cfg.train.seed,
        accumulation_steps=cfg.range_test.accumulation_steps,  # the LR's effective batch
        threads=threads,
        on_epoch=lambda m, _state: tracker.log_metrics(
            run_id, epoch_metrics(m, metric_key), step=m.epoch
        ),
        progress=cfg.progress,
    )
    tracker.log_metrics(run_id, {f"final_val_{trained.metric}": trained.val_metric})
    plot_training(trained, tmp / "training.png")
    tracker.log_artifact(run_id, tmp / "training.png", "training")
    return trained


def _epochs(task: Task, cfg: Config) -> int:
    return cfg.train.epochs or task.epochs or 10


def _final_lrs(choice: LRChoice, found) -> tuple[float, float]:
    """The final run's 1cycle range: the best trial's when there was a search, else the curve's."""
    if found is None:
        return choice.max_lr, choice.min_lr
    return found.max_lr, found.min_lr


def _summary(cfg, curve, choice, found, trained, tracker, run_id, seconds) -> dict[str, Any]:
    max_lr, min_lr = _final_lrs(choice, found)
    summary: dict[str, Any] = {
        "task": cfg.task,
        "metric": trained.metric,
        "val_metric": trained.val_metric,
        "val_loss": trained.val_loss,
        "max_lr": max_lr,  # what the final run trained with
        "min_lr": min_lr,
        "curve_pick": {
            "max_lr": choice.max_lr,
            "min_lr": choice.min_lr,
            "confidence": choice.confidence,
        },
        "confidence": choice.confidence,
        "method": choice.method,
        "reason": choice.reason,
        "warnings": list(choice.warnings),
        "epochs": len(trained.history),
        "history": [vars(m) for m in trained.history],  # the final training, epoch by epoch
        "range_test": {
            "points": int(curve.lrs.size),
            "stop_reason": curve.stop_reason,
            "steps": curve.steps,  # every sweep's optimizer steps, all repeats included
            "note": curve.note,
        },
    }
    if found is not None:
        summary["best"] = {
            "weight_decay": found.weight_decay,
            "bn_momentum": found.bn_momentum,
            "max_lr": found.max_lr,
            "min_lr": found.min_lr,
            "lr_scale": found.lr_scale,
            "val_metric": found.val_metric,
            "trial_id": found.best_trial_id,
        }
        summary["trials"] = [t.to_dict() for t in found.trials]
        summary["search"] = {
            "enabled": True,
            "bn_searched": found.bn_searched,
            "notes": list(found.notes),
            "resources_per_trial": dict(found.resources),
            "experiment_path": found.experiment_path,
        }
    else:  # the configured values are the best we have
        summary["best"] = {
            "weight_decay": cfg.train.weight_decay,
            "bn_momentum": cfg.train.bn_momentum,
            "max_lr": max_lr,
            "min_lr": min_lr,
            "lr_scale": 1.0,
            "val_metric": trained.val_metric,
            "trial_id": None,
        }
        summary["trials"] = []
        summary["search"] = {
            "enabled": False,
            "notes": [
                "search disabled: trained with the configured weight_decay and bn_momentum "
                "and the curve's LR range"
            ],
        }
    summary["stage_seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    summary["mlflow"] = {"tracking_uri": tracker.tracking_uri, "run_id": run_id}
    return summary


def _config_key(cfg: Config) -> str:
    """What must match for a run to resume another: the config, less how it is shown."""
    fields = {k: v for k, v in cfg.to_dict().items() if k != "progress"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    """Write the resume state atomically: a kill mid-write must not corrupt it."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{STATE_FILE}.partial"
    partial.write_text(json.dumps(state))
    os.replace(partial, folder / STATE_FILE)


def _new_state(cfg, tracker, run_id, name, curve, choice) -> dict[str, Any]:
    # to_dict has the scalars and tuples; the evidence curve goes along for the plot
    choice_fields = {
        **choice.to_dict(),
        "log_lrs": choice.log_lrs.tolist(),
        "smoothed": choice.smoothed.tolist(),
    }
    return {
        "config": _config_key(cfg),
        "run_id": run_id,
        "tracking_uri": tracker.tracking_uri,
        "experiment": cfg.tracking.experiment,
        "name": name,
        "curve": curve.to_dict(),
        "choice": choice_fields,
        "finished": False,
    }


def _find_resumable(storage: Path, task_name: str, cfg: Config) -> dict[str, Any] | None:
    """The newest unfinished pipeline state of this task and config under ``storage``."""
    states = sorted(
        storage.glob(f"autolr-{task_name}-*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime
    )
    for path in reversed(states):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping unreadable resume state %s: %s", path, exc)
            continue
        if state["finished"]:
            continue
        if state.get("config") != _config_key(cfg):
            log.info("not resuming %s: it was started with another config", path.parent.name)
            continue
        state["choice"]["log_lrs"] = np.asarray(state["choice"]["log_lrs"])
        state["choice"]["smoothed"] = np.asarray(state["choice"]["smoothed"])
        state["choice"]["changepoints"] = tuple(state["choice"]["changepoints"])
        state["choice"]["warnings"] = tuple(state["choice"]["warnings"])
        return state
    return None


def _mark_finished(folder: Path) -> None:
    state = json.loads((folder / STATE_FILE).read_text())
    _write_state(folder, {**state, "finished": True})


def _log_curve(tracker, run_id, curve: RangeTestResult, choice: LRChoice | None, tmp: Path):
    from autolr.plotting import plot_range_test

    (tmp / "range_test.csv").write_text(range_test_table(curve, choice))
    plot_range_test(curve, choice, tmp / "range_test.png")
    for name in ("range_test.csv", "range_test.png"):
        tracker.log_artifact(run_id, tmp / name, "range_test")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def format_summary(summary: dict[str, Any]) -> str:
    curve, best = summary["curve_pick"], summary["best"]
    lines = [
        f"task        {summary['task']}",
        f"curve pick  max_lr={curve['max_lr']:.4g}  min_lr={curve['min_lr']:.4g}  "
        f"confidence={curve['confidence']:.2f}  ({summary['method']})",
        f"            {summary['reason']}",
    ]
    if summary["trials"]:
        trials, bn = summary["trials"], best["bn_momentum"]
        lines.append(
            f"search      {len(trials)} trials: best weight_decay={best['weight_decay']:.3g}  "
            + (f"bn_momentum={bn:.3g}  " if bn is not None else "bn_momentum not searched  ")
            + f"lr_scale={best['lr_scale']:.3g}  "
            + f"(trial val_{summary['metric']}={best['val_metric']:.4f})"
        )
        lines += [f"            {note}" for note in summary["search"]["notes"]]
    lines += [
        f"lr range    max_lr={summary['max_lr']:.4g}  min_lr={summary['min_lr']:.4g}  "
        + ("(the best trial's)" if summary["trials"] else "(the curve's pick)"),
        f"result      val_{summary['metric']}={summary['val_metric']:.4f} "
        f"after {summary['epochs']} epochs",
        f"time        {summary['wall_seconds']:.1f} s  "
        + "  ".join(f"{k}={v:.1f}s" for k, v in summary["stage_seconds"].items()),
        f"mlflow      run {summary['mlflow']['run_id']} in {summary['mlflow']['tracking_uri']}",
    ]
    for warning in summary["warnings"]:
        lines.append(f"warning     {warning}")
    for error in summary["mlflow"].get("errors", []):
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
        action="store_true",
        help="continue this task's newest interrupted search (Tuner.restore)",
    )
    parser.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)  # ours only: mlflow, alembic and ray keep their own levels
    log.setLevel(logging.INFO)
    # `ray job stop`, `docker stop` and Kubernetes send SIGTERM: end the runs as KILLED.
    signal.signal(signal.SIGTERM, _interrupt)
    overrides = list(args.set)
    if args.task:
        overrides.append(f"task={args.task}")
    if args.tracking_uri:
        overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
    if args.ray_address:
        overrides.append(f"search.ray_address={args.ray_address}")
    if args.no_progress:
        overrides.append("progress=false")
    try:
        config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
        cfg = load_config(config_path, overrides)
        if args.output:  # fail now, not after the whole run
            Path(args.output).resolve().parent.mkdir(parents=True, exist_ok=True)
        summary = run(cfg, output=args.output, resume=args.resume)
    except (AutoLRError, ValueError) as exc:
        if args.debug:
            raise
        print(f"autolr: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
