"""`python -m autolr.pipeline --resume` after the pipeline was killed mid-search.

The killed driver is attached to a Ray instance of this test's own, so killing
it leaves no orphaned Ray processes; the resumed run attaches to it too.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from services import start_group, stop_group, wait_until

from autolr.pipeline import (
    CONFIG_TAG,
    DRIVER_TAG,
    FOLDER_TAG,
    ROLE_TAG,
    STATE_FILE,
    ParentRun,
    _config_key,
    _find_resumable,
    _new_state,
    _start_time,
    config_from_args,
    main,
    parse_args,
)
from autolr.results import LRChoice, RangeTestResult
from autolr.search import TRIAL_TAG
from autolr.tracking import PARENT_TAG, Tracker

TESTS = Path(__file__).resolve().parent

# A builder module for the slow task, and a driver that ships both test modules
# to Ray's workers by value (they cannot import tests/).
SLOW_TASK = """
import dataclasses
import test_search

def build():
    return test_search.tiny_task(test_search.SlowNet)

def quick():
    return test_search.tiny_task()

def quick_spaced():  # a name that is no folder name as it is
    return dataclasses.replace(test_search.tiny_task(), name="tiny blobs/2")
"""
DRIVER = """
import sys
sys.path[:0] = [{tests!r}, {here!r}]
import ray.cloudpickle, slow_task, test_search
ray.cloudpickle.register_pickle_by_value(slow_task)
ray.cloudpickle.register_pickle_by_value(test_search)
from autolr.pipeline import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_during_the_search_ends_every_run_as_killed_and_resume_finishes_the_same_run(
    ray_cluster, tmp_path
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, "autolr")
    argv = [
        *("--task", "slow_task:build", "--tracking-uri", uri, "--ray-address", ray_cluster),
        *("--set", "range_test.num_iter=40", "--set", "range_test.repeats=1"),
        *("--set", "train.epochs=3", "--set", "search.num_samples=4"),
        *("--set", f"search.storage_path={tmp_path}"),
        *("--output", str(tmp_path / "summary.json")),
    ]
    proc, log = start_driver(tmp_path, "first", *argv)
    # SIGTERM (docker stop, Kubernetes) once a trial has saved a checkpoint: Ray's own
    # handler used to abort the driver here (exit 134), its runs left RUNNING
    wait_until(lambda: bool(list(tmp_path.glob("autolr-tiny-*/*/checkpoint_*"))), proc, log, 240)
    proc.send_signal(signal.SIGTERM)
    output = stopped(proc, log)
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith("autolr: stopped by SIGTERM")
    assert not (tmp_path / "summary.json").exists()
    (parent,), trials = runs_of(uri)
    assert parent.info.status == "KILLED"
    assert trials and {t.info.status for t in trials} <= {"KILLED", "FINISHED"}
    assert "KILLED" in {t.info.status for t in trials}  # it stopped trials mid-run
    # --resume finds this run (unfinished, its own state) and takes it up
    cfg = config_from_args(parse_args(["--no-progress", *argv]))
    saved = _find_resumable(Tracker(uri, "autolr"), cfg, True)
    assert saved is not None and saved["run_id"] == parent.info.run_id
    assert saved["folder"] == parent.data.tags[FOLDER_TAG]

    proc, log = start_driver(tmp_path, "second", *argv, "--resume")
    output = stopped(proc, log, timeout_s=300)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mlflow"]["run_id"] == parent.info.run_id
    assert "resumed the search" in " ".join(summary["search"]["notes"])
    assert len(summary["trials"]) == 4
    client = mlflow.MlflowClient(uri)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    _, children = runs_of(uri)
    trial_ids = [run.data.tags[TRIAL_TAG] for run in children]
    assert sorted(trial_ids) == sorted(t["trial_id"] for t in summary["trials"])  # no duplicate
    assert all(run.info.status in ("FINISHED", "KILLED") for run in children)
    # the resumed run reused the range test instead of running another
    assert "range_test" not in summary["stage_seconds"]


def pipeline_argv(*extra: str) -> list[str]:
    """The CLI's arguments for `tiny_task` with tiny budgets; the search stays on."""
    return [
        *("--task", "tests.test_pipeline:tiny_task", "--no-progress"),
        *("--set", "range_test.num_iter=40", "--set", "range_test.repeats=1"),
        *("--set", "train.epochs=1", "--set", "search.epochs=1"),
        *("--set", "search.num_samples=1", "--set", "search.lr_scales=[1]"),
        *extra,
    ]


def record_run(uri: str, argv: list[str], folder: Path, driver: str) -> str:
    """A pipeline run in the store as `run` records it: its config, its folder and its driver."""
    tracker = Tracker(uri, "autolr")
    tags = {
        ROLE_TAG: "pipeline",
        CONFIG_TAG: _config_key(config_from_args(parse_args(argv))),
        FOLDER_TAG: str(folder),
        DRIVER_TAG: driver,
    }
    return tracker.start_run("recorded", tags=tags)


