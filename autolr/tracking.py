"""MLflow tracking: the only module that imports mlflow.

The pipeline's run is the parent; search trials become child runs tagged
``mlflow.parentRunId``, which the MLflow UI nests. The store is created here,
in the driver, before any trial starts: concurrent first writers race on a
fresh sqlite schema.

Tracking never takes the pipeline down: when the store stops answering, the
first failure is logged as a warning, later calls are skipped, and the errors
are kept in ``Tracker.errors`` for the summary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from autolr._checks import environ, probe_writable
from autolr.errors import ArgumentError, ConfigError
from autolr.results import EpochMetrics, TrialSummary

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlruns"  # folder, relative to the working directory
PARENT_TAG = "mlflow.parentRunId"  # the tag the MLflow UI nests child runs by
TRIAL_TAG = "autolr.trial_id"  # finds a trial's run again after a retry or a resume
SEARCH_TAG = "autolr.search"  # the search's name, shared by its trial runs
STOPPED_TAG = "autolr.stopped_by"
# A trial ASHA stopped early ran as planned, so its run is FINISHED (as Ray's own
# MLflowLoggerCallback ends it), with STOPPED_TAG saying who stopped it; KILLED showed
# a red cross in the MLflow UI on most trials of every ASHA search.
RUN_STATUS = {"TERMINATED": "FINISHED", "STOPPED": "FINISHED", "ERROR": "FAILED"}


def resolve_tracking_uri(uri: str | None = None, root: str | Path | None = None) -> str:
    """The tracking URI to use, always absolute.

    ``uri`` wins, then ``$MLFLOW_TRACKING_URI``, then a sqlite database under
    ``<root>/mlruns`` (root: the working directory). MLflow 3 keeps its file
    store in maintenance mode, so the local default is sqlite.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if not urlsplit(uri).scheme and uri != "databricks":  # a path: a database or folder
            path = Path(uri).expanduser().resolve()
            if path.suffix != ".db":
                path = path / "mlflow.db"
            return f"sqlite:///{path}"
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # sqlite:///rel.db is relative to the cwd, which differs in Ray trials.
            return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
        return uri
    store = Path(root or Path.cwd()).resolve() / DEFAULT_STORE
    return f"sqlite:///{store / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _check_writable_store(database: Path) -> None:
    """Fail in one line now: MLflow retries an unwritable sqlite store for ~105 s, then raises."""
    try:
        probe_writable(database.parent)
        if database.exists():
            with open(database, "r+b"):
                pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write the MLflow store {database}: {exc.strerror or exc}; "
            "expected a writable folder (--tracking-uri, or a writable working directory)"
        ) from exc


@contextlib.contextmanager
def _store_lock(database: Path | None) -> Iterator[None]:
    """An exclusive lock beside a sqlite store (nothing for other stores), held for the block."""
    if database is None:
        yield
        return
    import fcntl

    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _artifact_root(tracking_uri: str) -> str | None:
    """Artifacts beside a local sqlite database; servers choose their own."""
    database = _sqlite_path(tracking_uri)
    return (database.parent / "artifacts").as_uri() if database is not None else None


