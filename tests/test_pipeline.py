import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from autolr import Task, pipeline, range_test
from autolr.pipeline import MODEL_ARTIFACT, main
from autolr.tasks import build_task, resolve
from autolr.training import evaluate_weights

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


class SignalsItself(torch.nn.Module):
    """The tiny MLP, which sends its own process a signal: SIGINT (Ctrl-C) on its 5th forward
    pass, in the range test; SIGTERM on its first one without gradients, the final run's first
    validation.
    """

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
        )
        self.signum, self.calls = signum, 0

    def forward(self, x):
        self.calls += 1
        if self.signum == signal.SIGINT and self.calls == 5:
            os.kill(os.getpid(), signal.SIGINT)
        if self.signum == signal.SIGTERM and not torch.is_grad_enabled():
            os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)


def interrupted_task() -> Task:
    """`tiny_task`, Ctrl-C in its range test; tests.test_pipeline:interrupted_task."""
    return dataclasses.replace(tiny_task(), model_fn=lambda: SignalsItself(signal.SIGINT))


def terminated_task() -> Task:
    """`tiny_task`, SIGTERM in its final run; tests.test_pipeline:terminated_task."""
    return dataclasses.replace(tiny_task(), model_fn=lambda: SignalsItself(signal.SIGTERM))


