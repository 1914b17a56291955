"""The search and MLflow's artifacts on object storage: a real S3 API on 127.0.0.1.

moto's server (``python -m moto.server``) is started once for the module, as
the leader of its own process group, and stopped by that group at the end. It
accepts any credentials and does not check them; the AWS variables point
pyarrow (Tune's storage), boto3 (MLflow's artifacts) and this test at it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import mlflow
import pytest
from services import moto_server, stop_group, tail
from test_mlflow_server import start_server
from test_pipeline_resume import DRIVER, SLOW_TASK, TESTS
from test_search import (
    CHOICE,
    EPOCH_METRICS,
    STEPS_PER_EPOCH,
    DieOnceLoss,
    child_runs,
    logged_steps,
    tiny_task,
)

from autolr.config import SearchConfig, load_config
from autolr.errors import ConfigError
from autolr.pipeline import main
from autolr.search import TRIAL_TAG, SearchSite, TrialPlan, check_storage, search
from autolr.tracking import PARENT_TAG, Tracker

BUCKET = "autolr-test"
MOTO_START_S = 60  # about 2 s on an idle 2-core machine
CREDENTIALS = {  # moto takes any; real ones would come from the environment the same way
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 on a free port with one bucket; the environment points pyarrow and boto3 at it.

    Yields a boto3 client. Set before the module's Ray starts (see ``ray_cluster``),
    so that the trial processes inherit the endpoint and credentials.
    """
    with (
        moto_server(tmp_path_factory.mktemp("moto"), MOTO_START_S) as url,
        pytest.MonkeyPatch.context() as env,
    ):
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": url}.items():
            env.setenv(key, value)
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture(scope="module")
def ray_cluster(s3, ray_cluster):
    """conftest's Ray, started only once the S3 environment is set: its workers inherit it."""
    return ray_cluster