class Tracker:
    """A thin, fault-tolerant layer over `mlflow.MlflowClient`.

    Example:
        >>> tracker = Tracker("sqlite:////tmp/autolr-doc/mlflow.db", "demo")  # doctest: +SKIP
        >>> run_id = tracker.start_run("pipeline")  # doctest: +SKIP
        >>> tracker.log_metrics(run_id, {"val_accuracy": 0.9}, step=1)  # doctest: +SKIP
        >>> tracker.end_run(run_id)  # doctest: +SKIP
    """

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        _mlflow()  # a missing extra says so, not "cannot reach the store"
        database = _sqlite_path(tracking_uri)
        if database is not None:
            _check_writable_store(database)
        try:
            # Two pipelines starting on a fresh sqlite store race on its schema ("table
            # spans already exists"), which the client creates, and on the experiment.
            with _store_lock(database), fail_fast_http():  # a mistyped URL fails in seconds
                self._connect(tracking_uri)
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=_artifact_root(tracking_uri)
                    )
                else:
                    self.experiment_id = found.experiment_id
        except Exception as exc:
            raise ConfigError(
                f"cannot reach the MLflow tracking store at {tracking_uri!r}: {exc}"
            ) from exc
        if found is not None and found.lifecycle_stage == "deleted":
            # MLflow refuses runs in a deleted experiment; tracking would be off from the start.
            raise ConfigError(
                f"the MLflow experiment {experiment!r} (id {found.experiment_id}) in "
                f"{tracking_uri} is deleted; expected an active one: restore it with "
                f"`mlflow experiments restore --experiment-id {found.experiment_id}` "
                "or choose another name (tracking.experiment)"
            )

    @classmethod
    def attach(cls, tracking_uri: str, experiment_id: str) -> Tracker:
        """A tracker on an experiment that already exists, e.g. inside a Ray trial.

        Unlike the constructor it creates nothing and never raises: a store that
        does not answer only turns this tracker off.
        """
        tracker = cls.__new__(cls)
        tracker._connect(tracking_uri)
        tracker.experiment_id = experiment_id
        return tracker

    def _connect(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.errors: list[str] = []
        self.client = _mlflow().MlflowClient(tracking_uri=tracking_uri)

    @property
    def healthy(self) -> bool:
        return not self.errors

    def _call(self, what: str, fn, *args, final: bool = False, **kwargs) -> Any:
        # Once the store failed, don't wait on it again; but always try to end a
        # run, so that one passing failure does not leave it RUNNING.
        if self.errors and not final:
            return None
        try:
            with fail_fast_http():  # a dead server would otherwise hold the driver ~4 min
                return fn(*args, **kwargs)
        except Exception as exc:  # any store failure must not stop training
            message = (
                f"MLflow {what} failed ({type(exc).__name__}: {exc}); tracking is off from here"
            )
            log.warning(message)
            self.errors.append(message)
            return None

    def start_run(
        self, run_name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] = {}
    ) -> str | None:
        from mlflow.tracking.context.registry import resolve_tags

        # the user, source and git tags MLflow's fluent API sets, which create_run does not
        tags = resolve_tags(dict(tags))
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run = self._call(
            "create_run",
            self.client.create_run,
            self.experiment_id,
            run_name=run_name,
            tags=tags,
        )
        return run.info.run_id if run is not None else None

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if run_id:
            batch = [Param(k, _param_value(v)) for k, v in params.items()]
            self._call("log_params", self.client.log_batch, run_id, params=batch)

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        if run_id:
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self._call("log_metrics", self.client.log_batch, run_id, metrics=batch)

    def log_series(self, run_id: str | None, series: Mapping[str, Sequence[float]]) -> None:
        """Log each named sequence as one metric over steps 0, 1, ...: a curve that
        the MLflow UI can plot and overlay across runs. NaN/inf points are skipped."""
        from mlflow.entities import Metric

        if run_id:
            now = int(time.time() * 1000)
            batch = [
                Metric(name, float(v), now, step)
                for name, values in series.items()
                for step, v in enumerate(values)
                if math.isfinite(v)
            ]
            for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 per batch
                self._call("log_series", self.client.log_batch, run_id, metrics=batch[i : i + 1000])

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if run_id:
            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            self._call("set_tags", self.client.log_batch, run_id, tags=batch)

    def log_artifact(self, run_id: str | None, path: str | Path, folder: str | None = None) -> None:
        if run_id:
            self._call("log_artifact", self.client.log_artifact, run_id, str(path), folder)

    @contextlib.contextmanager
    def system_metrics(self, run_id: str | None, *, resume: bool = False) -> Iterator[None]:
        """MLflow's system metrics on ``run_id`` while the block runs.

        ``system/cpu_utilization_percentage``, memory, disk, network and GPU use of
        this machine, sampled every `SYSTEM_METRICS_INTERVAL_S` (MLflow's own
        ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` wins) and logged as steps
        0, 1, ... (after the run's last step with ``resume``), the last partial
        interval at the end (`_finish`). Off without psutil,
        when ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is set false, or once the
        store failed.
        """
        monitor = None
        if run_id and _system_metrics_wanted():
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # its start and stop lines are INFO; the console keeps autolr's own
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            monitor = self._call(
                "system metrics",
                SystemMetricsMonitor,
                run_id,
                sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                resume_logging=resume,
                tracking_uri=self.tracking_uri,
            )
        if monitor is not None:
            monitor.start()
        try:
            yield
        finally:
            if monitor is not None:
                # finish() joins the sampling thread, which may be waiting on a store that
                # went away (MLflow retries for ~4 min): wait a bounded time, then leave it.
                stopper = threading.Thread(target=_finish, args=(monitor,), daemon=True)
                stopper.start()
                stopper.join(timeout=float(FAIL_FAST_HTTP["MLFLOW_HTTP_REQUEST_TIMEOUT"]))

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        """End a run as FINISHED, FAILED or KILLED."""
        if run_id:
            self._call("set_terminated", self.client.set_terminated, run_id, status, final=True)

    def reopen_run(self, run_id: str) -> None:
        """Mark a run RUNNING again, e.g. the parent run of a resumed pipeline."""
        self._call("update_run", self.client.update_run, run_id, status="RUNNING")

    def get_run(self, run_id: str) -> RunRecord | None:
        """This experiment's run ``run_id``; None if the store has no such run here."""
        from mlflow.exceptions import MlflowException

        try:
            with fail_fast_http():
                run = self.client.get_run(run_id)
        except MlflowException:
            return None
        if run.info.experiment_id != self.experiment_id:
            return None
        return RunRecord.of(run)

    def find_runs(self, tags: Mapping[str, str]) -> list[RunRecord]:
        """This experiment's runs that carry all of ``tags``, oldest first."""
        if not tags:
            raise ArgumentError("find_runs needs at least one tag to match, but got none.")
        for value in tags.values():
            if "'" in value:
                raise ArgumentError(
                    f"tag values to match cannot contain a quote, but got {value!r}."
                )
        query = " AND ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        runs = self._call(
            "search_runs",
            self.client.search_runs,
            [self.experiment_id],
            filter_string=query,
            max_results=10_000,
            order_by=["attributes.start_time ASC"],
        )
        return [RunRecord.of(run) for run in runs or ()]

    def metric_steps(self, run_id: str | None, key: str) -> set[int]:
        """The steps at which ``key`` was logged in ``run_id``."""
        if not run_id:
            return set()
        history = self._call("get_metric_history", self.client.get_metric_history, run_id, key)
        return {m.step for m in history or ()}


