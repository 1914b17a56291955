"""The public `search`: start Ray, run the Tuner, and turn its trials into a SearchResult."""

from __future__ import annotations

import logging
import re
import time

import ray
from ray import tune

from autolr.config import RangeTestConfig, SearchConfig
from autolr.errors import ArgumentError
from autolr.results import LRChoice, SearchResult
from autolr.search.cluster import _environ, _signal_handlers_kept, _start_ray
from autolr.search.outcome import _best, _close_trial_runs, _outcome_notes, _summaries
from autolr.search.space import trial_resources, trial_threads
from autolr.search.storage import check_storage
from autolr.search.trial import _TrialSetup
from autolr.search.tuner import _tuner
from autolr.tasks.base import Task
from autolr.tracking import fail_fast_http
from autolr.training import batchnorm_layers

log = logging.getLogger(__name__)


def search(
    task: Task,
    choice: LRChoice,
    cfg: SearchConfig,
    *,
    epochs: int,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str | None,
    storage_path: str,
    name: str,
    resume: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
    range_test: RangeTestConfig | None = None,
    selection_method: str = "changepoint",
    train_seed: int | None = None,
) -> SearchResult:
    """Search weight decay, BatchNorm momentum and the LR scale with Ray Tune under 1cycle.

    Weight decay is log-uniform in ``[cfg.weight_decay_min, cfg.weight_decay_max]``,
    or exactly 0 with probability ``cfg.zero_wd_prob``. BatchNorm momentum is
    log-uniform in ``[cfg.bn_momentum_min, cfg.bn_momentum_max]`` and set on every
    BatchNorm layer; it is PyTorch's momentum, the weight of the NEW batch
    statistic (``running = (1 - m) * running + m * batch``). A model without
    BatchNorm drops that dimension (``bn_searched=False``). Sampling is seeded
    with ``cfg.seed``, which also seeds every trial's training unless
    ``train_seed`` is given. A trial trains with ``choice``'s range times its
    ``lr_scale``, one of ``cfg.lr_scales`` taken in turn (see `scale_points`;
    no LR dimension when that is None or one value).

    ``cfg.weight_decay_values`` / ``cfg.bn_momentum_values`` replace a range by a
    list drawn from uniformly; with ``cfg.grid`` every listed value (every
    combination of the lists, ``lr_scales`` included) is tried instead,
    ``cfg.num_samples`` times over (see `num_trials`). ``cfg.scheduler`` is
    ``"asha"`` (ASHA stops weak trials early, after ``cfg.grace_period`` epochs)
    or ``"fifo"`` (every trial trains the full budget, as a plain grid search does).

    Args:
        task: what to train; sent to the trials once, through Ray's object store.
        choice: the curve's 1cycle range (``max_lr``, ``min_lr``); each trial trains
            with it times its ``lr_scale``.
        cfg: the search's settings.
        epochs: the 1cycle budget of a trial (ASHA's ``max_t``).
        tracking_uri: an absolute MLflow URI: trials run in other working directories.
        experiment_id, parent_run_id: where the trials' child runs go; the
            driver must have created both (a fresh sqlite store races otherwise).
        storage_path: where Tune keeps trial checkpoints and the experiment
            state, a local folder (made absolute) or a URI such as
            ``s3://bucket/prefix`` (see `check_storage`); a multi-node cluster
            needs one that every node reaches (NFS, object storage).
        name: the experiment's folder under ``storage_path``; also tagged on runs.
        resume: continue the experiment in ``storage_path/name`` if there is one.
            Its trials keep their MLflow runs, moved under ``parent_run_id``.
        ray_address: a Ray cluster to attach to (default: ``$RAY_ADDRESS``, else a
            private local Ray on all CPUs). A Ray that is already initialised is used.
        progress: log one line per finished trial.
        range_test, selection_method: in wd-aware mode (``cfg.wd_aware``) each
            trial re-runs this range test at its weight decay and BN momentum
            and trains with its own pick (times its ``lr_scale``). Every trial
            steps its optimizer once per ``range_test.accumulation_steps``
            batches, the effective batch the LR was picked for.
        train_seed: the seed of every trial's training (None: ``cfg.seed``). A
            final run with this seed, `trial_threads` threads and the best
            trial's settings and budget reproduces that trial.

    Returns:
        The best trial's hyperparameters among those that ran the full budget
        (its LR range included), and a summary of every trial.

    Raises:
        ValueError: an argument is out of range.
        ConfigError: the Ray cluster at ``ray_address`` does not answer, or
            ``storage_path`` is a URI that cannot be written.
        AutoLRError: no trial reported a finite validation metric (all failed).
    """
    _check_args(epochs, name)
    storage_path = check_storage(storage_path)
    experiment_path = f"{storage_path.rstrip('/')}/{name}"
    started = time.perf_counter()
    metric_key = f"val_{task.metric_name}"

    notes: list[str] = []
    bn_searched = bool(batchnorm_layers(task.model_fn()))
    if not bn_searched:
        notes.append(f"{task.name} has no BatchNorm layer, so bn_momentum was not searched")
        log.info("%s", notes[-1])

    with _signal_handlers_kept():
        owns_ray = _start_ray(ray_address)
    try:
        resources = trial_resources(ray.cluster_resources(), cfg)
        setup = _TrialSetup(
            max_lr=choice.max_lr,
            min_lr=choice.min_lr,
            epochs=epochs,
            seed=cfg.seed if train_seed is None else train_seed,
            metric_key=metric_key,
            tracking_uri=tracking_uri,
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            name=name,
            threads=trial_threads(resources),
            wd_aware=cfg.wd_aware,
            range_test=range_test or RangeTestConfig(),
            selection_method=selection_method,
        )
        tuner, resumed = _tuner(
            task,
            setup,
            cfg,
            resources,
            storage_path=storage_path,
            experiment_path=experiment_path,
            resume=resume,
            bn_searched=bn_searched,
            higher_is_better=task.higher_is_better,
            progress=progress,
        )
        if resumed:
            notes.append(f"resumed the search in {experiment_path}")
        grid = _fit(tuner)
    finally:
        if owns_ray:
            ray.shutdown()

    trials = _summaries(grid, setup)
    with fail_fast_http():  # the store may have gone away while the trials ran
        trials, tracking_errors = _close_trial_runs(
            trials, tracking_uri, experiment_id, parent_run_id, name
        )
    notes += tracking_errors + _outcome_notes(trials)
    best = _best(trials, task.higher_is_better)
    if best.status != "TERMINATED":
        notes.append(f"no trial ran the full budget; the best ran {best.epochs_run} epochs")
    result = SearchResult(
        weight_decay=best.weight_decay,
        bn_momentum=best.bn_momentum,
        val_metric=best.val_metric,
        metric=task.metric_name,
        higher_is_better=task.higher_is_better,
        max_lr=best.max_lr,
        min_lr=best.min_lr,
        best_trial_id=best.trial_id,
        trials=tuple(trials),
        bn_searched=bn_searched,
        lr_scale=best.lr_scale,
        notes=tuple(notes),
        resources=resources,
        experiment_path=experiment_path,
        seconds=time.perf_counter() - started,
    )
    _log_done(result, metric_key)
    return result


