"""After the search: each trial's summary, its MLflow run's final status, the best trial."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from autolr.errors import AutoLRError
from autolr.results import TrialSummary
from autolr.search.plan import SearchSite
from autolr.search.trial import CHECKPOINT_FILE, _TrialSetup
from autolr.tracking import Tracker, close_trial_runs

if TYPE_CHECKING:
    from ray import tune

log = logging.getLogger(__name__)


def _summaries(grid: tune.ResultGrid, setup: _TrialSetup) -> list[TrialSummary]:
    trials = []
    for result in grid:
        metrics, config = result.metrics or {}, result.config or {}
        epochs_run = int(metrics.get("epoch", 0))
        lr_scale = float(config.get("lr_scale", 1.0))
        if result.error is not None:
            status = "ERROR"
        elif epochs_run >= setup.plan.epochs:
            status = "TERMINATED"
        else:
            status = "STOPPED"
        trials.append(
            TrialSummary(
                trial_id=metrics["trial_id"],
                weight_decay=float(config["weight_decay"]),
                bn_momentum=config.get("bn_momentum"),
                max_lr=float(metrics.get("max_lr", setup.max_lr * lr_scale)),
                min_lr=float(metrics.get("min_lr", setup.min_lr * lr_scale)),
                val_metric=float(metrics.get(setup.metric_key, math.nan)),
                epochs_run=epochs_run,
                status=status,
                run_id=None,
                error=_last_line(result.error) if result.error is not None else None,
                seconds=float(metrics.get("time_total_s", math.nan)),
                lr_scale=lr_scale,
                # A DDP trial's checkpoint is its Train run's, named in its metrics.
                checkpoint=_checkpoint_uri(result.checkpoint) or metrics.get("checkpoint_path"),
            )
        )
    return sorted(trials, key=lambda t: t.trial_id)


def _checkpoint_uri(checkpoint: tune.Checkpoint | None) -> str | None:
    """Where a checkpoint is: a local folder, or a URI that `trial_state` reads."""
    if checkpoint is None:
        return None
    scheme = checkpoint.filesystem.type_name  # pyarrow's: "local", "s3", "gcs", ...
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def trial_state(checkpoint: str) -> dict:
    """The training state (`autolr.training.train`'s ``state()``) a trial saved at ``checkpoint``.

    ``checkpoint`` is a `TrialSummary.checkpoint`; Tune's Checkpoint fetches one
    in object storage through pyarrow, with the endpoint and credentials of this
    process's environment.
    """
    import torch
    from ray import tune

    with tune.Checkpoint(checkpoint).as_directory() as folder:
        # on the CPU: a trial's GPU need not be the driver's; weights_only as in the trial
        saved = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return saved["train"]


def _last_line(error: BaseException) -> str:
    """The line of a (Ray-wrapped) error that says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _close_trial_runs(
    trials: list[TrialSummary], site: SearchSite
) -> tuple[list[TrialSummary], list[str]]:
    """The trials with their MLflow run ids, once every run has its final status
    (`autolr.tracking.close_trial_runs`); and what could not be written."""
    tracker = Tracker.attach(site.tracking_uri, site.experiment_id)
    run_ids = close_trial_runs(tracker, site.name, site.parent_run_id, trials)
    errors = [f"could not record the trials' final status in MLflow: {e}" for e in tracker.errors]
    for error in errors:
        log.warning("%s", error)
    return [replace(t, run_id=run_ids.get(t.trial_id)) for t in trials], errors


def _outcome_notes(trials: list[TrialSummary]) -> list[str]:
    notes = [f"trial {t.trial_id} failed: {t.error}" for t in trials if t.status == "ERROR"]
    for note in notes:
        log.warning("%s", note)
    stopped = sum(t.status == "STOPPED" for t in trials)
    if stopped:
        notes.append(f"ASHA stopped {stopped} of {len(trials)} trials early")
    return notes


def _best(trials: list[TrialSummary], higher_is_better: bool) -> TrialSummary:
    """The best trial that ran the full budget; else the best that reported at all."""
    scored = [t for t in trials if math.isfinite(t.val_metric)]
    if not scored:
        first = next((t.error for t in trials if t.error), "no trial reported a metric")
        raise AutoLRError(
            f"the search needs at least one trial with a finite validation metric, but all "
            f"{len(trials)} failed or reported none; first error: {first}"
        )
    full = [t for t in scored if t.status == "TERMINATED"] or scored
    sign = 1.0 if higher_is_better else -1.0
    return max(full, key=lambda t: sign * t.val_metric)
