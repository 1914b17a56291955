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
exactly one run. After the search the driver sets every run's final status:
FINISHED, KILLED (stopped by ASHA, tagged ``autolr.stopped_by=asha``) or FAILED.

Example:
    >>> from autolr.config import SearchConfig
    >>> result = search(task, choice, SearchConfig(num_samples=8), epochs=10,
    ...                 tracking_uri=tracker.tracking_uri, experiment_id=tracker.experiment_id,
    ...                 parent_run_id=run_id, storage_path="/abs/ray_results",
    ...                 name="search")  # doctest: +SKIP
    >>> result.weight_decay, result.bn_momentum, result.max_lr  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from autolr.config import RangeTestConfig, SearchConfig
from autolr.errors import AutoLRError, ConfigError, CurveError, TrainingDivergedError
from autolr.results import EpochMetrics, LRChoice, SearchResult, TrialSummary
from autolr.tasks.base import Task
from autolr.tracking import PARENT_TAG, Tracker, epoch_metrics, fail_fast_http
from autolr.training import batchnorm_layers, train

try:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError('autolr\'s search needs Ray Tune: pip install "autolr[pipeline]"') from exc

log = logging.getLogger(__name__)

TRIAL_TAG = "autolr.trial_id"  # finds a trial's run again after a retry or a resume
SEARCH_TAG = "autolr.search"  # the search's name, shared by its trial runs
STOPPED_TAG = "autolr.stopped_by"
CHECKPOINT_FILE = "trial.pt"
# A trial ASHA stopped early ran as planned, so its run is FINISHED (as Ray's own
# MLflowLoggerCallback ends it), with STOPPED_TAG saying who stopped it; KILLED showed
# a red cross in the MLflow UI on most trials of every ASHA search.
RUN_STATUS = {"TERMINATED": "FINISHED", "STOPPED": "FINISHED", "ERROR": "FAILED"}
LOOPBACK = "127.0.0.1"  # where a private Ray listens
# ray.init retries an address that does not answer for minutes, silently; a cluster
# that runs answers a TCP connect in milliseconds, a remote one well within seconds.
CONNECT_TIMEOUT_S = 5.0


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
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, but got {epochs=}.")
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"name must be a folder name of letters, digits, _ . -, but got {name=}.")
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
        with _environ(
            # Ctrl-C must stop the pipeline, not make fit() return a partial search.
            TUNE_DISABLE_SIGINT_HANDLER="1",
            RAY_AIR_NEW_OUTPUT="0",  # the old reporter is silent at verbose=0
            # A snapshot every 2nd checkpoint is what num_to_keep=2 asks for, also with
            # epochs of a few seconds; Tune warns about it each time.
            TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S="0",
        ):
            grid = tuner.fit()
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
    log.info(
        "search done in %.0f s: weight_decay=%.3g%s max_lr=%.3g (x%.3g) %s=%.4f (trial %s)",
        result.seconds,
        result.weight_decay,
        f" bn_momentum={result.bn_momentum:.3g}" if bn_searched else "",
        result.max_lr,
        result.lr_scale,
        metric_key,
        result.val_metric,
        result.best_trial_id,
    )
    return result


def param_space(cfg: SearchConfig, bn_searched: bool = True) -> dict[str, Any]:
    """Tune's search space: each dimension from its ``*_values`` list, else from its range.

    A list is drawn from uniformly (``tune.choice``), or with ``cfg.grid`` tried
    value by value (``tune.grid_search``; several lists give every combination).
    ``lr_scale`` exists only with 2+ ``cfg.lr_scales`` (one factor other than 1
    is a constant).
    Without a list, ``weight_decay`` is 0 or log-uniform: ``tune.sample_from``
    gets no random state, so the mixture is built from two ordinary (seeded)
    draws, a uniform one that decides "zero" and a log-uniform candidate.
    """
    space: dict[str, Any] = {}
    if cfg.weight_decay_values is not None:
        space["weight_decay"] = _from_values(cfg.weight_decay_values, cfg.grid)
    else:
        zero_wd_prob = cfg.zero_wd_prob
        space["zero_wd_draw"] = tune.uniform(0.0, 1.0)
        space["weight_decay_if_nonzero"] = tune.loguniform(
            cfg.weight_decay_min, cfg.weight_decay_max
        )
        space["weight_decay"] = tune.sample_from(
            lambda config: (
                0.0 if config["zero_wd_draw"] < zero_wd_prob else config["weight_decay_if_nonzero"]
            )
        )
    if bn_searched:
        space["bn_momentum"] = (
            _from_values(cfg.bn_momentum_values, cfg.grid)
            if cfg.bn_momentum_values is not None
            else tune.loguniform(cfg.bn_momentum_min, cfg.bn_momentum_max)
        )
    scales = cfg.lr_scales or (1.0,)
    if len(scales) > 1:
        space["lr_scale"] = _from_values(scales, cfg.grid)
    elif scales != (1.0,):
        space["lr_scale"] = scales[0]
    return space