def _check_args(epochs: int, name: str) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ArgumentError(f"epochs must be an int >= 1, but got {epochs=}.")
    if not re.fullmatch(r"[\w.-]+", name):
        raise ArgumentError(
            f"name must be a folder name of letters, digits, _ . -, but got {name=}."
        )


def _fit(tuner: tune.Tuner) -> tune.ResultGrid:
    with _environ(
        # Ctrl-C must stop the pipeline, not make fit() return a partial search.
        TUNE_DISABLE_SIGINT_HANDLER="1",
        RAY_AIR_NEW_OUTPUT="0",  # the old reporter is silent at verbose=0
        # A snapshot every 2nd checkpoint is what num_to_keep=2 asks for, also with
        # epochs of a few seconds; Tune warns about it each time.
        TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S="0",
    ):
        return tuner.fit()


def _log_done(result: SearchResult, metric_key: str) -> None:
    log.info(
        "search done in %.0f s: weight_decay=%.3g%s max_lr=%.3g (x%.3g) %s=%.4f (trial %s)",
        result.seconds,
        result.weight_decay,
        f" bn_momentum={result.bn_momentum:.3g}" if result.bn_searched else "",
        result.max_lr,
        result.lr_scale,
        metric_key,
        result.val_metric,
        result.best_trial_id,
    )
