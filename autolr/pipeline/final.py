"""The final model: the best trial's checkpoint when it trained the final configuration, else
trained for the full budget; then its one look at the test split.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

from autolr.config import Config
from autolr.pipeline.parent_run import ParentRun
from autolr.results import EpochMetrics, FinalModel, LRChoice, SearchResult, TrainResult
from autolr.tasks import Task

log = logging.getLogger("autolr")

MODEL_ARTIFACT = "model/state_dict.pt"  # the final model's weights, on the pipeline's run
FINAL_PARAMS = ("max_lr", "min_lr", "epochs", "weight_decay", "bn_momentum", "schedule")
FINAL_TAG = "autolr.final_model"  # the trial whose checkpoint is the final model, or "trained"


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
    setup, threads = _final_setup(task, choice, found, cfg)
    # What the final model trained with, under the names the trial runs use, so that
    # the parent's row lines up with its trials' in the UI (train.* is the config).
    lr_scale = found.lr_scale if found is not None else 1.0
    parent.log_params({**{k: setup[k] for k in FINAL_PARAMS}, "lr_scale": lr_scale})
    if retrain and found is not None:
        state, why = None, "--retrain asked for it"
    else:
        state, why = _best_trial_state(task, found, setup, threads)
    if state is not None:
        best = found.best_trial_id
        log.info("final model: trial %s's checkpoint, not trained again (%s)", best, why)
        trained = _trial_training(task, state, parent)
        final = FinalRun(trained, state["model"], FinalModel(reused_trial=best, reason=why))
    else:
        max_lr, min_lr = setup["max_lr"], setup["min_lr"]
        log.info("final training with max_lr=%.3g min_lr=%.3g (%s)", max_lr, min_lr, why)
        trained, weights = _train(task, setup, threads, parent, progress=cfg.progress)
        final = FinalRun(trained, weights, FinalModel(reused_trial=None, reason=why))
    _log_final(final, parent, tmp)
    return final


def _final_setup(
    task: Task, choice: LRChoice, found: SearchResult | None, cfg: Config
) -> tuple[dict, int | None]:
    """train()'s settings for the final model, as its checkpoints record them, and its threads."""
    wd, bn, threads = cfg.train.weight_decay, cfg.train.bn_momentum, None
    if found is not None:
        from autolr.search import trial_threads

        wd = found.weight_decay
        bn = found.bn_momentum if found.bn_searched else bn
        threads = trial_threads(found.resources)  # the trials' rounding: see `train`
    max_lr, min_lr = _final_lrs(choice, found)
    setup = {
        "max_lr": max_lr,
        "min_lr": min_lr,
        "epochs": _epochs(task, cfg),
        "weight_decay": wd,
        "bn_momentum": bn,
        "schedule": cfg.train.schedule,
        "seed": cfg.train.seed,
        "accumulation_steps": cfg.range_test.accumulation_steps,  # the LR's effective batch
    }
    return setup, threads


def _trial_training(task: Task, state: dict, parent: ParentRun) -> TrainResult:
    """The best trial's training, as its checkpoint recorded it, logged epoch by epoch."""
    from autolr.tracking import epoch_metrics

    history = tuple(EpochMetrics(**m) for m in state["history"])
    for metrics in history:
        parent.log_metrics(epoch_metrics(metrics, f"val_{task.metric_name}"), step=metrics.epoch)
    return TrainResult(
        history=history,
        metric=task.metric_name,
        val_metric=history[-1].val_metric,
        val_loss=history[-1].val_loss,
        seconds=sum(m.seconds for m in history),
    )


def _train(
    task: Task, setup: dict, threads: int | None, parent: ParentRun, *, progress: bool
) -> tuple[TrainResult, dict]:
    """Train ``setup``, logging each epoch; returns the result and the last epoch's weights."""
    from autolr.tracking import epoch_metrics
    from autolr.training import train

    final: dict[str, dict] = {}

    def on_epoch(metrics, state) -> None:
        parent.log_metrics(epoch_metrics(metrics, f"val_{task.metric_name}"), step=metrics.epoch)
        if metrics.epoch == setup["epochs"]:
            final["weights"] = {k: v.cpu() for k, v in state()["model"].items()}

    trained = train(task, **setup, threads=threads, on_epoch=on_epoch, progress=progress)
    return trained, final["weights"]


def _log_final(final: FinalRun, parent: ParentRun, tmp: Path) -> None:
    """Where the final model came from, its score, its training plot and its weights."""
    import torch

    from autolr.plotting import plot_training

    trained = final.trained
    parent.set_tags({FINAL_TAG: final.source.reused_trial or "trained"})
    parent.log_metrics({f"final_val_{trained.metric}": trained.val_metric})
    plot_training(trained, tmp / "training.png")
    parent.log_artifact(tmp / "training.png", "training")
    path = tmp / MODEL_ARTIFACT
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(final.weights, path)  # plain tensors: loads with weights_only=True
    parent.log_artifact(path, str(Path(MODEL_ARTIFACT).parent))


def _best_trial_state(
    task: Task, found: SearchResult | None, setup: dict, threads: int | None
) -> tuple[dict | None, str]:
    """The best trial's last training state if it trained ``setup`` to its end; else why not.

    The checkpoint's weights are scored on the validation split again: a model
    that does not score what the trial reported is not taken.
    """
    from autolr.training import changed_settings, evaluate_weights, torch_threads

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
    changed = changed_settings(saved, setup)
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


def _final_lrs(choice: LRChoice, found: SearchResult | None) -> tuple[float, float]:
    """The final run's 1cycle range: the best trial's when there was a search, else the curve's."""
    if found is None:
        return choice.max_lr, choice.min_lr
    return found.max_lr, found.min_lr
