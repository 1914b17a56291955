"""A search on a real two-node Ray cluster that loses its second node mid-trial.

The smallest version of ``benchmarks/multinode.py`` (which runs the pipeline as
a Ray job on ``ray start`` nodes, with S3 and an MLflow server, and commits its
result): two nodes of one CPU on this machine, started by Ray's own
`ray.cluster_utils.Cluster` with their own temp dirs, a search of two trials
(one per node) in this process, storage a local folder (both nodes share this
machine's disk) and MLflow a sqlite file. Once the second node's trial has a
checkpoint, every process of that node gets SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import ray.cloudpickle
import torch
from test_search import CHOICE, blobs

from autolr.config import SearchConfig
from autolr.pipeline import DRIVER_TAG, ROLE_TAG, _in_use
from autolr.search import TRIAL_TAG, SearchSite, TrialPlan, search
from autolr.tasks.base import Task
from autolr.tracking import PARENT_TAG, Tracker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from multinode import TRIAL_ID, descendants, restarts  # noqa: E402

EPOCHS = 4
SLOW_S = 0.15  # per forward pass on the second node: ~2 s per epoch, so it dies mid-trial
WAIT_S = 240  # for the second node's first checkpoint; ~10 s on an idle 2-core machine

# 71-82 s on the shared 2-core machine (a head and a node start, two trial processes, a
# retry): twice what the suite can spend, so it runs on request; the benchmark's committed
# result is the evidence in between.
two_nodes = pytest.mark.skipif(
    os.environ.get("AUTOLR_MULTINODE_TEST") != "1",
    reason="a two-node cluster takes ~80 s; AUTOLR_MULTINODE_TEST=1 runs it",
)


class SecondNodeFirst(torch.nn.Module):
    """A tiny BatchNorm net, slow on the second node; elsewhere it waits for the second node.

    So the head's trial cannot end, and its process take the other trial too
    (Tune reuses actors), before the second node's process has started.
    """

    def __init__(self, marker: str) -> None:
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        self.marker = Path(marker)

    def forward(self, x):
        if os.environ.get("AUTOLR_SECOND_NODE"):
            self.marker.touch()
            time.sleep(SLOW_S)
        else:  # (bounded: should the second node never train, the test fails, not hangs)
            deadline = time.monotonic() + WAIT_S
            while not self.marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.marker.touch()
        return self.net(x)


@pytest.fixture
def cluster() -> Iterator[tuple]:
    """A head of 1 CPU, and a short folder for its nodes' temp dirs (Ray's socket paths)."""
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="autolr-mn-", dir="/tmp"))
    nodes = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": 1, "temp_dir": str(root / "n0"), "include_dashboard": False},
    )
    # The trials get the model by value: Ray's workers cannot import tests/.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield nodes, root
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()  # Cluster.shutdown refuses while this process is attached
        nodes.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def reports(folder: Path) -> int:
    """How many results the driver logged for the trial in ``folder``.

    Tune registers a reported checkpoint after the report; with the second
    report in, the first checkpoint surely is (killed sooner, a trial may
    rightly start over from epoch 1).
    """
    with contextlib.suppress(FileNotFoundError):
        return len((folder / "result.json").read_text().splitlines())
    return 0


def trial_folders(node) -> dict[str, str]:
    """trial id -> Tune's folder name, for the trials that ran on ``node`` (their working dirs)."""
    found = Path(node.get_session_dir_path()).glob("artifacts/*/*/working_dirs/*")
    return {m[1]: f.name for f in found if (m := TRIAL_ID.search(f.name))}