def scale_points(cfg: SearchConfig) -> list[dict[str, float]]:
    """The trials' LR scales when they are drawn: every scale in turn, the pick first.

    Tune's ``points_to_evaluate`` fixes ``lr_scale`` and samples the rest, so the
    ``num_samples`` trials spread evenly over the scales instead of drawing them:
    8 draws from 3 scales miss one in 11% of searches (3 x (2/3)^8), and the one
    missed may be the LR that trains best. The order goes out from the pick
    (factor 1), so a search of one trial trains the curve's own range.
    """
    scales = cfg.lr_scales or ()
    if cfg.grid or len(scales) < 2:
        return []
    order = sorted(scales, key=lambda scale: abs(math.log(scale)))
    return [{"lr_scale": order[i % len(order)]} for i in range(cfg.num_samples)]


def num_trials(cfg: SearchConfig, bn_searched: bool = True) -> int:
    """How many trials the search runs: ``num_samples``, times the grid's size with ``grid``.

    Tune repeats a grid ``num_samples`` times; the BN list counts only where
    BatchNorm momentum is searched.
    """
    if not cfg.grid:
        return cfg.num_samples
    lists = [
        cfg.weight_decay_values,
        cfg.bn_momentum_values if bn_searched else None,
        cfg.lr_scales,
    ]
    return cfg.num_samples * math.prod(len(values) for values in lists if values is not None)


def _from_values(values: tuple[float, ...], grid: bool) -> Any:
    return tune.grid_search(list(values)) if grid else tune.choice(list(values))


