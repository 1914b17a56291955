import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from torch.utils.data import TensorDataset

from autolr import Task
from autolr.pipeline import main

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--set",
    "train.epochs=2",
    "--set",
    "range_test.num_iter=40",
    "--set",
    "search.enabled=false",
    "--no-progress",
]


def raising_builder() -> Task:
    raise RuntimeError("no data in /nowhere")


def tiny_task() -> Task:
    """A 2-class blob problem; importable as tests.test_pipeline:tiny_task."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    data = TensorDataset(x, y)
    return Task(
        model_fn=lambda: torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
        ),
        train_set=data,
        val_set=data,
        batch_size=32,
        epochs=2,
        name="tiny",
    )


def run_tiny(uri: str, *extra: str) -> int:
    """The CLI on `tiny_task` with tiny budgets and no search."""
    return main(["--task", "tests.test_pipeline:tiny_task", "--tracking-uri", uri, *TINY, *extra])


def test_the_cli_runs_a_user_task_end_to_end_and_logs_everything_to_mlflow(tmp_path):
    out = tmp_path / "new" / "folder" / "summary.json"  # made on the way
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    code = run_tiny(uri, "--output", str(out))
    assert code == 0
    summary = json.loads(out.read_text())
    for key in (
        "task",
        "max_lr",
        "min_lr",
        "confidence",
        "val_metric",
        "metric",
        "wall_seconds",
        "mlflow",
    ):
        assert key in summary
    assert 0 < summary["min_lr"] < summary["max_lr"]
    assert summary["metric"] == "accuracy" and summary["val_metric"] > 0.8
    assert summary["mlflow"]["tracking_uri"] == uri
    # without a search the configured values are the best, and there are no trials
    assert summary["best"]["weight_decay"] == 5e-4 and summary["trials"] == []

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["max_lr"]) == pytest.approx(summary["max_lr"])
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
    assert [m["epoch"] for m in summary["history"]] == [1, 2]
    assert summary["history"][-1]["val_metric"] == summary["val_metric"]
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "range_test")}
    assert artifacts == {"range_test/range_test.csv", "range_test/range_test.png"}
    csv = Path(
        client.download_artifacts(run.info.run_id, "range_test/range_test.csv", str(tmp_path))
    )
    header, *rows = csv.read_text().splitlines()
    assert header == "lr,loss,smoothed_loss" and len(rows) == summary["range_test"]["points"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--set", "train.epoch=3"], "unknown config key 'train.epoch'"),
        (["--task", "no_such_module:build"], "cannot import task module 'no_such_module'"),
        (["--task", "tests.test_pipeline:missing"], "has no callable 'missing'"),
        (["--task", "nonsense"], "nonsense"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
        (["--set", "train.schedule=bogus"], "schedule in"),
        (["--set", "selection.method=nope"], "method in"),
        (["--set", "range_test.num_iter=12"], "num_iter >= 20"),
        (["--set", "train.epochs=["], "not valid YAML"),
        (["--set", "search.storage_path=s3://bucket/x"], "URIs are not supported"),
        (["--task", "tests.test_pipeline:raising_builder"], "failed: RuntimeError: no data"),
        (
            ["--task", "tests.test_pipeline:tiny_task", "--set", "task_params={nope: 1}"],
            "rejected params ['nope']",
        ),
    ],
)
def test_a_user_error_is_one_line_on_stderr_and_a_non_zero_exit(argv, words, capsys, tmp_path):
    store = tmp_path / "s.db"
    code = main([*argv, "--tracking-uri", f"sqlite:///{store}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("autolr: error:") and words in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not store.exists()  # caught before any work, not after the range test


def test_a_task_module_that_fails_to_import_is_one_clear_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_task.py").write_text("raise RuntimeError('missing dependency')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--task", "broken_task:build"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "autolr: error: cannot import task module 'broken_task' (from 'broken_task:build'): "
        "RuntimeError: missing dependency"
    )


def test_an_unusable_curve_fails_the_run_but_keeps_the_curve_in_mlflow(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    # a sweep that ends far below any LR that moves the loss: a flat curve
    code = run_tiny(uri, "--set", "range_test.start_lr=1e-12", "--set", "range_test.end_lr=1e-10")
    assert code == 2
    assert "autolr: error:" in capsys.readouterr().err
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("autolr").experiment_id])
    assert run.info.status == "FAILED"
    assert {f.path for f in client.list_artifacts(run.info.run_id, "range_test")} == {
        "range_test/range_test.csv",
        "range_test/range_test.png",
    }


def test_python_dash_m_runs_the_committed_smoke_config(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "autolr.pipeline",
            "--config",
            str(ROOT / "pipelines/smoke.yaml"),
            "--set",
            "search.enabled=false",
            "--no-progress",
            "--output",
            "s.json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["task"] == "digits"
    # the default store: sqlite under ./mlruns of the working directory, absolute
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert "val_accuracy" in proc.stdout