class RunsCode:
    """Unpickling this runs a shell command: what a planted tuner.pkl or trial.pt can do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def plant(folder: Path, marker: Path, state: dict) -> None:
    """A Tune folder whose tuner.pkl and trial checkpoint each create ``marker`` when loaded."""
    checkpoint = folder / "trial_0" / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps(RunsCode(f"touch {marker}")))
    torch.save(RunsCode(f"touch {marker}"), checkpoint / "trial.pt")
    (folder / STATE_FILE).write_text(json.dumps(state))


def test_resume_opens_no_planted_folder_in_ray_results_nor_a_foreign_one(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the default storage: ./ray_results
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A flat sweep fails the new run at its pick, before any search: the test needs no Ray.
    argv = pipeline_argv(
        *("--tracking-uri", uri),
        *("--set", "range_test.start_lr=1e-12", "--set", "range_test.end_lr=1e-10"),
    )
    cfg = config_from_args(parse_args(argv))
    curve = RangeTestResult(np.logspace(-3, 0, 30), np.linspace(2, 1, 30), "completed")
    choice = LRChoice(max_lr=0.1, min_lr=0.01, confidence=0.5, method="changepoint", reason="x")
    planted = tmp_path / "ray_results" / "autolr-tiny-20260101-000000"
    store = SimpleNamespace(tracking_uri=uri)
    state = _new_state(cfg, ParentRun(store, "0" * 32), str(planted), curve, choice)
    marker = tmp_path / "code-ran"
    plant(planted, marker, state)

    # A folder that matches by its name and its config, but that no run in the store owns.
    assert main([*argv, "--resume"]) == 2
    assert "the curve is flat" in capsys.readouterr().err  # a new run: its own range test
    # A run the store records, whose folder holds another run's state.
    run_id = record_run(uri, argv, planted, f"{socket.gethostname()}:{os.getpid()}:0")
    assert main([*argv, "--resume", run_id]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "belongs to run '000" in err[-1] and "refusing to restore it" in err[-1]
    assert not marker.exists()


def test_a_malformed_resume_state_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = pipeline_argv("--tracking-uri", uri)
    folder = tmp_path / "ray_results" / "autolr-tiny-20260101-000000-abcd"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text("{}")
    record_run(uri, argv, folder, f"{socket.gethostname()}:{os.getpid()}:0")  # its driver is gone
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"autolr: error: the resume state {folder / STATE_FILE} lacks [")
    assert "'run_id'" in err[-1] and not any("Traceback" in line for line in err), err


def start_driver(folder: Path, name: str, *argv: str) -> tuple[subprocess.Popen, Path]:
    """The pipeline's CLI in ``folder`` through DRIVER, its output in ``folder/name.log``."""
    (folder / "slow_task.py").write_text(SLOW_TASK)
    (folder / "driver.py").write_text(DRIVER.format(tests=str(TESTS), here=str(folder)))
    log = folder / f"{name}.log"
    command = [sys.executable, str(folder / "driver.py"), "--no-progress", *argv]
    # Ray's settings stay: they hold the token that attaching to `ray_cluster` needs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return start_group(command, log, cwd=folder, env=env), log


def runs_of(uri: str) -> tuple[list, list]:
    """The pipeline runs and the trial runs in the store's "autolr" experiment."""
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("autolr").experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "pipeline"]
    return parents, [r for r in runs if PARENT_TAG in r.data.tags]


def stopped(proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> str:
    """Wait for ``proc`` to end; stop what is left of its group; its output."""
    try:
        proc.wait(timeout=timeout_s)
    finally:
        stop_group(proc)
    return log.read_text()


def test_a_run_whose_driver_was_sigkilled_is_ended_as_failed_on_the_next_start(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = pipeline_argv("--tracking-uri", uri, "--set", "search.enabled=false")
    driver = subprocess.Popen(["sleep", "60"])  # the killed pipeline
    dead = f"{socket.gethostname()}:{driver.pid}:{_start_time(driver.pid)}"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    parent = record_run(uri, argv, tmp_path / "never-made", dead)
    tracker = Tracker(uri, "autolr")
    trial = tracker.start_run("trial", parent_run_id=parent)
    # A next start of anything in that store; a flat sweep ends it early.
    flat = ("--set", "range_test.start_lr=1e-12", "--set", "range_test.end_lr=1e-10")
    assert main([*argv, *flat]) == 2
    client = mlflow.MlflowClient(uri)
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(trial).info.status == "FAILED"


@pytest.mark.slow
def test_two_pipelines_started_together_in_one_folder_keep_their_runs_folders_and_states(
    ray_cluster, tmp_path
):
    # The default store (./mlruns) does not exist yet, nor ./ray_results: both make them.
    argv = pipeline_argv("--ray-address", ray_cluster)[2:]  # the task is set below
    procs = [
        start_driver(
            tmp_path, task, "--task", f"slow_task:{task}", "--output", f"{task}.json", *argv
        )
        for task in ("quick", "quick_spaced")
    ]
    summaries = []
    for proc, log in procs:
        output = stopped(proc, log, timeout_s=300)
        assert proc.returncode == 0, output[-3000:]
        summaries.append(json.loads((tmp_path / f"{Path(log).stem}.json").read_text()))
    run_ids = {s["mlflow"]["run_id"] for s in summaries}
    folders = {Path(s["search"]["experiment_path"]) for s in summaries}
    assert len(run_ids) == 2 and len(folders) == 2
    for summary in summaries:
        folder = Path(summary["search"]["experiment_path"])
        assert folder.parent == tmp_path / "ray_results"
        state = json.loads((folder / STATE_FILE).read_text())
        assert state["run_id"] == summary["mlflow"]["run_id"] and state["finished"]
    assert any(f.name.startswith("autolr-tiny_blobs_2-") for f in folders)
    parents, _ = runs_of(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert {(p.info.run_id, p.info.status) for p in parents} == {(r, "FINISHED") for r in run_ids}
