import multiprocessing
import multiprocessing.synchronize
import sys
import time
from pathlib import Path

import mlflow
import pytest

from autolr.errors import ConfigError
from autolr.tracking import FAIL_FAST_HTTP, PARENT_TAG, Tracker, resolve_tracking_uri


def test_default_uri_is_an_absolute_sqlite_database_under_mlruns(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(root=tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"


def test_environment_variable_is_used_when_no_uri_is_given(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("http://other:1") == "http://other:1"


def test_relative_sqlite_uris_and_bare_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path.resolve() / 'x.db'}"
    assert resolve_tracking_uri("store") == f"sqlite:///{tmp_path.resolve() / 'store/mlflow.db'}"


def test_runs_params_metrics_artifacts_and_status_land_in_a_real_store(tmp_path):
    uri = resolve_tracking_uri(root=tmp_path)
    tracker = Tracker(uri, "test")
    parent = tracker.start_run("parent")
    child = tracker.start_run("child", parent_run_id=parent)
    tracker.log_params(parent, {"max_lr": 0.5, "long": "x" * 7000})
    tracker.log_metrics(child, {"val_accuracy": 0.9}, step=2)
    (tmp_path / "a.csv").write_text("lr,loss\n0.1,1.0\n")
    tracker.log_artifact(parent, tmp_path / "a.csv", "range_test")
    tracker.end_run(child, "KILLED")
    tracker.end_run(parent)

    client = mlflow.MlflowClient(tracking_uri=uri)
    got_parent, got_child = client.get_run(parent), client.get_run(child)
    assert got_parent.data.params["max_lr"] == "0.5"
    assert got_parent.info.status == "FINISHED"
    assert got_child.info.status == "KILLED"
    assert got_child.data.tags[PARENT_TAG] == parent
    for run in (got_parent, got_child):  # the tags MLflow's own runs carry, for the UI
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"], run.data.tags
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
    history = client.get_metric_history(child, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(2, 0.9)]
    files = [f.path for f in client.list_artifacts(parent, "range_test")]
    assert files == ["range_test/a.csv"]
    # artifacts sit beside the database, not in the working directory
    assert (tmp_path / "mlruns" / "artifacts").is_dir()
    assert tracker.healthy


def test_an_unreachable_store_at_start_fails_fast_under_the_products_own_settings(monkeypatch):
    for key in FAIL_FAST_HTTP:  # the product's defaults, not the test's
        monkeypatch.delenv(key, raising=False)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the MLflow tracking store"):
        Tracker("http://127.0.0.1:9", "test")  # port 9 (discard) has no server
    # MLflow's own retries take ~247 s here; fail-fast ones take ~10 ms on a refused port.
    assert time.monotonic() - started < 60


def test_an_unwritable_sqlite_store_is_a_config_error_before_mlflow_retries_it():
    with pytest.raises(ConfigError, match="cannot write the MLflow store /proc/autolr/mlflow.db"):
        Tracker("sqlite:////proc/autolr/mlflow.db", "test")  # /proc: read-only, even for root


def _first_writer(uri: str, start: multiprocessing.synchronize.Event) -> None:
    start.wait()
    tracker = Tracker(uri, "race")
    tracker.end_run(tracker.start_run("r"))
    sys.exit(0 if tracker.healthy else 1)


def test_pipelines_starting_together_on_a_fresh_sqlite_store_all_get_it(tmp_path):
    # Unserialised, most first writers die on the schema ("table spans already exists").
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    context = multiprocessing.get_context("fork")  # mlflow is imported already: quick starts
    start = context.Event()
    writers = [context.Process(target=_first_writer, args=(uri, start)) for _ in range(4)]
    for writer in writers:
        writer.start()
    start.set()
    for writer in writers:
        writer.join(timeout=300)
    assert [writer.exitcode for writer in writers] == [0, 0, 0, 0]
    client = mlflow.MlflowClient(tracking_uri=uri)
    (experiment,) = client.search_experiments(filter_string="name = 'race'")
    assert len(client.search_runs([experiment.experiment_id])) == 4


def test_a_store_failing_mid_run_is_reported_once_and_then_skipped(tmp_path):
    tracker = Tracker(resolve_tracking_uri(root=tmp_path), "test")
    run_id = tracker.start_run("r")
    tracker.log_metrics("no-such-run", {"x": 1.0})  # the store rejects it
    assert not tracker.healthy and len(tracker.errors) == 1
    assert "log_metrics failed" in tracker.errors[0]
    tracker.log_metrics(run_id, {"x": 1.0})  # skipped, not retried
    assert len(tracker.errors) == 1
    assert Path(tracker.tracking_uri[len("sqlite:///") :]).exists()


def system_metric_keys(client: mlflow.MlflowClient, run_id: str) -> set[str]:
    return {key for key in client.get_run(run_id).data.metrics if key.startswith("system/")}


def test_a_run_gets_mlflow_system_metrics_while_the_block_runs_and_none_without_psutil(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # MLflow's: 10 s
    uri = resolve_tracking_uri(root=tmp_path)
    tracker = Tracker(uri, "test")
    client = mlflow.MlflowClient(tracking_uri=uri)
    with_psutil, without = tracker.start_run("with psutil"), tracker.start_run("without")
    with tracker.system_metrics(with_psutil):
        deadline = time.monotonic() + 30  # a wait for the first sample, not a speed check
        while not system_metric_keys(client, with_psutil) and time.monotonic() < deadline:
            time.sleep(0.1)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
        with tracker.system_metrics(without):
            time.sleep(0.5)  # five sampling intervals
    keys = system_metric_keys(client, with_psutil)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    assert system_metric_keys(client, without) == set()
    assert tracker.healthy


def test_a_run_shorter_than_one_sampling_interval_still_gets_its_system_metrics(tmp_path):
    """MLflow logs whole intervals only (10 s here); the block's end logs the rest."""
    uri = resolve_tracking_uri(root=tmp_path)
    tracker = Tracker(uri, "test")
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = tracker.start_run("short")
    with tracker.system_metrics(run_id):
        pass
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in history] == [0]
    assert "system/system_memory_usage_megabytes" in system_metric_keys(client, run_id)
