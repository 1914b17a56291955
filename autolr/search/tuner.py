"""The Tuner: built new or restored, with its scheduler and a one-line-per-trial log."""

from __future__ import annotations

import logging
import math

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from autolr.config import SearchConfig
from autolr.errors import ArgumentError
from autolr.search.ddp import DRIVER_RESOURCES, _run_ddp_trial, _Workers
from autolr.search.edge import ExtendAtEdge
from autolr.search.space import (
    _dimension,
    concurrent_trials,
    extends_at_edge,
    num_trials,
    param_space,
    scale_points,
)
from autolr.search.trial import _run_trial, _TrialSetup
from autolr.tasks.base import Task

log = logging.getLogger(__name__)


def _tuner(
    task: Task,
    setup: _TrialSetup,
    cfg: SearchConfig,
    resources: dict[str, float],
    *,
    resume: bool,
    bn_searched: bool,
    progress: bool,
) -> tuple[tune.Tuner, bool]:
    """A new Tuner, or the interrupted one restored, and whether it was restored.

    ``resources`` are a trial's, or each worker's with ``cfg.workers_per_trial`` > 1.
    """
    trainable = _trainable(task, setup, cfg, resources)
    experiment_path = setup.site.experiment_path
    if resume and tune.Tuner.can_restore(experiment_path):
        log.info("resuming the search in %s", experiment_path)
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True), True
    if resume:
        log.info("no search to resume in %s; starting one", experiment_path)
    total = num_trials(cfg, bn_searched)
    _log_plan(cfg, setup, resources, bn_searched, total)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg, bn_searched),
        tune_config=tune.TuneConfig(
            metric=setup.metric_key,
            mode="max" if task.higher_is_better else "min",
            num_samples=cfg.num_samples,
            search_alg=_search_alg(cfg, setup, task.higher_is_better, resources),
            scheduler=_scheduler(cfg, setup.plan.epochs),
            # A fresh trial process costs ~5 s to start. Not with DDP: Tune cannot reset
            # one that drove a TorchTrainer; it logged "Could not re-use actor" (ERROR)
            # for each trial and started a fresh one anyway.
            reuse_actors=cfg.workers_per_trial == 1,
        ),
        run_config=tune.RunConfig(
            name=setup.site.name,
            storage_path=setup.site.storage_path,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            # Keeping 2 lets Tune's experiment snapshot (taken every 2nd checkpoint)
            # always point at a checkpoint that still exists.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[_ProgressLog(setup.metric_key, setup.plan.epochs, total)]
            if progress
            else None,
            verbose=0,
        ),
    )
    return tuner, False


def _search_alg(
    cfg: SearchConfig, setup: _TrialSetup, higher_is_better: bool, resources: dict[str, float]
) -> BasicVariantGenerator:
    """Tune's generator of the trials' points, extending past an edge LR scale if asked."""
    options = {
        "points_to_evaluate": scale_points(cfg),
        "random_state": cfg.seed,
        # The limit goes here: Tune ignores max_concurrent_trials with a generator.
        "max_concurrent": concurrent_trials(ray.cluster_resources(), resources, cfg),
    }
    if not extends_at_edge(cfg):
        return BasicVariantGenerator(**options)
    return ExtendAtEdge(
        scales=list(cfg.lr_scales),
        metric=setup.metric_key,
        higher_is_better=higher_is_better,
        max_t=setup.plan.epochs,
        **options,
    )


def _trainable(
    task: Task, setup: _TrialSetup, cfg: SearchConfig, resources: dict[str, float]
) -> type[tune.Trainable]:
    """The trial function with its resources: one process, or a driver of DDP workers."""
    # with_parameters puts the task (and its data) in the object store once.
    if cfg.workers_per_trial == 1:
        return tune.with_resources(
            tune.with_parameters(_run_trial, task=task, setup=setup), resources
        )
    if task.batch_size < cfg.workers_per_trial:  # a worker would get an empty batch
        raise ArgumentError(
            f"search.workers_per_trial={cfg.workers_per_trial} splits each batch over the "
            f"workers, but the task's batch_size={task.batch_size} is smaller; expected "
            "at least one example per worker."
        )
    workers = _Workers(cfg.workers_per_trial, resources, storage_path=setup.site.experiment_path)
    return tune.with_resources(
        tune.with_parameters(_run_ddp_trial, task=task, setup=setup, workers=workers),
        DRIVER_RESOURCES,
    )


def _log_plan(
    cfg: SearchConfig,
    setup: _TrialSetup,
    resources: dict[str, float],
    bn_searched: bool,
    total: int,
) -> None:
    dimensions = [_dimension("weight_decay", cfg.weight_decay_values, cfg.grid)]
    if bn_searched:
        dimensions.append(_dimension("bn_momentum", cfg.bn_momentum_values, cfg.grid))
    if len(cfg.lr_scales or ()) > 1:
        dimensions.append(_dimension("lr_scale", cfg.lr_scales, cfg.grid))
    log.info(
        "searching %s over %d trials of %d epochs (%s), %s",
        ", ".join(dimensions),
        total,
        setup.plan.epochs,
        "ASHA: weak trials stop early"
        if cfg.scheduler == "asha"
        else "FIFO: every trial trains the full budget",
        f"{resources} per trial"
        if cfg.workers_per_trial == 1
        else f"{cfg.workers_per_trial} DDP workers of {resources} per trial",
    )


def _scheduler(cfg: SearchConfig, epochs: int) -> ASHAScheduler | FIFOScheduler:
    """ASHA stops weak trials at its rungs; FIFO runs every trial to the end."""
    if cfg.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",  # our own count, which survives retries from checkpoints
        max_t=epochs,
        grace_period=min(cfg.grace_period, epochs),
        reduction_factor=cfg.reduction_factor,
    )


class _ProgressLog(tune.Callback):
    """One log line per finished, stopped or retried trial, instead of Tune's tables."""

    def __init__(self, metric_key: str, epochs: int, total: int) -> None:
        # total: every trial the search runs (a grid's size x num_samples), not num_samples.
        self.metric_key, self.epochs, self.total = metric_key, epochs, total
        self.finished = 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        result, config = trial.last_result, trial.config
        epoch = int(result.get("epoch", 0))
        how = "done" if epoch >= self.epochs else f"stopped by ASHA after epoch {epoch}"
        bn = config.get("bn_momentum")
        log.info(
            "trial %s %s (%d/%d): weight_decay=%.3g%s max_lr=%.3g %s=%.4f",
            trial.trial_id,
            how,
            self.finished,
            self.total,
            config["weight_decay"],
            "" if bn is None else f" bn_momentum={bn:.3g}",
            result.get("max_lr", math.nan),
            self.metric_key,
            result.get(self.metric_key, math.nan),
        )

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        log.info("trial %s crashed; retrying it from its last checkpoint", trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        log.warning(
            "trial %s failed (%d/%d); see the search summary",
            trial.trial_id,
            self.finished,
            self.total,
        )