@pytest.mark.slow
@two_nodes
def test_a_trial_lost_with_its_node_resumes_on_the_head_from_its_checkpoint(tmp_path, cluster):
    cluster, root = cluster
    second = cluster.add_node(
        num_cpus=1, env_vars={"AUTOLR_SECOND_NODE": "1"}, temp_dir=str(root / "n1")
    )
    experiment = tmp_path / "ray_results" / "multinode"
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "multinode")
    parent = tracker.start_run("parent")
    killed: dict = {}

    def kill_once_checkpointed() -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            on_node = trial_folders(second)
            if any(reports(experiment / f) >= 2 for f in on_node.values()):
                raylet = second.all_processes["raylet"][0].process.pid
                for pid in descendants(raylet):  # its workers too: a lost machine loses them
                    os.kill(pid, signal.SIGKILL)
                cluster.remove_node(second, allow_graceful=False)
                killed.update(on_node)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_once_checkpointed, daemon=True)
    killer.start()
    result = search(
        Task(
            lambda: SecondNodeFirst(str(tmp_path / "second-node-trains")),
            blobs(),
            blobs(128, seed=1),
            batch_size=32,
            name="tiny",
        ),
        CHOICE,
        SearchConfig(num_samples=2, max_failures=2),
        SearchSite(
            tracking_uri=tracker.tracking_uri,
            experiment_id=tracker.experiment_id,
            parent_run_id=parent,
            storage_path=str(experiment.parent),
            name=experiment.name,
        ),
        TrialPlan(epochs=EPOCHS),
        progress=False,
    )
    killer.join(timeout=5)

    (trial_id, folder), *others = killed.items()
    assert not others  # one trial ran there, and it was lost with the node
    assert trial_id in trial_folders(cluster.head_node)  # retried on the head
    assert sorted((t.status, t.epochs_run) for t in result.trials) == [("TERMINATED", EPOCHS)] * 2
    # It went on from a checkpoint, not from epoch 1: from the last reported epoch's, or,
    # had the kill come between a report and Tune's registering its checkpoint, the one before.
    lines = [json.loads(line) for line in (experiment / folder / "result.json").open()]
    (restart,) = restarts(lines)
    assert 2 <= restart["first_epoch_after"] <= restart["last_epoch_before"] + 1
    assert lines[-1]["epoch"] == EPOCHS

    # One MLflow run per trial, none RUNNING, each epoch of the lost trial logged once.
    client = mlflow.MlflowClient(tracker.tracking_uri)
    runs = client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'"
    )
    assert sorted(r.data.tags[TRIAL_TAG] for r in runs) == sorted(t.trial_id for t in result.trials)
    assert {r.info.status for r in runs} == {"FINISHED"}
    (lost,) = [r for r in runs if r.data.tags[TRIAL_TAG] == trial_id]
    steps = sorted(m.step for m in client.get_metric_history(lost.info.run_id, "train_loss"))
    assert steps == list(range(1, EPOCHS + 1))


def test_a_run_ended_on_a_lost_host_is_resumable_and_a_running_one_there_is_left_alone(tmp_path):
    # A lost head pod: Kubernetes reruns the job in a new pod, another host. A run that
    # ended there (KILLED by SIGTERM before the eviction, or FAILED) is resumable; one
    # still RUNNING may have a live driver that no process here can see, so it is not.
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "autolr")
    here = f"{socket.gethostname()}:{2**22 + 1}:0"  # no such pid on this host: a dead driver
    cases = {  # (status, driver) -> in use: --resume leaves it alone
        ("KILLED", "lost-head-pod:4242:1000"): False,
        ("FAILED", "lost-head-pod:4242:1000"): False,
        ("RUNNING", "lost-head-pod:4242:1000"): True,
        ("FINISHED", "lost-head-pod:4242:1000"): True,
        ("RUNNING", here): False,
    }
    for status, driver in cases:
        run_id = tracker.start_run(status, tags={ROLE_TAG: "pipeline", DRIVER_TAG: driver})
        if status != "RUNNING":
            tracker.end_run(run_id, status)
    seen = {
        (r.status, r.tags[DRIVER_TAG]): _in_use(r)
        for r in tracker.find_runs({ROLE_TAG: "pipeline"})
    }
    assert seen == cases
