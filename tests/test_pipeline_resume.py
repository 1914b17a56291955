"""`python -m autolr.pipeline --resume` after the pipeline was killed mid-search.

The killed driver is attached to a Ray instance of this test's own, so killing
it leaves no orphaned Ray processes; the resumed run attaches to it too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from autolr.search import TRIAL_TAG
from autolr.tracking import PARENT_TAG

TESTS = Path(__file__).resolve().parent

# A builder module for the slow task, and a driver that ships both test modules
# to Ray's workers by value (they cannot import tests/).
SLOW_TASK = """
import test_search

def build():
    return test_search.tiny_task(test_search.SlowNet)
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
def test_a_pipeline_killed_during_the_search_resumes_into_the_same_run(ray_cluster, tmp_path):
    (tmp_path / "slow_task.py").write_text(SLOW_TASK)
    (tmp_path / "driver.py").write_text(DRIVER.format(tests=str(TESTS), here=str(tmp_path)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        sys.executable,
        str(tmp_path / "driver.py"),
        "--task",
        "slow_task:build",
        "--tracking-uri",
        uri,
        "--ray-address",
        ray_cluster,
        "--no-progress",
        "--set",
        "range_test.num_iter=40",
        "--set",
        "range_test.repeats=1",
        "--set",
        "train.epochs=3",
        "--set",
        "search.num_samples=4",
        "--set",
        "search.reduction_factor=2",
        "--set",
        f"search.storage_path={tmp_path}",
        "--output",
        str(tmp_path / "summary.json"),
    ]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:  # kill the pipeline once a trial has saved a checkpoint
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("autolr-tiny-*/*/checkpoint_*")):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial checkpointed within 240 s"
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (tmp_path / "summary.json").exists()
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("autolr").experiment_id])
    (parent,) = [run for run in runs if PARENT_TAG not in run.data.tags]
    assert parent.info.status == "RUNNING"  # the killed driver could not close it
    assert len(runs) > 1  # and a trial had started its child run

    second = subprocess.run(
        [*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mlflow"]["run_id"] == parent.info.run_id
    assert "resumed the search" in " ".join(summary["search"]["notes"])
    assert len(summary["trials"]) == 4
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    trial_ids = [run.data.tags[TRIAL_TAG] for run in children]
    assert sorted(trial_ids) == sorted(t["trial_id"] for t in summary["trials"])  # no duplicate
    assert all(run.info.status in ("FINISHED", "KILLED") for run in children)
    # the resumed run reused the range test instead of running another
    assert "range_test" not in summary["stage_seconds"]
