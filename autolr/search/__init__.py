"""Ray Tune search of weight decay, BN momentum and the LR under 1cycle; the only ray importer.

Every trial trains the task with 1cycle over the picked LR range times its own
LR scale (one of ``lr_scales``: the curve's max LR is validated by training),
at its own weight decay and BatchNorm momentum, and reports each epoch to Tune
with a checkpoint. Every trial trains the full budget (``scheduler="fifo"``, the
default), or ASHA stops the weak ones early (``"asha"``); a crashed trial is retried from its last
checkpoint (a diverged one is not retrained: it would diverge again); an
interrupted search resumes with ``resume=True``.

Each trial is an MLflow child run of the pipeline's run, found again by its
``autolr.trial_id`` tag when the trial is retried or resumed, so a trial has
exactly one run. After the search the driver sets every run's final status
(`autolr.tracking.close_trial_runs`): FINISHED (those ASHA stopped tagged
``autolr.stopped_by=asha``), FAILED, or KILLED for a run whose trial Tune no longer knows.

Example:
    >>> from autolr.config import SearchConfig
    >>> site = SearchSite(tracker.tracking_uri, tracker.experiment_id, parent_run_id=run_id,
    ...                   storage_path="/abs/ray_results", name="search")  # doctest: +SKIP
    >>> result = search(task, choice, SearchConfig(num_samples=8), site,
    ...                 TrialPlan(epochs=10))  # doctest: +SKIP
    >>> result.weight_decay, result.bn_momentum, result.max_lr  # doctest: +SKIP

Layout, in the order a search runs: `plan` (where a search writes and how its
trials train), `space` (the param space and each trial's resources), `storage`
(where Tune writes), `cluster` (Ray start and stop), `edge` (the trial past an
edge LR scale), `tuner` (the Tuner, built or restored), `trial` (the trainable),
`ddp` (the trainable of ``workers_per_trial`` > 1: Ray Train's DDP workers),
`outcome` (summaries, the runs' final status, the best trial), `driver`
(`search`).
Ray is imported in this package only.
"""

from __future__ import annotations

try:
    import ray  # noqa: F401  (every module here needs it)
    from ray import tune  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError('autolr\'s search needs Ray Tune: pip install "autolr[pipeline]"') from exc

from autolr.search.driver import search
from autolr.search.plan import SearchSite, TrialPlan
from autolr.search.space import (
    bn_momentum_floor,
    num_trials,
    param_space,
    scale_points,
    trial_resources,
    trial_threads,
)
from autolr.search.storage import check_storage

# Two private names stay importable from here, as from the single-file module: the
# tests load checkpoints with _load_checkpoint, and a Tune experiment saved before
# the split pickled its callback as autolr.search._ProgressLog, which
# Tuner.restore unpickles.
from autolr.search.trial import CHECKPOINT_FILE, _load_checkpoint  # noqa: F401
from autolr.search.tuner import _ProgressLog  # noqa: F401
from autolr.tracking import SEARCH_TAG, TRIAL_TAG

__all__ = [
    "CHECKPOINT_FILE",
    "SEARCH_TAG",
    "TRIAL_TAG",
    "SearchSite",
    "TrialPlan",
    "bn_momentum_floor",
    "check_storage",
    "num_trials",
    "param_space",
    "scale_points",
    "search",
    "trial_resources",
    "trial_threads",
]
