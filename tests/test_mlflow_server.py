"""The pipeline against a real ``mlflow server``: runs and artifacts land through
HTTP, and a server that dies mid-run costs the tracking, never the run.

Each server is a child process in its own process group, stopped by that group
only. A server takes about 16 s to start on 2 cores; the pipeline runs the
committed smoke config (range test, 2 trials of 2 epochs, final training).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from services import answers, clean_env, free_port, start_group, stop_group, tail, wait_until

from autolr.tracking import PARENT_TAG

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "pipelines" / "smoke.yaml"
SERVER_START_S = 120  # about 16 s on an idle 2-core machine; generous for a busy one
PIPELINE_S = 300  # the smoke pipeline takes about 60 s
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr")

pytestmark = pytest.mark.slow


def start_server(
    folder: Path, artifacts: str | None = None, **env: str
) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on a free port, sqlite backend, artifacts proxied by the server.

    ``artifacts``: where it keeps them (default: ``folder/artifacts``), e.g. an
    ``s3://`` URI; ``env``: more of its environment.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"),
        # Clients upload artifacts through the server (mlflow-artifacts:/), which keeps them here.
        *("--serve-artifacts", "--artifacts-destination", artifacts or str(folder / "artifacts")),
    ]
    # Its job runner would start 7 worker processes that nothing here uses.
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **env)
    proc = start_group(command, log, cwd=folder, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{url}/health"), proc, log, SERVER_START_S)
    except BaseException:
        stop_group(proc)
        raise
    return proc, url


def start_pipeline(folder: Path, tracking_uri: str) -> tuple[subprocess.Popen, Path, Path]:
    """``python -m autolr.pipeline`` on the smoke config; returns it, its summary and its log."""
    folder.mkdir(parents=True, exist_ok=True)
    summary, log = folder / "summary.json", folder / "pipeline.log"
    command = [
        *(sys.executable, "-m", "autolr.pipeline", "--config", str(SMOKE), "--no-progress"),
        *("--tracking-uri", tracking_uri, "--output", str(summary)),
    ]
    # In the folder, so that its ray_results/ go there.
    return start_group(command, log, cwd=folder, env=clean_env()), summary, log


def finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for the pipeline, and stop its process group; its output."""
    try:
        proc.wait(timeout=PIPELINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the pipeline did not finish in {PIPELINE_S} s:\n{tail(log)}")
    finally:
        stop_group(proc)  # also whatever it left behind
    return log.read_text()


def child_runs(client: mlflow.MlflowClient, parent_run_id: str | None = None) -> list:
    experiment = client.get_experiment_by_name("autolr")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id])
    return [
        r
        for r in runs
        if PARENT_TAG in r.data.tags
        and (parent_run_id is None or r.data.tags[PARENT_TAG] == parent_run_id)
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    proc, url = start_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    stop_group(proc)


def test_the_pipeline_logs_its_run_trials_and_artifacts_through_a_tracking_server(server, tmp_path):
    proc, summary_path, log = start_pipeline(tmp_path, server)
    finish(proc, log)
    assert proc.returncode == 0, tail(log)
    summary = json.loads(summary_path.read_text())
    assert summary["mlflow"] == {
        "tracking_uri": server,
        "run_id": summary["mlflow"]["run_id"],
        "errors": [],
    }

    client = mlflow.MlflowClient(tracking_uri=server)
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
    assert float(parent.data.params["max_lr"]) == pytest.approx(summary["max_lr"])
    assert float(parent.data.params["best_weight_decay"]) == pytest.approx(
        summary["best"]["weight_decay"]
    )
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "val_accuracy")] == [1, 2]
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "range_test")} == {
        "range_test/range_test.csv",
        "range_test/range_test.png",
    }
    csv = Path(
        client.download_artifacts(parent.info.run_id, "range_test/range_test.csv", str(tmp_path))
    )
    assert csv.read_text().splitlines()[0] == "lr,loss,smoothed_loss"
    # the curve is also a pair of metric series over its points, for the UI's charts
    losses = [float(row.split(",")[1]) for row in csv.read_text().splitlines()[1:]]
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "range_test_loss")
    )
    finite = [(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    assert [step for step, _ in history] == [i for i, _ in finite]
    assert [v for _, v in history] == pytest.approx([v for _, v in finite], rel=1e-5)
    steps = [m.step for m in client.get_metric_history(parent.info.run_id, "range_test_lr")]
    assert sorted(steps) == list(range(len(losses)))

    children = child_runs(client, parent.info.run_id)
    assert len(children) == len(summary["trials"]) == 2
    assert {c.info.run_id for c in children} == {t["run_id"] for t in summary["trials"]}
    for child in children:
        assert child.info.status == "FINISHED"  # also when ASHA stopped it early (a tag says so)
        params = child.data.params
        assert {"weight_decay", "bn_momentum", "max_lr", "min_lr", "lr_scale"} <= params.keys()
        assert float(params["max_lr"]) == pytest.approx(
            summary["curve_pick"]["max_lr"] * float(params["lr_scale"])
        )
        epochs_run = int(child.data.tags["autolr.epochs_run"])
        assert epochs_run >= 1
        for key in EPOCH_METRICS:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs_run + 1)), key


def test_a_tracking_server_that_dies_mid_run_costs_the_tracking_not_the_run(tmp_path):
    server_proc, url = start_server(tmp_path / "server")
    try:
        proc, summary_path, log = start_pipeline(tmp_path / "run", url)
        client = mlflow.MlflowClient(tracking_uri=url)
        # Kill the server once the search is under way: a trial has opened its child run.
        wait_until(lambda: bool(child_runs(client)), proc, log, PIPELINE_S)
        killed_at = time.monotonic()
        stop_group(server_proc)
        output = finish(proc, log)
        after_kill_s = time.monotonic() - killed_at
    finally:
        stop_group(server_proc)

    assert proc.returncode == 0, tail(log)
    summary = json.loads(summary_path.read_text())
    assert summary["val_metric"] > 0.5 and len(summary["trials"]) == 2
    errors = summary["mlflow"]["errors"]
    assert errors and all("MLflow" in e for e in errors)
    assert any(line.startswith("warning") and "MLflow" in line for line in output.splitlines())
    # MLflow's default HTTP retries would hold each call for minutes; the rest of the
    # pipeline (the rest of the search, the final training) takes well under one.
    assert after_kill_s < 120, f"{after_kill_s=:.0f}\n{tail(log)}"