def trial_resources(cluster: Mapping[str, float], cfg: SearchConfig) -> dict[str, float]:
    """What each trial asks Ray for, sized to what ``cluster`` has.

    A GPU request on a cluster without GPUs would leave every trial pending
    forever, so trials are CPU-only there; a request above the cluster's total
    could never be met, so it is capped.
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpus <= 0:
        raise ValueError(f"the Ray cluster has no CPU to run trials on; its resources: {cluster}.")
    resources = {"cpu": min(cfg.cpus_per_trial, cpus)}
    if gpus > 0:
        resources["gpu"] = min(cfg.gpus_per_trial, gpus)
    return resources


def trial_threads(resources: Mapping[str, float]) -> int:
    """Torch threads of a trial: the CPUs Ray gives it (``trial_resources``), at least 1."""
    return max(1, int(resources["cpu"]))


def check_storage(storage_path: str) -> str:
    """Where Tune keeps the search: a local folder made absolute, or a URI checked writable.

    A URI is any that pyarrow resolves (``s3://bucket/prefix``, ``gs://``,
    ``abfs://``, ``hdfs://``), as Tune reads it on every node. An S3-compatible
    store (MinIO, Ceph, moto) is reached through the standard
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:9000``),
    which pyarrow reads wherever a trial runs. A small marker object is written
    and deleted first, so a missing bucket or credentials fail here, in one
    line, not in the first trial's checkpoint after the range test.

    Raises:
        ConfigError: no filesystem handles the URI's scheme, or it cannot be written.
    """
    if "://" not in storage_path:
        return str(Path(storage_path).expanduser().resolve())
    import pyarrow
    import pyarrow.fs

    where = f"search.storage_path {storage_path!r}"
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage_path)
    except (OSError, pyarrow.ArrowException) as exc:
        raise ConfigError(
            f"{where}: no filesystem handles it ({_one_line(exc)}); expected a local folder "
            "or a URI that pyarrow reads: s3://, gs://, abfs://, hdfs://, file://"
        ) from None
    marker = f"{path.rstrip('/')}/.autolr-write-check-{os.getpid()}-{time.time_ns()}"
    try:
        with fs.open_output_stream(marker) as out:
            out.write(b"autolr checks that the search can write here\n")
        fs.delete_file(marker)
    except (OSError, pyarrow.ArrowException) as exc:
        raise ConfigError(
            f"{where} is not writable: {_one_line(exc)}; expected an existing bucket or "
            f"folder that these credentials may write{_credentials_hint(storage_path)}"
        ) from None
    return storage_path


def _credentials_hint(uri: str) -> str:
    """Why an S3 write may have failed when no credentials are set where AWS looks first."""
    if not uri.startswith("s3://"):
        return ""
    sources = (
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",  # EKS service accounts
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",  # ECS tasks
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    )
    files = (
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
    )
    if any(os.environ.get(key) for key in sources) or any(
        Path(f).expanduser().is_file() for f in files
    ):
        return ""
    return (
        "; no AWS credentials are set (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "AWS_PROFILE or ~/.aws/credentials)"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]


def _tuner(
    task: Task,
    setup: _TrialSetup,
    cfg: SearchConfig,
    resources: dict[str, float],
    *,
    storage_path: str,
    experiment_path: str,
    resume: bool,
    bn_searched: bool,
    higher_is_better: bool,
    progress: bool,
) -> tuple[tune.Tuner, bool]:
    """A new Tuner, or the interrupted one restored, and whether it was restored."""
    trainable = tune.with_resources(
        # with_parameters puts the task (and its data) in the object store once.
        tune.with_parameters(_run_trial, task=task, setup=setup),
        resources,
    )
    if resume and tune.Tuner.can_restore(experiment_path):
        log.info("resuming the search in %s", experiment_path)
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True), True
    if resume:
        log.info("no search to resume in %s; starting one", experiment_path)
    total = num_trials(cfg, bn_searched)
    dimensions = [_dimension("weight_decay", cfg.weight_decay_values, cfg.grid)]
    if bn_searched:
        dimensions.append(_dimension("bn_momentum", cfg.bn_momentum_values, cfg.grid))
    if len(cfg.lr_scales or ()) > 1:
        dimensions.append(_dimension("lr_scale", cfg.lr_scales, cfg.grid))
    log.info(
        "searching %s over %d trials of %d epochs (%s), %s per trial",
        ", ".join(dimensions),
        total,
        setup.epochs,
        "ASHA: weak trials stop early"
        if cfg.scheduler == "asha"
        else "FIFO: every trial trains the full budget",
        resources,
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg, bn_searched),
        tune_config=tune.TuneConfig(
            metric=setup.metric_key,
            mode="max" if higher_is_better else "min",
            num_samples=cfg.num_samples,
            # The limit goes here: Tune ignores max_concurrent_trials with a generator.
            search_alg=BasicVariantGenerator(
                points_to_evaluate=scale_points(cfg),
                random_state=cfg.seed,
                max_concurrent=cfg.max_concurrent,
            ),
            scheduler=_scheduler(cfg, setup.epochs),
            reuse_actors=True,  # a fresh trial process costs ~5 s to start
        ),
        run_config=tune.RunConfig(
            name=setup.name,
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            # Keeping 2 lets Tune's experiment snapshot (taken every 2nd checkpoint)
            # always point at a checkpoint that still exists.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[_ProgressLog(setup.metric_key, setup.epochs, total)] if progress else None,
            verbose=0,
        ),
    )
    return tuner, False


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


def _dimension(name: str, values: tuple[float, ...] | None, grid: bool) -> str:
    """How one dimension is searched, for the log: ``weight_decay (grid of 5)``."""
    if values is None:
        return name
    return f"{name} ({'grid' if grid else 'one'} of {len(values)})"


def _start_ray(address: str | None) -> bool:
    """Connect to Ray; return whether we did (and so must shut it down).

    A private Ray listens on 127.0.0.1 only (see `_loopback_node`), with the
    token authentication that ray 2.60 turns on for a new local Ray (unless
    ``RAY_AUTH_MODE`` says otherwise); a cluster at ``address`` must answer
    within `CONNECT_TIMEOUT_S`.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if not address:
        with _loopback_node():
            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                _node_ip_address=LOOPBACK,
                **quiet,
            )
        return True
    _check_reachable(address)
    try:  # an existing cluster sizes itself; num_cpus would raise
        ray.init(address=address, **quiet)
    except ConnectionError as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address!r} (ray_address or $RAY_ADDRESS); "
            f"expected a running cluster: {exc}"
        ) from exc
    return True


