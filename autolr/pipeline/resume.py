"""What ``--resume`` needs: the state file in the search's folder, and the run to continue.

The pipeline's MLflow run is tagged with its config, its search's folder and
the process driving it; a run whose driver is gone is resumable (or, found
by another start, ended as FAILED).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autolr.config import Config
from autolr.errors import ConfigError
from autolr.pipeline.parent_run import ParentRun
from autolr.results import LRChoice, RangeTestResult

if TYPE_CHECKING:
    from autolr.tracking import RunRecord, Tracker

log = logging.getLogger("autolr")

STATE_FILE = "autolr_pipeline.json"  # in the search's folder: what --resume needs
STATE_KEYS = ("config", "run_id", "name", "curve", "choice", "finished")

# Tags on the pipeline's MLflow run. --resume finds a run by them and opens only the
# folder its run recorded, never one it finds on disk: Tune unpickles that folder.
ROLE_TAG = "autolr.role"  # "pipeline"
CONFIG_TAG = "autolr.config"  # _config_key: a run resumes only with the config it started with
FOLDER_TAG = "autolr.search_folder"  # the Tune folder the run owns
DRIVER_TAG = "autolr.driver"  # host:pid:start of the process running it, to spot a dead one


def _driver() -> str:
    """This process as ``host:pid:start``; the start time tells a reused pid apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:  # Linux: field 22 of /proc/<pid>/stat, in clock ticks since boot
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _driver_alive(driver: str | None) -> bool:
    """Whether the process that a run's driver tag names still runs; True when it can't tell."""
    try:
        host, pid, start = (driver or "").rsplit(":", 2)
        pid_number = int(pid)
    except ValueError:
        return True  # no tag, or not ours: leave the run alone
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return _start_time(pid_number) == start


def _in_use(record: RunRecord) -> bool:
    """Whether a pipeline run is finished or may still have its driver; else it is resumable.

    Only a RUNNING run can have a live driver. One that ended KILLED (SIGTERM) or
    FAILED is resumable from any host, also when its driver ran on another one, as
    when Kubernetes reruns a job whose head pod was evicted in a new pod.
    """
    return record.status == "FINISHED" or (
        record.status == "RUNNING" and _driver_alive(record.tags.get(DRIVER_TAG))
    )


def _fail_dead_runs(tracker: Tracker) -> None:
    """End as FAILED the pipeline runs whose driver died without ending them (e.g. SIGKILL)."""
    for record in tracker.find_runs({ROLE_TAG: "pipeline"}):
        if record.status == "RUNNING" and not _driver_alive(record.tags.get(DRIVER_TAG)):
            log.info(
                "run %s: its driver %s is gone; ending it as FAILED",
                record.run_id,
                record.tags.get(DRIVER_TAG),
            )
            dead = ParentRun(tracker, record.run_id)
            dead.end_trial_runs("FAILED")
            dead.end("FAILED")


