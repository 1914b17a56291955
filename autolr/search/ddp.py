"""Data-parallel trials: the trial's Tune process drives a Ray Train TorchTrainer.

Ray 2.60 (Train v2) tunes over distributed training this way: the Tune function
builds and fits a TorchTrainer, whose workers train under torch.distributed
(gloo on CPU, NCCL on GPU) and report every epoch with ``ray.train.report``;
Ray's TuneReportCallback passes rank 0's report on to Tune, so ASHA, the
progress log and the search's summary read it as a 1-worker trial's. Rank 0
alone logs to MLflow and saves the checkpoint, so a trial keeps one run with
one value per epoch. The Train run lives under the Tune experiment's folder,
named after the trial: a retried trial's TorchTrainer resumes from its last
checkpoint (Train restores a run of the same name and storage by itself).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
from ray import tune
from ray.train.torch import TorchTrainer, get_device
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from autolr.errors import TrainingDivergedError
from autolr.search.outcome import _checkpoint_uri
from autolr.search.trial import (
    _diverged_marker,
    _epoch_callback,
    _load_checkpoint,
    _train_kwargs,
    _trial_lrs,
    _TrialRun,
    _TrialSetup,
)
from autolr.tasks.base import Task
from autolr.tracking import fail_fast_http
from autolr.training import train

# What the trial's own Tune process asks for. It computes nothing (it waits in fit()),
# so it takes no CPU from the workers; Tune refuses an empty request, and memory is
# the one other resource every Ray node has: 512 MiB, as that process held 447-463
# MiB (RSS, torch and the tiny test task loaded) with ray 2.60 here.
DRIVER_RESOURCES = {"cpu": 0, "memory": 512 * 2**20}


@dataclass(frozen=True)
class _Workers:
    """How a data-parallel trial runs: its workers, each one's resources, where Train writes."""

    count: int
    resources: dict[str, float]  # per worker, from trial_resources: {"cpu": .., "gpu": ..}
    storage_path: str  # the Tune experiment's folder or URI


def _run_ddp_trial(
    config: dict[str, Any], task: Task, setup: _TrialSetup, workers: _Workers
) -> None:
    """Tune's trainable with ``workers_per_trial`` > 1: fit a TorchTrainer of the workers."""
    diverged = _diverged_marker()
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        functools.partial(_worker, task=task, setup=setup),
        train_loop_config={"config": config, "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers.count,
            use_gpu="gpu" in workers.resources,
            resources_per_worker={k.upper(): v for k, v in workers.resources.items()},
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=workers.storage_path,
            # No retries inside Train: a crash fails the trial, which Tune retries
            # (search.max_failures), and the new TorchTrainer resumes the run.
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),  # as Tune's trials
            callbacks=[_TuneReport()],
        ),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as exc:
        causes = [getattr(e, "cause", e) for e in exc.worker_failures.values()]
        reason = next((c for c in causes if isinstance(c, TrainingDivergedError)), None)
        if reason is None:
            raise
        diverged.write_text(str(reason))
        raise TrainingDivergedError(str(reason)) from None


class _TuneReport(TuneReportCallback):
    """Ray's TuneReportCallback, the checkpoint named by a URI (``s3://...``) where not local.

    Tune gets no checkpoint of a Train run, only this metric, which the search's
    summary takes as the trial's checkpoint (`TrialSummary.checkpoint`); Ray's
    own gives the path within the storage, without its scheme.
    """

    def after_report(self, run_context, metrics, checkpoint) -> None:
        report = {**metrics[0]}  # rank 0's
        if checkpoint is not None:
            report[CHECKPOINT_PATH_KEY] = _checkpoint_uri(checkpoint)
        self._training_actor_item_queue.put(report)  # what Ray's after_report does


def _worker(loop: dict[str, Any], *, task: Task, setup: _TrialSetup) -> None:
    """One rank of a data-parallel trial: `train` under DDP, rank 0 logging and checkpointing."""
    torch.set_num_threads(setup.threads)
    with fail_fast_http():
        _train_rank(loop["config"], loop["trial_id"], task, setup)


def _train_rank(config: dict[str, Any], trial_id: str, task: Task, setup: _TrialSetup) -> None:
    saved = _load_checkpoint(ray.train.get_checkpoint())
    # Rank 0 alone logs and checkpoints; every rank reports (Train gathers one report
    # per rank per epoch) and rank 0's goes on to Tune, with the checkpoint.
    lead = ray.train.get_context().get_world_rank() == 0
    run = _TrialRun.open(setup, trial_id) if lead else None
    # Every rank: a wd-aware range test is collective (its loss is averaged over the ranks).
    lrs = _trial_lrs(config, task, setup, saved)
    if run is not None:
        run.log_params(config, lrs, setup.plan.epochs)
    on_epoch = _epoch_callback(setup, lrs, run, ray.train.report, ray.train.Checkpoint)
    train(task, on_epoch=on_epoch, device=get_device(), **_train_kwargs(config, setup, lrs, saved))
    if run is not None:
        run.finish()
