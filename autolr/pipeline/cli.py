"""``python -m autolr.pipeline``: the command line, its console summary and its exit codes."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from autolr.config import Config, load_config
from autolr.errors import AutoLRError
from autolr.pipeline.final import MODEL_ARTIFACT
from autolr.pipeline.signals import _signals
from autolr.pipeline.stages import run
from autolr.results import PipelineResult

log = logging.getLogger("autolr")


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "pipelines" / "default.yaml"


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