def _config_key(cfg: Config) -> str:
    """What must match for a run to resume another: the config, less how it is shown."""
    fields = {k: v for k, v in cfg.to_dict().items() if k != "progress"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _new_state(
    cfg: Config, parent: ParentRun, folder: str, curve: RangeTestResult, choice: LRChoice
) -> dict[str, Any]:
    # to_dict has the scalars and tuples; the evidence curve goes along for the plot
    choice_fields = {
        **choice.to_dict(),
        "log_lrs": choice.log_lrs.tolist(),
        "smoothed": choice.smoothed.tolist(),
    }
    return {
        "config": _config_key(cfg),
        "run_id": parent.run_id,
        "tracking_uri": parent.tracking_uri,
        "experiment": cfg.tracking.experiment,
        "name": folder.rpartition("/")[2],
        "curve": curve.to_dict(),
        "choice": choice_fields,
        "finished": False,
    }


def _write_state(folder: str, state: dict[str, Any]) -> None:
    """Write the resume state atomically: a kill mid-write must not corrupt it."""
    if "://" in folder:  # an object store applies one PUT whole or not at all
        _write_uri(f"{folder}/{STATE_FILE}", json.dumps(state))
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{STATE_FILE}.partial"
    partial.write_text(json.dumps(state))
    os.replace(partial, folder / STATE_FILE)


def _open_run(
    tracker: Tracker, cfg: Config, task_name: str, storage: str, resume: bool | str
) -> tuple[ParentRun, str, dict[str, Any] | None]:
    """The pipeline's run, its search's folder and the state it saved (None: a new run).

    With ``resume`` (see `_find_resumable`) the interrupted run is reopened, its
    driver tag now naming this process; without it, or with none to resume, a
    new run is started.
    """
    saved = _find_resumable(tracker, cfg, resume) if resume else None
    if saved is None:
        if resume:
            log.info("nothing to resume in %s; starting a new run", tracker.tracking_uri)
        parent, folder = _start_run(tracker, cfg, task_name, storage)
        return parent, folder, None
    parent = ParentRun(tracker, saved["run_id"])
    tracker.reopen_run(parent.run_id)
    parent.set_tags({DRIVER_TAG: _driver()})
    log.info("resuming run %s (search %s)", parent.run_id, saved["folder"])
    return parent, saved["folder"], saved


def _start_run(
    tracker: Tracker, cfg: Config, task_name: str, storage: str
) -> tuple[ParentRun, str]:
    """A new pipeline run, tagged to be found by --resume, and its search's folder."""
    # Unique per run: two pipelines started in the same second get their own folders.
    name = f"autolr-{_folder_safe(task_name)}-{time.strftime('%Y%m%d-%H%M%S')}-"
    name += uuid.uuid4().hex[:8]
    tags = {
        ROLE_TAG: "pipeline",
        CONFIG_TAG: _config_key(cfg),
        FOLDER_TAG: f"{storage}/{name}",
        DRIVER_TAG: _driver(),
    }
    run_id = tracker.start_run(cfg.tracking.run_name or f"autolr-{task_name}", tags=tags)
    if run_id is None:  # the store answered a moment ago: nothing would be logged
        raise ConfigError(
            f"cannot create the pipeline's run in the MLflow store {tracker.tracking_uri}: "
            f"{tracker.errors[-1]}"
        )
    return ParentRun(tracker, run_id), f"{storage}/{name}"


def _folder_safe(name: str) -> str:
    """A task name as part of a folder name: runs of other characters become one '_'."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_.") or "task"


def _find_resumable(tracker: Tracker, cfg: Config, resume: bool | str) -> dict[str, Any] | None:
    """The saved state of the run to resume, with its folder; None if there is none.

    ``resume`` is a run id, or True for the newest unfinished run of this config
    whose driver is gone. Only the folder the run recorded is read, and only if
    the state in it names that run as its owner.
    """
    key = _config_key(cfg)
    if isinstance(resume, str):
        record = tracker.get_run(resume)
        if record is None or record.tags.get(ROLE_TAG) != "pipeline":
            raise ConfigError(
                f"--resume {resume}: expected the id of a pipeline run in experiment "
                f"{cfg.tracking.experiment!r} of {tracker.tracking_uri}, but there is none"
            )
        if record.tags.get(CONFIG_TAG) != key:
            raise ConfigError(
                f"--resume {resume}: the run was started with another config; expected the "
                "same --config, --task and --set values as its first start"
            )
        if _in_use(record):
            what = "finished" if record.status == "FINISHED" else "still running"
            raise ConfigError(f"--resume {resume}: expected an interrupted run, but it is {what}")
        state = _read_state(record)
        if state is None:
            raise ConfigError(
                f"--resume {resume}: the run stopped before its search started, so there is "
                "nothing to resume; start a new run"
            )
        return state
    for record in reversed(tracker.find_runs({CONFIG_TAG: key})):  # newest first
        if _in_use(record):
            continue
        state = _read_state(record)
        if state is not None:
            return state
    return None


def _read_state(record: RunRecord) -> dict[str, Any] | None:
    """The unfinished state in the folder ``record`` recorded, checked; None if it has none."""
    folder = record.tags.get(FOLDER_TAG)
    path = f"{folder}/{STATE_FILE}"
    try:
        text = _read_text(path) if folder else None
        if text is None:
            return None
        state = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the resume state {path}: {exc}") from exc
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(
            f"the resume state {path} lacks {missing}; expected the keys {list(STATE_KEYS)} "
            "that autolr writes"
        )
    if state["run_id"] != record.run_id or state["name"] != folder.rpartition("/")[2]:
        raise ConfigError(
            f"the resume state {path} belongs to run {state['run_id']!r} "
            f"(folder {state['name']!r}), not to run {record.run_id}; refusing to restore it"
        )
    if state["finished"]:
        return None
    state["folder"] = folder
    state["choice"]["log_lrs"] = np.asarray(state["choice"]["log_lrs"])
    state["choice"]["smoothed"] = np.asarray(state["choice"]["smoothed"])
    state["choice"]["changepoints"] = tuple(state["choice"]["changepoints"])
    state["choice"]["warnings"] = tuple(state["choice"]["warnings"])
    return state


def _mark_finished(folder: str) -> None:
    state = json.loads(_read_text(f"{folder}/{STATE_FILE}"))
    _write_state(folder, {**state, "finished": True})


def _read_text(path: str) -> str | None:
    """The text of a local file or of an object at a URI (s3://...); None if there is none."""
    if "://" not in path:
        return Path(path).read_text() if Path(path).is_file() else None
    import pyarrow.fs

    fs, where = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(where).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(where) as stream:
        return stream.read().decode()


def _write_uri(uri: str, text: str) -> None:
    import pyarrow.fs

    fs, where = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(where) as stream:
        stream.write(text.encode())