# MLflow's default: a sample costs a get_run and a log_batch, so the store sees one
# request every 5 s. `_finish` logs the samples of the last, partial interval.
SYSTEM_METRICS_INTERVAL_S = 10.0


def _finish(monitor) -> None:
    """Stop MLflow's monitor, then log what it sampled since it last logged.

    MLflow's loop logs only whole intervals, so a run shorter than one got no
    system metrics at all (a trial of a few seconds, or the CI's pipeline test
    on a loaded machine) and a longer one lost its last partial interval.
    """
    monitor.finish()
    tail = monitor.aggregate_metrics()
    if not tail:  # no sample since the last log: take one, the CPU's since the run began
        monitor.collect_metrics()
        tail = monitor.aggregate_metrics()
    monitor.publish_metrics(tail)
    monitor.mlflow_logger.flush()


def _system_metrics_wanted() -> bool:
    """psutil is installed and MLflow's switch for system metrics is not set false."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as switch

    try:
        import psutil  # noqa: F401  (MLflow's monitors read the machine through it)
    except ImportError:
        return False
    return not switch.defined or switch.get()


def _mlflow():
    """The mlflow module; it comes with the `pipeline` extra, not with the core."""
    try:
        import mlflow
    except ImportError as exc:
        message = 'autolr\'s tracking needs MLflow: pip install "autolr[pipeline]"'
        raise ImportError(message) from exc
    return mlflow


@dataclass(frozen=True)
class RunRecord:
    """What `Tracker.find_runs` reads of a run."""

    run_id: str
    status: str  # "RUNNING", "FINISHED", "FAILED", "KILLED" or "SCHEDULED"
    params: dict[str, str]
    tags: dict[str, str]

    @classmethod
    def of(cls, run) -> RunRecord:
        """The record of an `mlflow.entities.Run`."""
        return cls(run.info.run_id, run.info.status, dict(run.data.params), dict(run.data.tags))


# Under MLflow's defaults (7 retries with backoff, 120 s timeout) one call to a server
# that refuses connections takes about 4 minutes (247 s measured); with these, ~10 ms.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def fail_fast_http() -> Iterator[None]:
    """Within the block, an HTTP tracking store that does not answer fails in seconds.

    Settings already in the environment win. Used around every call of `Tracker`:
    a stalled store would otherwise hold up training for minutes.
    """
    with environ(FAIL_FAST_HTTP, keep_set=True):
        yield


def epoch_metrics(metrics: EpochMetrics, metric_key: str) -> dict[str, float]:
    """An epoch's metrics as autolr logs them; ``metric_key`` is e.g. "val_accuracy"."""
    return {
        "train_loss": metrics.train_loss,
        "val_loss": metrics.val_loss,
        metric_key: metrics.val_metric,
        "lr": metrics.lr,
    }


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's param limit


# ------------------------------------------------------------- the trials' runs


def trial_run(
    tracker: Tracker, search: str, trial_id: str, parent_run_id: str | None
) -> tuple[str | None, dict[str, str], set[int]]:
    """A search trial's run, found by its trial-id tag (a retry, a resumed search) or
    created; with the params and the epochs it already holds."""
    tags = {TRIAL_TAG: trial_id, SEARCH_TAG: search}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    found = tracker.find_runs({TRIAL_TAG: trial_id})
    if not found:
        return tracker.start_run(f"{search}-{trial_id}", tags=tags), {}, set()
    run = found[0]
    tracker.set_tags(run.run_id, tags)  # a resumed search may hang under a new parent
    return run.run_id, run.params, tracker.metric_steps(run.run_id, "train_loss")


def close_trial_runs(
    tracker: Tracker,
    search: str,
    parent_run_id: str | None,
    trials: Sequence[TrialSummary],
) -> dict[str, str]:
    """Give every trial run of ``search`` its final status, so none stays RUNNING.

    The search's driver does this because a trial that ASHA stops, or whose
    process dies, cannot end its own run. Runs under ``parent_run_id`` whose
    trial is not in ``trials`` are ended KILLED. Returns each trial's run id;
    what failed to be written is in ``tracker.errors``.
    """
    by_id = {t.trial_id: t for t in trials}
    run_ids: dict[str, str] = {}
    for run in tracker.find_runs({SEARCH_TAG: search}):
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
    return run_ids