def regression_task() -> Task:
    """A noisy linear map learned with MSE, metric "loss" (lower is better).

    Importable as tests.test_pipeline:regression_task; everything Ray's workers
    need is in lambdas and torch objects, which they unpickle without tests/.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(384, 1, generator=g)
    return Task(
        model_fn=lambda: torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
        ),
        train_set=TensorDataset(x[:256], y[:256]),
        val_set=TensorDataset(x[256:], y[256:]),
        loss_fn=torch.nn.MSELoss(),
        metric="loss",
        batch_size=32,
        epochs=2,
        name="regression",
    )


def run_tiny(uri: str, *extra: str) -> int:
    """The CLI on `tiny_task` with tiny budgets and no search."""
    return main(["--task", "tests.test_pipeline:tiny_task", "--tracking-uri", uri, *TINY, *extra])


def test_the_cli_runs_a_user_task_end_to_end_and_logs_everything_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # MLflow's: 10 s
    out = tmp_path / "new" / "folder" / "summary.json"  # made on the way
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    returned, real_run = [], pipeline.run  # what run() gave main: the file must render it

    def keep(*args, **kwargs):
        returned.append(real_run(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr("autolr.pipeline.cli.run", keep)  # what main calls
    code = run_tiny(uri, "--output", str(out))
    assert code == 0
    summary = json.loads(out.read_text())
    assert out.read_text() == json.dumps(returned[0].to_dict(), indent=2) + "\n"
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
    assert summary["test_metric"] is None  # a user's task without a test split

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["max_lr"]) == pytest.approx(summary["max_lr"])
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
    assert "system/cpu_utilization_percentage" in run.data.metrics  # MLflow's, psutil's
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
        (
            ["--task", "tests.test_pipeline:tiny_task", "--set", "search.storage_path=no://b/x"],
            "'no://b/x': no filesystem handles it",
        ),
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
    assert "val_accuracy" in proc.stdout and "test_accuracy" in proc.stdout
    # The final model is logged: loaded into a fresh model of the task, it scores what
    # the summary reports, on validation and on the test split scored once at the end.
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow"]["tracking_uri"])
    run_id = summary["mlflow"]["run_id"]
    assert 0.2 < summary["test_metric"] <= 1.0
    assert client.get_run(run_id).data.metrics["test_accuracy"] == summary["test_metric"]
    weights = torch.load(
        client.download_artifacts(run_id, MODEL_ARTIFACT, str(tmp_path)), weights_only=True
    )
    task = build_task(resolve("digits"), epochs=2)  # the smoke config's task
    assert evaluate_weights(task, weights, task.val_set) == pytest.approx(
        (summary["val_loss"], summary["val_metric"]), rel=1e-6
    )
    assert evaluate_weights(task, weights, task.test_set)[1] == pytest.approx(
        summary["test_metric"], rel=1e-6
    )


@pytest.mark.slow
def test_a_loss_task_searches_the_lr_scale_and_keeps_the_trial_with_the_lowest_val_loss(
    ray_cluster, tmp_path, capsys
):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "summary.json"
    code = main(
        [
            *("--task", "tests.test_pipeline:regression_task", "--tracking-uri", uri),
            *("--output", str(out), "--no-progress"),
            *("--set", "range_test.num_iter=40", "--set", "range_test.repeats=1"),
            *("--set", "train.epochs=2", "--set", "search.epochs=2"),
            *("--set", f"search.storage_path={tmp_path / 'ray'}"),
            # A grid over the two factors, the far too low one first, one trial at a time:
            # ASHA in "min" mode lets the better second trial go on; in "max" mode it
            # would stop it at epoch 1.
            *("--set", "search.lr_scales=[0.01, 1]", "--set", "search.grid=true"),
            *("--set", "search.num_samples=1", "--set", "search.max_concurrent=1"),
        ]
    )
    # The final training's progress bar once crashed on metric "loss", also when hidden.
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads(out.read_text())
    trials, best, curve = summary["trials"], summary["best"], summary["curve_pick"]
    assert summary["metric"] == "loss" and summary["val_metric"] == summary["val_loss"]
    assert [(t["lr_scale"], t["status"]) for t in trials] == [
        (0.01, "TERMINATED"),
        (1.0, "TERMINATED"),
    ]
    assert best["trial_id"] == min(trials, key=lambda t: t["val_metric"])["trial_id"]
    assert best["lr_scale"] == 1.0 and best["val_metric"] < trials[0]["val_metric"]
    # the final run trained with the best trial's range; the curve's pick is kept beside it
    assert (summary["max_lr"], summary["min_lr"]) == (best["max_lr"], best["min_lr"])
    assert (curve["max_lr"], curve["confidence"]) == (
        pytest.approx(best["max_lr"]),
        summary["confidence"],
    )
    printed = capsys.readouterr().out
    assert "curve pick  max_lr=" in printed and "lr_scale=1" in printed
    # FIFO at the final budget: the best trial trained the final configuration, so its
    # checkpoint is the final model, evaluated and not trained again
    assert summary["final_model"]["reused_trial"] == best["trial_id"]
    assert f"trial {best['trial_id']}'s checkpoint, evaluated, not trained again" in printed
    assert summary["val_metric"] == best["val_metric"]
    assert [m["epoch"] for m in summary["history"]] == [1, 2]

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    parent = run.data.params
    assert float(parent["curve_max_lr"]) == curve["max_lr"]
    assert float(parent["max_lr"]) == summary["max_lr"]
    assert float(parent["best_lr_scale"]) == 1.0
    # the parent's top-level params are the final model's, under the trials' names
    assert (
        float(parent["weight_decay"]) == best["weight_decay"] != float(parent["train.weight_decay"])
    )
    assert (parent["epochs"], parent["schedule"], parent["lr_scale"]) == ("2", "onecycle", "1.0")
    assert run.data.tags["autolr.final_model"] == best["trial_id"]
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    weights = torch.load(
        client.download_artifacts(run.info.run_id, MODEL_ARTIFACT, str(tmp_path)),
        weights_only=True,
    )
    task = regression_task()
    assert evaluate_weights(task, weights, task.val_set)[1] == pytest.approx(
        summary["val_metric"], rel=1e-6
    )
    for trial in trials:
        params = client.get_run(trial["run_id"]).data.params
        assert float(params["lr_scale"]) == trial["lr_scale"]
        assert float(params["max_lr"]) == trial["max_lr"]
        assert trial["max_lr"] == pytest.approx(curve["max_lr"] * trial["lr_scale"])


@pytest.mark.parametrize(
    "cwd, argv, words",
    [
        (None, ["--output", "{tmp}/a_file/summary.json"], "--output's folder {tmp}/a_file"),
        (None, ["--output", "/proc/summary.json"], "--output's folder /proc is not writable"),
        # a read-only working directory: the default store and Tune folder live there
        ("/proc", ["--tracking-uri", ""], "cannot write the MLflow store /proc/mlruns/mlflow.db"),
        ("/proc", ["--set", "search.enabled=true"], "(search.storage_path) /proc/ray_results"),
    ],
)
def test_an_unwritable_output_store_or_working_directory_fails_first_in_one_line(
    cwd, argv, words, tmp_path, monkeypatch, capsys
):
    (tmp_path / "a_file").write_text("a file, not a folder")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if cwd:
        monkeypatch.chdir(cwd)
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    store = tmp_path / "store.db"
    code = run_tiny(f"sqlite:///{store}", *argv)  # a later --tracking-uri "" picks the default
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("autolr: error:"), err
    assert words.format(tmp=tmp_path) in err[-1]
    assert not store.exists()  # before any work


def test_a_deleted_experiment_is_one_line_not_a_run_with_nothing_logged(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("autolr"))
    assert run_tiny(uri) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "experiment 'autolr' (id 1) in" in err[-1] and "is deleted" in err[-1]
    assert "mlflow experiments restore --experiment-id 1" in err[-1]


@pytest.mark.parametrize(
    "builder, name, code",
    [("interrupted_task", "SIGINT", 130), ("terminated_task", "SIGTERM", 143)],
)
def test_sigint_in_the_range_test_or_sigterm_in_the_final_run_ends_the_run_as_killed(
    builder, name, code, tmp_path, capsys
):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["--task", f"tests.test_pipeline:{builder}", "--tracking-uri", uri, *TINY]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"autolr: stopped by {name}")
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("autolr").experiment_id])
    assert run.info.status == "KILLED"
    # the final run had started: its max_lr is logged when it starts
    assert ("max_lr" in run.data.params) == (name == "SIGTERM")


def test_a_signal_resend_left_from_an_earlier_run_never_reaches_the_next(monkeypatch):
    from autolr.pipeline import Interrupted, _SignalStop

    monkeypatch.setattr(_SignalStop, "RESEND_S", 0.05)
    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda hook: crashed.append(hook.exc_value))
    stop = _SignalStop()
    with stop.installed(), pytest.raises(Interrupted):
        stop(signal.SIGINT, None)  # its resend thread now sleeps, and the run ends untaken
    with stop.installed():  # the next run in this process, at once
        time.sleep(0.3)  # several resend periods: the old thread must not act in this one
    assert crashed == []


def test_a_bad_argument_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    from autolr import ArgumentError, AutoLRError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArgumentError) as bad:
        range_test(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters()), F.mse_loss, [])
    assert isinstance(bad.value, AutoLRError) and isinstance(bad.value, ValueError)
    # at the CLI an AutoLRError is one line and exit 2; a plain ValueError is not ours
    assert main(["--task", "tests.test_pipeline:no_such_builder", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0

    def bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")  # numpy's words, say

    monkeypatch.setattr("autolr.pipeline.cli.run", bug)  # what main calls
    with pytest.raises(ValueError, match="broadcast"):  # not swallowed into one line
        main(["--task", "tests.test_pipeline:tiny_task", "--no-progress"])


def test_the_final_model_is_the_best_trials_checkpoint_only_if_it_trained_the_same_to_the_end(
    tmp_path,
):
    from autolr.pipeline import _best_trial_state
    from autolr.results import SearchResult, TrialSummary
    from autolr.search.trial import CHECKPOINT_FILE
    from autolr.training import train

    task = tiny_task()
    setup = {
        "max_lr": 0.1,
        "min_lr": 0.004,
        "epochs": 2,
        "weight_decay": 1e-4,
        "bn_momentum": None,
        "schedule": "onecycle",
        "seed": 0,
        "accumulation_steps": 1,
    }
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()

    def save(metrics, state) -> None:  # what a trial's checkpoint holds (search/trial.py)
        torch.save({"train": state(), "lrs": {}}, folder / CHECKPOINT_FILE)

    trained = train(task, **setup, on_epoch=save, progress=False)
    trial = TrialSummary(
        trial_id="t1",
        weight_decay=1e-4,
        bn_momentum=None,
        max_lr=0.1,
        min_lr=0.004,
        val_metric=trained.val_metric,
        epochs_run=2,
        status="TERMINATED",
        run_id=None,
        checkpoint=str(folder),
    )

    def found(**changes) -> SearchResult:
        return SearchResult(
            weight_decay=1e-4,
            bn_momentum=None,
            val_metric=trained.val_metric,
            metric="accuracy",
            higher_is_better=True,
            max_lr=0.1,
            min_lr=0.004,
            best_trial_id="t1",
            trials=(dataclasses.replace(trial, **changes),),
            bn_searched=False,
        )

    state, why = _best_trial_state(task, found(), setup, threads=None)
    assert why == "the best trial trained this configuration for the full budget"
    assert state["epoch"] == 2 and state["history"][-1]["val_metric"] == trained.val_metric

    def reason(found_, setup_=setup) -> str:
        state, why = _best_trial_state(task, found_, setup_, threads=None)
        assert state is None
        return why

    assert reason(found(epochs_run=1)) == "the best trial trained 1 epochs, the final run 2"
    assert reason(None) == "no search ran"
    assert "(trial, final) = {'weight_decay': (0.0001, 0.001)}" in reason(
        found(), {**setup, "weight_decay": 1e-3}
    )
    assert reason(found(checkpoint=None)) == "the best trial left no checkpoint"
    saved = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    saved["train"]["history"][-1]["val_loss"] += 0.5  # weights that don't score what it says
    torch.save(saved, folder / CHECKPOINT_FILE)
    assert "checkpoint scores val_loss=" in reason(found())
    (folder / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    assert "is unreadable: " in reason(found())