def _check_reachable(address: str) -> None:
    """Raise ConfigError unless something listens at ``address``'s ``host:port``.

    Addresses without a port (``"auto"``, a cluster found through Ray's files)
    are left to ray.init.
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address!r} (ray_address or $RAY_ADDRESS): "
            f"nothing answered at {host}:{port} within {CONNECT_TIMEOUT_S:g} s ({exc}); "
            "expected a running cluster's GCS address, or no address for a private Ray."
        ) from None


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let ray.init keep a node IP of 127.0.0.1, so that every Ray process binds loopback.

    ray.init rewrites a loopback node IP to the machine's outward address, and the
    GCS, raylet, workers and agents then listen on all interfaces; it keeps it when
    Ray clusters are off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at
    import), and with a loopback node IP every process binds 127.0.0.1 (ray 2.60,
    checked with ``ss -ltnp``). Only this call sees the switch: a driver attaching to
    a cluster needs its real address.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep the caller's SIGINT and SIGTERM handlers over the block.

    ``ray.init`` replaces the driver's SIGTERM handler (in ray 2.60 SIGTERM then
    aborts it, exit 134), so the pipeline could not end its runs as KILLED.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: set outside Python, nothing to restore
                signal.signal(sig, handler)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class _TrialSetup:
    """What every trial needs besides its sampled config."""

    max_lr: float  # the curve's 1cycle range, before a trial's lr_scale
    min_lr: float
    epochs: int
    seed: int
    metric_key: str  # e.g. "val_accuracy"
    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    name: str
    threads: int  # torch threads: the CPUs Ray gave the trial
    wd_aware: bool
    range_test: RangeTestConfig
    selection_method: str


def _run_trial(config: dict[str, Any], task: Task, setup: _TrialSetup) -> None:
    """Tune's trainable: train one (weight_decay, bn_momentum, lr_scale) point, report each epoch.

    Resumes from Tune's checkpoint when Tune has one (a retry or a resumed
    search), and reuses the trial's MLflow run from the earlier attempt.
    """
    with fail_fast_http():
        _train_trial(config, task, setup)


def _train_trial(config: dict[str, Any], task: Task, setup: _TrialSetup) -> None:
    torch.set_num_threads(setup.threads)
    weight_decay, bn_momentum = config["weight_decay"], config.get("bn_momentum")
    saved = _load_checkpoint(tune.get_checkpoint())
    tracker = Tracker.attach(setup.tracking_uri, setup.experiment_id)
    run_id, have_params, logged = _trial_run(tracker, setup, tune.get_context().get_trial_id())

    if saved is not None:  # the LR range must be the one the checkpoint trained with
        lrs = {"lr_scale": 1.0, **saved["lrs"]}  # checkpoints from before lr_scales lack it
    else:
        if setup.wd_aware:
            lrs = _wd_aware_lrs(task, setup, weight_decay, bn_momentum)
        else:
            lrs = {"max_lr": setup.max_lr, "min_lr": setup.min_lr, "lr_source": "shared"}
        scale = float(config.get("lr_scale", 1.0))
        lrs.update(max_lr=lrs["max_lr"] * scale, min_lr=lrs["min_lr"] * scale, lr_scale=scale)
    params = {"weight_decay": weight_decay, "bn_momentum": bn_momentum, "epochs": setup.epochs}
    # MLflow refuses to change a param, so a reused run only gets the ones it lacks.
    tracker.log_params(run_id, {k: v for k, v in {**params, **lrs}.items() if k not in have_params})

    def on_epoch(metrics: EpochMetrics, state) -> None:
        # Log before reporting: Tune reports synchronously, and a trial that ASHA stops
        # (or that reaches max_t) exits inside report(). An epoch re-run after a crash
        # between the two is already logged, with the same values (training resumes
        # bit-exactly), so it is not logged twice.
        if metrics.epoch not in logged:
            tracker.log_metrics(
                run_id, epoch_metrics(metrics, setup.metric_key), step=metrics.epoch
            )
        with tempfile.TemporaryDirectory(prefix="autolr-ckpt-") as folder:
            torch.save({"train": state(), "lrs": lrs}, Path(folder) / CHECKPOINT_FILE)
            tune.report(
                {
                    "epoch": metrics.epoch,
                    setup.metric_key: metrics.val_metric,
                    "val_loss": metrics.val_loss,
                    "train_loss": metrics.train_loss,
                    "max_lr": lrs["max_lr"],
                    "min_lr": lrs["min_lr"],
                    "lr_scale": lrs["lr_scale"],
                },
                checkpoint=tune.Checkpoint.from_directory(folder),
            )

    # Training resumes bit-exactly, so a retry of a diverged trial would diverge again:
    # the trial's folder remembers the divergence and the retry fails at once.
    diverged = Path(tune.get_context().get_trial_dir()) / "diverged.txt"
    if diverged.exists():
        raise TrainingDivergedError(diverged.read_text())
    try:
        train(
            task,
            max_lr=lrs["max_lr"],
            min_lr=lrs["min_lr"],
            epochs=setup.epochs,
            weight_decay=weight_decay,
            bn_momentum=bn_momentum,
            schedule="onecycle",
            seed=setup.seed,
            accumulation_steps=setup.range_test.accumulation_steps,
            on_epoch=on_epoch,
            resume=saved["train"] if saved is not None else None,
            progress=False,
        )
    except TrainingDivergedError as exc:
        diverged.write_text(str(exc))
        raise
    # Reached only when Tune lets the function return (ASHA stops even a trial that
    # reaches max_t inside report()); the driver sets the final status either way.
    tracker.end_run(run_id, "FINISHED")


def _load_checkpoint(checkpoint: tune.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        # Tensors and plain values only (see `train`'s resume): weights_only refuses
        # anything else, so a planted trial.pt cannot run code when it is restored.
        return torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)


def _trial_run(
    tracker, setup: _TrialSetup, trial_id: str
) -> tuple[str | None, dict[str, str], set[int]]:
    """The trial's MLflow run (found by its trial-id tag, else created), its params and epochs."""
    tags = {TRIAL_TAG: trial_id, SEARCH_TAG: setup.name}
    if setup.parent_run_id:
        tags[PARENT_TAG] = setup.parent_run_id
    found = tracker.find_runs({TRIAL_TAG: trial_id})
    if not found:
        return tracker.start_run(f"{setup.name}-{trial_id}", tags=tags), {}, set()
    run = found[0]
    tracker.set_tags(run.run_id, tags)  # a resumed search may hang under a new parent
    return run.run_id, run.params, tracker.metric_steps(run.run_id, "train_loss")