@pytest.fixture
def store(tmp_path):
    """A sqlite MLflow store with a parent run, as the pipeline creates it before the search."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "storage-test")
    return tracker, tracker.start_run("parent")


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_the_config_takes_a_storage_uri_and_refuses_one_without_a_location():
    cfg = load_config(overrides=["search.storage_path=s3://bucket/prefix"])
    assert cfg.search.storage_path == "s3://bucket/prefix"
    with pytest.raises(ConfigError, match="storage_path a folder, or a URI.*but got 's3://'"):
        load_config(overrides=["search.storage_path=s3://"])


def test_a_storage_uri_whose_scheme_no_filesystem_handles_fails_in_one_line():
    with pytest.raises(ConfigError) as caught:
        check_storage("nosuch://bucket/prefix")
    message = str(caught.value)
    assert "'nosuch://bucket/prefix': no filesystem handles it" in message
    assert "expected a local folder or a URI that pyarrow reads: s3://" in message
    assert "\n" not in message


def test_a_bucket_that_does_not_exist_fails_before_the_search_in_one_line(s3):
    with pytest.raises(ConfigError) as caught:
        check_storage("s3://no-such-bucket/prefix")
    message = str(caught.value)
    assert "'s3://no-such-bucket/prefix' is not writable" in message
    assert "does not exist" in message and "\n" not in message
    assert "credentials" in message and "no AWS credentials" not in message  # they are set


def test_missing_aws_credentials_are_named_when_the_store_refuses(s3, monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    for key in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="not writable: .*; no AWS credentials are set"):
        check_storage("s3://no-such-bucket/prefix")


def test_the_pipeline_stops_on_a_missing_bucket_in_one_line_before_any_work(
    s3, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    argv = ["--task", "tests.test_pipeline:tiny_task", "--no-progress"]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    code = main([*argv, "--set", "search.storage_path=s3://no-such-bucket/autolr"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "'s3://no-such-bucket/autolr' is not writable" in line
    assert not (tmp_path / "mlflow.db").exists()  # stopped before the store and the range test


def test_a_writable_bucket_passes_the_check_and_keeps_no_marker(s3):
    assert check_storage(f"s3://{BUCKET}/checked") == f"s3://{BUCKET}/checked"
    # pyarrow leaves the empty "checked/" folder object that deleting its last file leaves
    assert keys(s3, "checked") == ["checked/"]


@pytest.mark.slow
def test_a_killed_trial_is_retried_from_its_checkpoint_in_s3(ray_cluster, s3, store, tmp_path):
    tracker, parent = store
    marker, steps_log = tmp_path / "killed", tmp_path / "steps.log"
    name = f"retry-{parent[:8]}"
    result = search(
        tiny_task(loss_fn=DieOnceLoss(marker, steps_log)),
        CHOICE,
        SearchConfig(num_samples=1, max_failures=2),
        SearchSite(
            tracking_uri=tracker.tracking_uri,
            experiment_id=tracker.experiment_id,
            parent_run_id=parent,
            storage_path=f"s3://{BUCKET}/retry",
            name=name,
        ),
        TrialPlan(epochs=3),
        progress=False,
    )

    assert marker.exists()  # the first attempt really died
    (trial,) = result.trials
    assert (trial.status, trial.epochs_run) == ("TERMINATED", 3)
    assert result.experiment_path == f"s3://{BUCKET}/retry/{name}"
    pids = steps_log.read_text().split()
    first, retry = pids[: STEPS_PER_EPOCH + 1], pids[STEPS_PER_EPOCH + 1 :]
    assert len(set(first)) == 1 and set(retry).isdisjoint(first)
    assert len(retry) == 2 * STEPS_PER_EPOCH  # epochs 2 and 3 only: resumed from S3
    stored = keys(s3, f"retry/{name}/")
    assert any("/checkpoint_" in key and key.endswith("/trial.pt") for key in stored)
    assert any(key.rsplit("/", 1)[-1].startswith("experiment_state-") for key in stored)
    (run,) = child_runs(store)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert logged_steps(store, trial.run_id, key) == [1, 2, 3]


def saved_and_checkpointed(stored: list[str]) -> bool:
    """Whether Tune saved its experiment state and some trial a checkpoint."""
    return any("/experiment_state-" in key for key in stored) and any(
        "/checkpoint_" in key for key in stored
    )


@pytest.mark.slow
def test_a_pipeline_on_s3_killed_mid_search_resumes_and_its_artifacts_land_in_s3(
    ray_cluster, s3, tmp_path
):
    (tmp_path / "slow_task.py").write_text(SLOW_TASK)
    (tmp_path / "driver.py").write_text(DRIVER.format(tests=str(TESTS), here=str(tmp_path)))
    # MLflow's S3 artifact store takes its endpoint from MLFLOW_S3_ENDPOINT_URL.
    server, uri = start_server(
        tmp_path, f"s3://{BUCKET}/mlflow", MLFLOW_S3_ENDPOINT_URL=s3.meta.endpoint_url
    )
    try:
        argv = [
            *(sys.executable, str(tmp_path / "driver.py"), "--task", "slow_task:build"),
            *("--tracking-uri", uri, "--ray-address", ray_cluster, "--no-progress"),
            *("--set", "range_test.num_iter=40", "--set", "range_test.repeats=1"),
            *("--set", "train.epochs=2", "--set", "search.num_samples=2"),
            *("--set", f"search.storage_path=s3://{BUCKET}/pipeline"),
            *("--output", str(tmp_path / "summary.json")),
        ]
        log = tmp_path / "first.log"
        with open(log, "w") as out:  # it inherits the S3 endpoint and credentials
            first = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:  # kill the driver once Tune has saved its state and a trial its first checkpoint
            deadline = time.monotonic() + 240
            while not saved_and_checkpointed(keys(s3, "pipeline/")):
                assert first.poll() is None, tail(log)
                assert time.monotonic() < deadline, f"no checkpoint in S3 in 240 s:\n{tail(log)}"
                time.sleep(0.2)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert not list(tmp_path.glob("s3*")) and not (tmp_path / "ray_results").exists()

        second = subprocess.run(
            [*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 0, second.stderr[-3000:]

        summary = json.loads((tmp_path / "summary.json").read_text())
        assert "resumed the search" in " ".join(summary["search"]["notes"])
        assert summary["search"]["experiment_path"].startswith(f"s3://{BUCKET}/pipeline/")
        assert "range_test" not in summary["stage_seconds"]  # the resumed run reused its curve
        # the final model is the best trial's checkpoint, read back from the bucket
        best = next(t for t in summary["trials"] if t["trial_id"] == summary["best"]["trial_id"])
        assert summary["final_model"]["reused_trial"] == best["trial_id"]
        assert best["checkpoint"].startswith(f"s3://{BUCKET}/pipeline/")
        client = mlflow.MlflowClient(uri)
        run_id = summary["mlflow"]["run_id"]
        assert client.get_run(run_id).info.status == "FINISHED"
        children = client.search_runs(
            [client.get_run(run_id).info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'",
        )
        trial_ids = sorted(run.data.tags[TRIAL_TAG] for run in children)
        assert trial_ids == sorted(t["trial_id"] for t in summary["trials"])  # none duplicated
        assert all(run.info.status in ("FINISHED", "KILLED") for run in children)

        # The range test's (logged before the kill) and the final run's artifacts are
        # objects in the bucket, and read back through the MLflow client.
        stored = keys(s3, "mlflow/")
        for artifact in (
            "range_test/range_test.csv",
            "range_test/range_test.png",
            "training/training.png",
        ):
            assert any(key.endswith(f"/{run_id}/artifacts/{artifact}") for key in stored)
            local = Path(client.download_artifacts(run_id, artifact, str(tmp_path)))
            assert local.stat().st_size > 0
            if artifact.endswith(".csv"):
                assert local.read_text().splitlines()[0] == "lr,loss,smoothed_loss"
    finally:
        stop_group(server)
