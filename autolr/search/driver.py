"""The public `search`: start Ray, run the Tuner, and turn its trials into a SearchResult."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import ray
from ray import tune

from autolr._checks import environ
from autolr.config import SearchConfig
from autolr.results import LRChoice, SearchResult
from autolr.search.cluster import _signal_handlers_kept, _start_ray
from autolr.search.outcome import _best, _close_trial_runs, _outcome_notes, _summaries
from autolr.search.plan import SearchSite, TrialPlan
from autolr.search.space import (
    BN_AVERAGE_SHARE,
    bn_momentum_floor,
    extends_at_edge,
    trial_resources,
    trial_threads,
)
from autolr.search.storage import check_storage
from autolr.search.trial import _TrialSetup
from autolr.search.tuner import _tuner
from autolr.tasks.base import Task
from autolr.tracking import fail_fast_http
from autolr.training import batchnorm_layers, make_loaders, steps_per_epoch

log = logging.getLogger(__name__)


def search(
    task: Task,
    choice: LRChoice,
    cfg: SearchConfig,
    site: SearchSite,
    plan: TrialPlan,
    *,
    resume: bool = False,
    progress: bool = True,
) -> SearchResult:
    """Search weight decay, BatchNorm momentum and the LR scale with Ray Tune under 1cycle.

    Weight decay is log-uniform in ``[cfg.weight_decay_min, cfg.weight_decay_max]``,
    or exactly 0 with probability ``cfg.zero_wd_prob``. BatchNorm momentum is
    log-uniform in ``[cfg.bn_momentum_min, cfg.bn_momentum_max]``, the lower end
    raised for short trials (`bn_momentum_floor`), and set on every BatchNorm
    layer; it is PyTorch's momentum, the weight of the NEW batch statistic
    (``running = (1 - m) * running + m * batch``). A model without
    BatchNorm drops that dimension (``bn_searched=False``). Sampling is seeded
    with ``cfg.seed``, which also seeds every trial's training unless
    ``plan.seed`` is given. A trial trains with ``choice``'s range times its
    ``lr_scale``, one of ``cfg.lr_scales`` taken in turn (see `scale_points`;
    no LR dimension when that is None or one value), or, for the trial after one
    of each, a step past an edge scale (`autolr.search.edge`).

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
        site: where the trials' MLflow runs and Tune's experiment go, and the Ray
            cluster (`SearchSite`).
        plan: how every trial trains: its budget, seed and effective batch (`TrialPlan`).
        resume: continue the experiment in ``site.experiment_path`` if there is one.
            Its trials keep their MLflow runs, moved under ``site.parent_run_id``.
        progress: log one line per finished trial.

    Returns:
        The best trial's hyperparameters among those that ran the full budget
        (its LR range included), and a summary of every trial.

    Raises:
        ArgumentError: an argument is out of range.
        ConfigError: the Ray cluster at ``site.ray_address`` does not answer, or
            ``site.storage_path`` is a URI that cannot be written.
        AutoLRError: no trial reported a finite validation metric (all failed).
    """
    site = replace(site, storage_path=check_storage(site.storage_path))
    started = time.perf_counter()
    notes: list[str] = []
    bn_searched = bool(batchnorm_layers(task.model_fn()))
    if not bn_searched:
        notes.append(f"{task.name} has no BatchNorm layer, so bn_momentum was not searched")
        log.info("%s", notes[-1])
    elif cfg.bn_momentum_values is None:
        cfg = _with_bn_floor(cfg, task, plan, notes)

    with _signal_handlers_kept():
        owns_ray = _start_ray(site.ray_address)
    try:
        resources = trial_resources(ray.cluster_resources(), cfg)
        setup = _TrialSetup(
            max_lr=choice.max_lr,
            min_lr=choice.min_lr,
            metric_key=f"val_{task.metric_name}",
            threads=trial_threads(resources),
            wd_aware=cfg.wd_aware,
            plan=plan if plan.seed is not None else replace(plan, seed=cfg.seed),
            site=site,
        )
        tuner, resumed = _tuner(
            task, setup, cfg, resources, resume=resume, bn_searched=bn_searched, progress=progress
        )
        if resumed:
            notes.append(f"resumed the search in {site.experiment_path}")
        grid = _fit(tuner)
    finally:
        if owns_ray:
            ray.shutdown()
    notes += _past_edge(grid, cfg)
    result = _result(task, grid, setup, bn_searched, notes, resources, started)
    _log_done(result, setup.metric_key)
    return result


def _past_edge(grid: tune.ResultGrid, cfg: SearchConfig) -> list[str]:
    """A note for each trial whose LR scale went past the edge (`autolr.search.edge`)."""
    if not extends_at_edge(cfg):
        return []
    scales = [(r.config or {}).get("lr_scale") for r in grid]
    return [
        f"the best of the first {len(cfg.lr_scales)} trials trained at an edge LR scale, so "
        f"one trial tried lr_scale={scale:g}, past it"
        for scale in sorted({s for s in scales if s is not None and s not in cfg.lr_scales})
    ]


def _with_bn_floor(
    cfg: SearchConfig, task: Task, plan: TrialPlan, notes: list[str]
) -> SearchConfig:
    """``cfg`` with the BatchNorm momentum range raised to `bn_momentum_floor` for the
    trials' length (a list of values is the user's and is kept)."""
    batches = len(make_loaders(task, seed=0)[0])
    steps = plan.epochs * steps_per_epoch(batches, plan.range_test.accumulation_steps)
    floor = bn_momentum_floor(cfg, steps)
    if floor > cfg.bn_momentum_min:
        notes.append(
            f"bn_momentum drawn from {floor:.3g} (not {cfg.bn_momentum_min:g}): below it the "
            f"running statistics would average over more than {BN_AVERAGE_SHARE:.0%} of a "
            f"trial's {steps} steps"
        )
        log.info("%s", notes[-1])
    return replace(cfg, bn_momentum_min=floor)


def _result(
    task: Task,
    grid: tune.ResultGrid,
    setup: _TrialSetup,
    bn_searched: bool,
    notes: list[str],
    resources: dict[str, float],
    started: float,
) -> SearchResult:
    """The search's result from Tune's, once every trial's MLflow run is closed."""
    trials = _summaries(grid, setup)
    with fail_fast_http():  # the store may have gone away while the trials ran
        trials, tracking_errors = _close_trial_runs(trials, setup.site)
    notes = notes + tracking_errors + _outcome_notes(trials)
    best = _best(trials, task.higher_is_better)
    if best.status != "TERMINATED":
        notes.append(f"no trial ran the full budget; the best ran {best.epochs_run} epochs")
    return SearchResult(
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
        experiment_path=setup.site.experiment_path,
        seconds=time.perf_counter() - started,
    )


def _fit(tuner: tune.Tuner) -> tune.ResultGrid:
    with environ(
        dict(
            # Ctrl-C must stop the pipeline, not make fit() return a partial search.
            TUNE_DISABLE_SIGINT_HANDLER="1",
            RAY_AIR_NEW_OUTPUT="0",  # the old reporter is silent at verbose=0
            # A snapshot every 2nd checkpoint is what num_to_keep=2 asks for, also with
            # epochs of a few seconds; Tune warns about it each time.
            TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S="0",
        )
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