def _wd_aware_lrs(
    task: Task, setup: _TrialSetup, weight_decay: float, bn_momentum: float | None
) -> dict[str, Any]:
    """Re-run the range test at this trial's weight decay and BN momentum, and pick from it.

    A curve with no usable structure falls back to the shared pick rather than
    failing the trial: the trial still measures its weight decay.
    """
    from autolr.range_test import range_test_task
    from autolr.selection import select_lr

    curve = range_test_task(
        task,
        setup.range_test,
        weight_decay=weight_decay,
        bn_momentum=bn_momentum,
        progress=False,
    )
    try:
        choice = select_lr(curve, method=setup.selection_method)
    except CurveError as exc:
        return {
            "max_lr": setup.max_lr,
            "min_lr": setup.min_lr,
            "lr_source": f"shared (the trial's range test gave no pick: {exc})"[:500],
        }
    return {
        "max_lr": choice.max_lr,
        "min_lr": choice.min_lr,
        "lr_source": "wd_aware",
        "lr_confidence": choice.confidence,
    }


def _summaries(grid: tune.ResultGrid, setup: _TrialSetup) -> list[TrialSummary]:
    trials = []
    for result in grid:
        metrics, config = result.metrics or {}, result.config or {}
        epochs_run = int(metrics.get("epoch", 0))
        lr_scale = float(config.get("lr_scale", 1.0))
        if result.error is not None:
            status = "ERROR"
        elif epochs_run >= setup.epochs:
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
            )
        )
    return sorted(trials, key=lambda t: t.trial_id)


def _last_line(error: BaseException) -> str:
    """The line of a (Ray-wrapped) error that says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _close_trial_runs(
    trials: list[TrialSummary],
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str | None,
    name: str,
) -> tuple[list[TrialSummary], list[str]]:
    """Give every trial run its final status, so none stays RUNNING; attach run ids.

    The driver does this because a trial that ASHA stops, or whose process dies,
    cannot end its own run. Runs of this search under ``parent_run_id`` whose
    trial Tune no longer knows are marked KILLED.
    """
    tracker = Tracker.attach(tracking_uri, experiment_id)
    by_id = {t.trial_id: t for t in trials}
    run_ids: dict[str, str] = {}
    for run in tracker.find_runs({SEARCH_TAG: name}):
        trial = by_id.get(run.tags.get(TRIAL_TAG, ""))
        if trial is None:
            if parent_run_id and run.tags.get(PARENT_TAG) == parent_run_id:
                if run.status == "RUNNING":
                    tracker.end_run(run.run_id, "KILLED")
            continue
        run_ids.setdefault(trial.trial_id, run.run_id)
        tags: dict[str, Any] = {
            "autolr.status": trial.status,
            "autolr.epochs_run": trial.epochs_run,
        }
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        if trial.status == "STOPPED":
            tags[STOPPED_TAG] = "asha"
        if trial.error:
            tags["autolr.error"] = trial.error
        tracker.set_tags(run.run_id, tags)
        if run.status != RUN_STATUS[trial.status]:
            tracker.end_run(run.run_id, RUN_STATUS[trial.status])
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
