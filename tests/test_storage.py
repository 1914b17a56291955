"""The search and MLflow's artifacts on object storage: a real S3 API on 127.0.0.1.

moto's server (``python -m moto.server``) is started once for the module, as
the leader of its own process group, and stopped by that group at the end. It
accepts any credentials and does not check them; the AWS variables point
pyarrow (Tune's storage), boto3 (MLflow's artifacts) and this test at it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from services import answers, clean_env, free_port, start_group, stop_group, tail, wait_until
from test_search import (
    CHOICE,
    EPOCH_METRICS,
    RESUMABLE,
    STEPS_PER_EPOCH,
    DieOnceLoss,
    SlowNet,
    child_runs,
    logged_steps,
    tiny_task,
)

from autolr.config import SearchConfig, load_config
from autolr.errors import ConfigError
from autolr.search import TRIAL_TAG, check_storage, search
from autolr.tracking import Tracker

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
    folder = tmp_path_factory.mktemp("moto")
    port, log = free_port(), folder / "moto.log"
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = start_group(command, log, cwd=folder, env=clean_env())
    try:
        wait_until(lambda: answers(f"{url}/moto-api/"), proc, log, MOTO_START_S)
        with pytest.MonkeyPatch.context() as env:
            for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": url}.items():
                env.setenv(key, value)
            client = boto3.client("s3", endpoint_url=url)
            client.create_bucket(Bucket=BUCKET)
            yield client
    finally:
        stop_group(proc)


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
        epochs=3,
        tracking_uri=tracker.tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=parent,
        storage_path=f"s3://{BUCKET}/retry",
        name=name,
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
def test_a_search_in_s3_whose_driver_was_killed_resumes_with_no_duplicate_or_running_runs(
    ray_cluster, s3, store, tmp_path
):
    tracker, parent = store
    storage = f"s3://{BUCKET}/resume-{parent[:8]}"
    script = RESUMABLE.format(
        tests=str(Path(__file__).parent),
        uri=tracker.tracking_uri,
        experiment=tracker.experiment_id,
        parent=parent,
        storage=storage,
        address=ray_cluster,
    )
    log = tmp_path / "driver.log"
    with open(log, "w") as out:  # it inherits the S3 endpoint and credentials
        driver = subprocess.Popen(
            [sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:  # kill the driver once Tune has saved its state and a trial its first checkpoint
        deadline = time.monotonic() + 240
        prefix = f"resume-{parent[:8]}/resumable/"
        while not saved_and_checkpointed(keys(s3, prefix)):
            assert time.monotonic() < deadline, f"no trial checkpointed in 240 s:\n{tail(log)}"
            time.sleep(0.2)
        assert driver.poll() is None, tail(log)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = child_runs(store)
    assert before and all(r.info.status == "RUNNING" for r in before)  # nobody closed them

    result = search(
        tiny_task(SlowNet),
        CHOICE,
        SearchConfig(num_samples=4, reduction_factor=2),
        epochs=3,
        tracking_uri=tracker.tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=parent,
        storage_path=storage,
        name="resumable",
        resume=True,
        progress=False,
    )

    assert any("resumed" in note for note in result.notes)
    assert len(result.trials) == 4
    assert all(t.status in ("TERMINATED", "STOPPED") for t in result.trials)
    runs = child_runs(store)
    assert sorted(r.data.tags[TRIAL_TAG] for r in runs) == sorted(t.trial_id for t in result.trials)
    assert {r.info.run_id for r in before} <= {t.run_id for t in result.trials}  # reused
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    for trial in result.trials:
        assert logged_steps(store, trial.run_id, "val_loss") == list(range(1, trial.epochs_run + 1))
