"""The Ray Tune search against a real local Ray and a real sqlite MLflow store.

Budgets are tiny (a few hundred random points, 1-3 epochs, 1-4 trials); one
Ray instance serves the whole module because starting one takes 4-9 s.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch
import torch.nn.functional as F
from ray.tune.search.variant_generator import generate_variants
from test_training import onecycle_lrs
from torch import nn
from torch.utils.data import TensorDataset

from autolr.config import RangeTestConfig, SearchConfig
from autolr.errors import AutoLRError
from autolr.results import LRChoice
from autolr.search import (
    TRIAL_TAG,
    SearchSite,
    TrialPlan,
    bn_momentum_floor,
    num_trials,
    param_space,
    scale_points,
    search,
    trial_resources,
)
from autolr.tasks.base import Task
from autolr.tracking import PARENT_TAG, Tracker

# Ray workers cannot import this file (tests/ is not on their path): ship its
# functions and classes by value instead.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHOICE = LRChoice(max_lr=0.3, min_lr=0.01, confidence=1.0, method="fixed", reason="test")
STEPS_PER_EPOCH = 8  # 256 points / 32 per batch
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr")


def blobs(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def plain_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


class SlowNet(nn.Module):
    """bn_net that sleeps in each forward pass, so a search lasts long enough to interrupt."""

    def __init__(self) -> None:
        super().__init__()
        self.net = bn_net()

    def forward(self, x):
        time.sleep(0.03)
        return self.net(x)


class DieOnceLoss:
    """Cross-entropy that SIGKILLs its own process in epoch 2, on the first attempt only.

    The marker file remembers the kill across processes; ``steps_log`` gets the
    pid of every training step, so the test can see where the retry started.
    """

    def __init__(self, marker: Path, steps_log: Path) -> None:
        self.marker, self.steps_log, self.steps = marker, steps_log, 0

    def __call__(self, outputs, targets):
        if torch.is_grad_enabled():  # training steps, not validation
            self.steps += 1
            with open(self.steps_log, "a") as f:
                f.write(f"{os.getpid()}\n")
            if self.steps > STEPS_PER_EPOCH and not self.marker.exists():
                self.marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return F.cross_entropy(outputs, targets)


def tiny_task(model_fn=bn_net, **kwargs) -> Task:
    return Task(model_fn, blobs(), blobs(128, seed=1), batch_size=32, name="tiny", **kwargs)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """A real sqlite MLflow store, created once: creating its schema takes seconds."""
    root = tmp_path_factory.mktemp("mlruns")
    return Tracker(f"sqlite:///{root / 'mlflow.db'}", "search-test")


@pytest.fixture
def store(tracker, request):
    """The store with a parent run of the test's own, as the pipeline creates it."""
    return tracker, tracker.start_run(request.node.name)


def run_search(task, cfg, store, tmp_path, *, epochs, name=None, range_test=None, **kwargs):
    tracker, parent = store
    site = SearchSite(
        tracking_uri=tracker.tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=parent,
        storage_path=str(tmp_path / "ray_results"),
        name=name or f"search-{parent[:8]}",  # the tests share one MLflow experiment
    )
    plan = TrialPlan(epochs=epochs, range_test=range_test or RangeTestConfig())
    return search(task, CHOICE, cfg, site, plan, **kwargs)


def child_runs(store) -> list:
    tracker, parent = store
    client = mlflow.MlflowClient(tracker.tracking_uri)
    return client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'"
    )


def logged_steps(store, run_id: str, key: str) -> list[int]:
    client = mlflow.MlflowClient(store[0].tracking_uri)
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_weight_decay_is_zero_or_log_uniform_in_range_and_sampling_is_seeded():
    cfg = SearchConfig(weight_decay_min=1e-5, weight_decay_max=1e-1, zero_wd_prob=0.25)

    def sample(seed):  # as Tune's BasicVariantGenerator does: one generator for all trials
        rng = np.random.default_rng(seed)
        return [next(generate_variants(param_space(cfg), random_state=rng))[1] for _ in range(400)]

    configs = sample(0)
    wds = [c["weight_decay"] for c in configs]
    nonzero = [wd for wd in wds if wd != 0.0]
    assert 0.18 < wds.count(0.0) / len(wds) < 0.32
    assert all(1e-5 <= wd <= 1e-1 for wd in nonzero)
    median = sorted(math.log10(wd) for wd in nonzero)[len(nonzero) // 2]
    assert -3.6 < median < -2.4  # log-uniform: the median sits near the middle decade (-3)
    assert all(0.01 <= c["bn_momentum"] <= 0.5 for c in configs)
    assert sample(0) == configs and sample(1) != configs
    assert "bn_momentum" not in param_space(cfg, bn_searched=False)


def test_param_space_draws_only_listed_values_and_a_grid_yields_every_combination():
    wds, bns = (1e-3, 1e-4, 1e-5, 1e-6, 0.0), (0.01, 0.05, 0.1, 0.3)  # Smith's grid
    rng = np.random.default_rng(0)
    drawn = [
        next(generate_variants(param_space(SearchConfig(weight_decay_values=wds)), rng))[1]
        for _ in range(200)
    ]
    assert {c["weight_decay"] for c in drawn} == set(wds)  # each listed value, nothing else
    assert all(0.01 <= c["bn_momentum"] <= 0.5 for c in drawn)  # still the log-uniform range

    cfg = SearchConfig(
        weight_decay_values=wds, bn_momentum_values=bns, lr_scales=None, grid=True, num_samples=2
    )
    grid = [config for _, config in generate_variants(param_space(cfg), random_state=rng)]
    assert sorted((c["weight_decay"], c["bn_momentum"]) for c in grid) == sorted(
        (wd, bn) for wd in wds for bn in bns
    )
    assert num_trials(cfg) == 2 * 20  # Tune runs the grid num_samples times
    no_bn = [c for _, c in generate_variants(param_space(cfg, bn_searched=False), rng)]
    assert [c["weight_decay"] for c in no_bn] == list(wds) and "bn_momentum" not in no_bn[0]
    assert num_trials(cfg, bn_searched=False) == 2 * 5
    assert num_trials(SearchConfig(weight_decay_values=wds, num_samples=3)) == 3  # drawn


def test_lr_scales_are_drawn_or_gridded_with_the_other_lists_and_one_factor_is_no_dimension():
    rng = np.random.default_rng(0)
    cfg = SearchConfig(lr_scales=(0.3, 1.0, 3.0))
    drawn = [next(generate_variants(param_space(cfg), random_state=rng))[1] for _ in range(60)]
    assert {c["lr_scale"] for c in drawn} == {0.3, 1.0, 3.0}
    assert num_trials(cfg) == cfg.num_samples  # drawn: no more trials

    wds, scales = (0.0, 1e-4), (0.5, 2.0)
    cfg = SearchConfig(weight_decay_values=wds, lr_scales=scales, grid=True, num_samples=2)
    grid = [c for _, c in generate_variants(param_space(cfg, bn_searched=False), rng)]
    assert sorted((c["weight_decay"], c["lr_scale"]) for c in grid) == [
        (wd, scale) for wd in wds for scale in scales
    ]
    assert num_trials(cfg, bn_searched=False) == 2 * 4
    alone = SearchConfig(lr_scales=scales, grid=True, num_samples=3)  # the rest is drawn
    grid = [c for _, c in generate_variants(param_space(alone), rng)]
    assert [c["lr_scale"] for c in grid] == list(scales)
    assert all(0.01 <= c["bn_momentum"] <= 0.5 for c in grid)
    assert num_trials(alone) == 3 * 2

    for none in (None, (1.0,)):
        assert "lr_scale" not in param_space(SearchConfig(lr_scales=none))
        gridded = SearchConfig(weight_decay_values=wds, lr_scales=none, grid=True, num_samples=8)
        assert num_trials(gridded) == 16
    assert param_space(SearchConfig(lr_scales=(2.0,)))["lr_scale"] == 2.0  # a constant


def test_drawn_searches_take_every_lr_scale_in_turn_from_the_pick_outwards():
    cfg = SearchConfig(lr_scales=(0.2, 0.45, 1.0, 2.2, 5.0), num_samples=7)
    assert [p["lr_scale"] for p in scale_points(cfg)] == [1.0, 2.2, 0.45, 0.2, 5.0, 1.0, 2.2]
    assert [p["lr_scale"] for p in scale_points(replace(cfg, num_samples=1))] == [1.0]
    # a grid tries every scale already; one factor or none is no dimension
    assert scale_points(replace(cfg, grid=True)) == []
    assert (
        scale_points(replace(cfg, lr_scales=(1.0,)))
        == scale_points(replace(cfg, lr_scales=None))
        == []
    )


class _Planted:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_the_bn_momentum_floor_keeps_the_running_average_within_a_tenth_of_a_trial():
    cfg = SearchConfig()  # bn_momentum in [0.01, 0.5]
    assert bn_momentum_floor(cfg, 100_000) == 0.01  # a long run: the configured minimum
    assert bn_momentum_floor(cfg, 200) == pytest.approx(1 / 20)  # a 20-step average at most
    assert bn_momentum_floor(cfg, 10) == 0.25  # a very short run: half the maximum
    assert bn_momentum_floor(SearchConfig(bn_momentum_min=0.2), 200) == 0.2


def test_a_planted_trial_checkpoint_is_refused_without_running_its_code(tmp_path):
    from ray import tune

    from autolr.search import CHECKPOINT_FILE, _load_checkpoint

    marker = tmp_path / "marker"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"train": _Planted(marker)}, folder / CHECKPOINT_FILE)
    with pytest.raises(Exception, match="Weights only load failed"):
        _load_checkpoint(tune.Checkpoint.from_directory(str(folder)))
    assert not marker.exists()


def test_trial_resources_never_ask_for_a_gpu_the_cluster_lacks_nor_more_cpus_than_it_has():
    cfg = SearchConfig(cpus_per_trial=4, gpus_per_trial=0.5)
    assert trial_resources({"CPU": 2.0}, cfg) == {"cpu": 2.0}
    assert trial_resources({"CPU": 16.0, "GPU": 1.0}, cfg) == {"cpu": 4.0, "gpu": 0.5}
    assert trial_resources({"CPU": 16.0, "GPU": 0.25}, cfg) == {"cpu": 4.0, "gpu": 0.25}
    with pytest.raises(ValueError, match="no CPU"):
        trial_resources({"GPU": 1.0}, cfg)


@pytest.mark.slow
def test_search_returns_the_best_full_trial_and_its_lr_range_and_logs_each_trial_as_a_child_run(
    ray_cluster, store, tmp_path
):
    # One trial at a time makes ASHA's decisions, and so the test, deterministic. Seed 0
    # draws both factors, a zero weight decay, and trials that ASHA stops.
    cfg = SearchConfig(
        num_samples=4,
        reduction_factor=2,
        max_concurrent=1,
        zero_wd_prob=0.3,
        lr_scales=(3.0, 0.3),
        extend_at_edge=False,  # each scale twice (the step past an edge: test_search_edge)
        scheduler="asha",  # FIFO is the default; this test is about ASHA's stops too
    )
    result = run_search(tiny_task(), cfg, store, tmp_path, epochs=3)

    assert len(result.trials) == 4 and result.bn_searched
    full = [t for t in result.trials if t.status == "TERMINATED"]
    stopped = [t for t in result.trials if t.status == "STOPPED"]
    assert full and stopped, [(t.status, t.epochs_run) for t in result.trials]
    best = max(full, key=lambda t: t.val_metric)
    assert (result.weight_decay, result.bn_momentum) == (best.weight_decay, best.bn_momentum)
    assert result.val_metric == best.val_metric and result.best_trial_id == best.trial_id
    assert (result.max_lr, result.min_lr, result.lr_scale) == (
        best.max_lr,
        best.min_lr,
        best.lr_scale,
    )
    # Each trial trained with the curve's range times its own factor: a max LR validated
    # by training. Its logged LR after epoch 1, over its factor, is the same for all.
    assert sorted(t.lr_scale for t in result.trials) == [0.3, 0.3, 3.0, 3.0]  # each in turn
    first_lrs = []
    for t in result.trials:
        assert (t.max_lr, t.min_lr) == pytest.approx(
            (CHOICE.max_lr * t.lr_scale, CHOICE.min_lr * t.lr_scale), rel=1e-12
        )
        client = mlflow.MlflowClient(store[0].tracking_uri)
        (lr,) = [m.value for m in client.get_metric_history(t.run_id, "lr") if m.step == 1]
        first_lrs.append(lr / t.lr_scale)
    assert first_lrs == pytest.approx([first_lrs[0]] * 4, rel=1e-9)

    runs = {r.info.run_id: r for r in child_runs(store)}
    assert len(runs) == 4
    for trial in result.trials:
        run = runs[trial.run_id]
        assert run.data.tags[TRIAL_TAG] == trial.trial_id
        assert float(run.data.params["weight_decay"]) == trial.weight_decay
        assert float(run.data.params["bn_momentum"]) == trial.bn_momentum
        assert float(run.data.params["max_lr"]) == trial.max_lr
        assert float(run.data.params["min_lr"]) == trial.min_lr
        assert float(run.data.params["lr_scale"]) == trial.lr_scale
        for key in EPOCH_METRICS:
            assert logged_steps(store, trial.run_id, key) == list(range(1, trial.epochs_run + 1))
        assert run.data.metrics["val_accuracy"] == pytest.approx(trial.val_metric)
        if trial.status == "STOPPED":
            assert run.info.status == "FINISHED" and run.data.tags["autolr.stopped_by"] == "asha"
        else:
            assert run.info.status == "FINISHED" and trial.epochs_run == 3
    assert any(t.weight_decay == 0.0 for t in result.trials)  # zero_wd_prob at work
    assert result.resources == {"cpu": 1.0}
    # 3 epochs of 8 steps: BN momentum is drawn from half the maximum up (bn_momentum_floor)
    assert all(0.25 <= t.bn_momentum <= 0.5 for t in result.trials)
    assert "bn_momentum drawn from 0.25 (not 0.01)" in "\n".join(result.notes)


@pytest.mark.slow
def test_a_fifo_grid_trains_every_combination_once_to_the_end_each_in_its_own_child_run(
    ray_cluster, store, tmp_path
):
    cfg = SearchConfig(
        weight_decay_values=[0.0, 1e-3],
        bn_momentum_values=[0.05, 0.3],
        grid=True,
        scheduler="fifo",
        num_samples=1,
        grace_period=1,
        reduction_factor=2,  # what would make ASHA stop half the trials after epoch 1
        lr_scales=None,  # no LR dimension: every trial trains with the curve's range
    )
    result = run_search(tiny_task(), cfg, store, tmp_path, epochs=2)

    combos = sorted((t.weight_decay, t.bn_momentum) for t in result.trials)
    assert combos == [(0.0, 0.05), (0.0, 0.3), (1e-3, 0.05), (1e-3, 0.3)]
    assert [(t.status, t.epochs_run) for t in result.trials] == [("TERMINATED", 2)] * 4
    assert all(0 < t.seconds < result.seconds for t in result.trials)  # each trial's own time
    assert not any("stopped" in note for note in result.notes)
    runs = child_runs(store)
    assert sorted(r.data.tags[TRIAL_TAG] for r in runs) == sorted(t.trial_id for t in result.trials)
    for trial in result.trials:
        run = next(r for r in runs if r.info.run_id == trial.run_id)
        assert run.info.status == "FINISHED"
        assert float(run.data.params["weight_decay"]) == trial.weight_decay
        assert float(run.data.params["bn_momentum"]) == trial.bn_momentum
        assert (float(run.data.params["max_lr"]), trial.lr_scale) == (CHOICE.max_lr, 1.0)
        assert logged_steps(store, trial.run_id, "val_loss") == [1, 2]


@pytest.mark.slow
def test_a_model_without_batchnorm_drops_the_bn_dimension_and_says_so(ray_cluster, store, tmp_path):
    result = run_search(
        tiny_task(plain_mlp), SearchConfig(num_samples=2), store, tmp_path, epochs=1
    )

    assert not result.bn_searched and result.bn_momentum is None
    assert any("no BatchNorm" in note for note in result.notes)
    assert all(t.bn_momentum is None and t.status == "TERMINATED" for t in result.trials)
    assert {r.data.params["bn_momentum"] for r in child_runs(store)} == {"None"}


@pytest.mark.slow
def test_trials_run_cpu_only_on_a_cluster_without_gpus_even_when_gpus_are_configured(
    ray_cluster, store, tmp_path
):
    assert ray.cluster_resources().get("GPU", 0) == 0
    cfg = SearchConfig(num_samples=2, gpus_per_trial=0.5)
    result = run_search(tiny_task(), cfg, store, tmp_path, epochs=1)  # a GPU ask would hang

    assert result.resources == {"cpu": 1.0}
    assert [t.status for t in result.trials] == ["TERMINATED", "TERMINATED"]


@pytest.mark.slow
def test_wd_aware_trials_train_with_the_pick_of_their_own_range_test(ray_cluster, store, tmp_path):
    cfg = SearchConfig(num_samples=1, wd_aware=True)
    result = run_search(
        tiny_task(), cfg, store, tmp_path, epochs=1, range_test=RangeTestConfig(num_iter=40)
    )

    ((trial,), (run,)) = result.trials, child_runs(store)
    params = run.data.params
    assert params["lr_source"] == "wd_aware"  # the tiny curve has a clear valley
    assert float(params["max_lr"]) == trial.max_lr == result.max_lr != CHOICE.max_lr
    assert float(params["min_lr"]) == trial.min_lr < trial.max_lr
    assert 0.0 <= float(params["lr_confidence"]) <= 1.0


@pytest.mark.slow
def test_an_unreachable_tracking_server_neither_fails_nor_stalls_the_trials(ray_cluster, tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    result = search(
        tiny_task(),
        CHOICE,
        SearchConfig(num_samples=2),
        SearchSite(
            tracking_uri=f"http://127.0.0.1:{port}",
            experiment_id="1",
            parent_run_id="0" * 32,
            storage_path=str(tmp_path / "ray_results"),
            name="offline",
        ),
        TrialPlan(epochs=1),
    )

    # MLflow's default retries would hold each call for about 4 minutes.
    assert time.monotonic() - started < 60
    assert [(t.status, t.run_id) for t in result.trials] == [("TERMINATED", None)] * 2
    assert any("MLflow" in note for note in result.notes)


@pytest.mark.slow
def test_a_killed_trial_is_retried_from_its_checkpoint_into_the_same_mlflow_run(
    ray_cluster, store, tmp_path
):
    marker, steps_log = tmp_path / "killed", tmp_path / "steps.log"
    task = tiny_task(loss_fn=DieOnceLoss(marker, steps_log))
    result = run_search(
        task, SearchConfig(num_samples=1, max_failures=2), store, tmp_path, epochs=3
    )

    assert marker.exists()  # the first attempt really died
    (trial,) = result.trials
    assert (trial.status, trial.epochs_run) == ("TERMINATED", 3)
    pids = steps_log.read_text().split()
    first, retry = pids[: STEPS_PER_EPOCH + 1], pids[STEPS_PER_EPOCH + 1 :]
    assert len(set(first)) == 1 and set(retry).isdisjoint(first)
    assert len(retry) == 2 * STEPS_PER_EPOCH  # epochs 2 and 3 only: resumed, not restarted

    (run,) = child_runs(store)
    assert run.info.run_id == trial.run_id and run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert logged_steps(store, trial.run_id, key) == [1, 2, 3]


class CountingLoss:
    """Cross-entropy that writes its step number (from 1 per attempt) for every training step."""

    def __init__(self, steps_log: Path) -> None:
        self.steps_log, self.steps = steps_log, 0

    def __call__(self, outputs, targets):
        if torch.is_grad_enabled():
            self.steps += 1
            with open(self.steps_log, "a") as f:
                f.write(f"{self.steps}\n")
        return F.cross_entropy(outputs, targets)


@pytest.mark.slow
def test_diverged_trials_fail_once_without_retraining_and_their_runs_end_failed(
    ray_cluster, store, tmp_path
):
    steps_log = tmp_path / "steps.log"
    task = tiny_task(plain_mlp, loss_fn=CountingLoss(steps_log))
    cfg = SearchConfig(num_samples=1, max_failures=1)
    with pytest.raises(AutoLRError, match="all 1 failed.*training loss became"):
        search(
            task,
            LRChoice(max_lr=1e6, min_lr=1.0, confidence=1.0, method="fixed", reason="too high"),
            cfg,
            SearchSite(
                tracking_uri=store[0].tracking_uri,
                experiment_id=store[0].experiment_id,
                parent_run_id=store[1],
                storage_path=str(tmp_path / "ray_results"),
                name=f"diverge-{store[1][:8]}",
            ),
            TrialPlan(epochs=2),
        )

    tune_errors = next((tmp_path / "ray_results").rglob("error.txt")).read_text()
    assert tune_errors.count("Failure #") == 2  # Tune did retry the trial ...
    assert steps_log.read_text().split().count("1") == 1  # ... but the retry did not train
    (run,) = child_runs(store)
    assert run.info.status == "FAILED"
    assert "training loss became" in run.data.tags["autolr.error"]


RESUMABLE = """
import sys
sys.path.insert(0, {tests!r})
import test_search
from autolr.config import SearchConfig
from autolr.search import SearchSite, TrialPlan, search

search(
    test_search.tiny_task(test_search.SlowNet),
    test_search.CHOICE,
    SearchConfig(num_samples=4, reduction_factor=2),
    SearchSite(
        tracking_uri={uri!r},
        experiment_id={experiment!r},
        parent_run_id={parent!r},
        storage_path={storage!r},
        name="resumable",
        ray_address={address!r},
    ),
    TrialPlan(epochs=3),
    progress=False,
)
"""


@pytest.mark.slow
def test_a_search_whose_driver_was_killed_resumes_with_no_duplicate_or_running_runs(
    ray_cluster, store, tmp_path
):
    tracker, parent = store
    storage = tmp_path / "ray_results"
    script = RESUMABLE.format(
        tests=str(Path(__file__).parent),
        uri=tracker.tracking_uri,
        experiment=tracker.experiment_id,
        parent=parent,
        storage=str(storage),
        address=ray_cluster,
    )
    with open(tmp_path / "driver.log", "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:  # kill the driver once Tune has saved its state and a trial its first checkpoint
        deadline = time.monotonic() + 240
        experiment = storage / "resumable"
        while not (
            list(experiment.glob("experiment_state-*.json"))
            and list(experiment.glob("*/checkpoint_*"))
        ):
            assert time.monotonic() < deadline, "no trial checkpointed within 240 s"
            time.sleep(0.1)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = child_runs(store)
    epochs_before = sum(len(logged_steps(store, r.info.run_id, "val_loss")) for r in before)
    assert before and all(r.info.status == "RUNNING" for r in before)  # nobody closed them

    result = run_search(
        tiny_task(SlowNet),
        SearchConfig(num_samples=4, reduction_factor=2),
        store,
        tmp_path,
        epochs=3,
        name="resumable",
        resume=True,
    )

    assert any("resumed" in note for note in result.notes)
    assert len(result.trials) == 4
    assert all(t.status in ("TERMINATED", "STOPPED") for t in result.trials)
    runs = child_runs(store)
    trial_ids = [r.data.tags[TRIAL_TAG] for r in runs]
    assert sorted(trial_ids) == sorted(t.trial_id for t in result.trials)  # one run per trial
    assert {r.info.run_id for r in before} <= {t.run_id for t in result.trials}  # reused
    assert sum(t.epochs_run for t in result.trials) > epochs_before  # training went on
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    for trial in result.trials:
        assert logged_steps(store, trial.run_id, "val_loss") == list(range(1, trial.epochs_run + 1))


def error_rate(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(dim=1) != targets).float().mean().item()


@pytest.mark.slow
def test_a_callable_metric_to_minimise_keeps_the_trial_with_the_lowest_value(
    ray_cluster, store, tmp_path
):
    # A far too low LR scale and the pick: the first barely learns, so its error is higher.
    cfg = SearchConfig(num_samples=1, lr_scales=(0.001, 1.0), grid=True)
    task = tiny_task(plain_mlp, metric=error_rate, mode="min")
    result = run_search(task, cfg, store, tmp_path, epochs=1)

    low, pick = sorted(result.trials, key=lambda t: t.lr_scale)
    assert low.val_metric > pick.val_metric  # else the test shows nothing
    assert (result.best_trial_id, result.val_metric) == (pick.trial_id, pick.val_metric)
    assert (result.metric, result.higher_is_better, result.lr_scale) == ("error_rate", False, 1.0)


class StepLog:
    """An SGD factory that logs "pid optimizer lr threads" to ``path`` at each optimizer step."""

    def __init__(self, path: str) -> None:
        self.path, self.made = path, 0

    def __call__(self, params, lr, weight_decay):
        self.made += 1
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        tag = f"{os.getpid()} {self.made}"

        def log_step(opt, *_):
            with open(self.path, "a") as f:
                f.write(f"{tag} {opt.param_groups[0]['lr']!r} {torch.get_num_threads()}\n")

        optimizer.register_step_post_hook(log_step)
        return optimizer


def accumulating_task(steps_log: str) -> Task:
    """tiny_task minimising its loss, with a logged SGD; tests.test_search:accumulating_task."""
    return tiny_task(metric="loss", optimizer=StepLog(steps_log))


@pytest.fixture
def two_threads():
    """Torch on 2 threads in this process (the driver), a trial's 1 being another.

    Also on a 1-core machine: the final run must not inherit the driver's setting,
    as sums split over 2 threads round differently from 1 (a val loss of 0.60455130
    against 0.60455129 for the task below, at some hyperparameters).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_trials_and_the_final_run_share_one_effective_batch_and_the_final_run_reproduces_the_best(
    ray_cluster, tmp_path, two_threads
):
    # The trial trains on 1 thread (a CPU per trial); the final run must too.
    from autolr.pipeline import main

    steps_log = tmp_path / "steps.log"
    out = tmp_path / "summary.json"
    code = main(
        [
            *("--task", "tests.test_search:accumulating_task"),
            *("--set", f"task_params.steps_log={steps_log}"),
            *("--tracking-uri", f"sqlite:///{tmp_path / 'store.db'}"),
            *("--output", str(out), "--no-progress"),
            "--retrain",  # else the best trial's checkpoint is the final model, not trained
            *("--set", "range_test.accumulation_steps=4", "--set", "range_test.repeats=1"),
            *("--set", "range_test.num_iter=30"),
            # One trial with the final run's budget; seeds that differ on purpose: the
            # search's draws the space, the trial trains with the final run's.
            *("--set", "search.num_samples=1", "--set", "search.lr_scales=null"),
            *("--set", "search.epochs=2", "--set", "train.epochs=2", "--set", "search.seed=7"),
            *("--set", f"search.storage_path={tmp_path / 'ray'}"),
        ]
    )
    assert code == 0
    summary = json.loads(out.read_text())

    # 8 batches an epoch, 4 per step: 2 optimizer steps an epoch, 1cycle over 4 steps.
    steps: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for line in steps_log.read_text().split("\n")[:-1]:
        pid, made, lr, threads = line.split()
        steps.setdefault((pid, made), []).append((float(lr), int(threads)))
    here = str(os.getpid())
    (trial,) = [log for (pid, _), log in steps.items() if pid != here]
    final = steps[max((key for key in steps if key[0] == here), key=lambda k: int(k[1]))]
    expected = onecycle_lrs(summary["max_lr"], summary["min_lr"], total_steps=2 * 2)
    for log in (trial, final):
        assert [lr for lr, _ in log] == pytest.approx(expected, rel=1e-12)

    # Same hyperparameters, budget, seed and torch threads: the same model, bit for bit.
    # (On some values 1 and 2 threads happen to round alike, so the threads are checked.)
    assert {threads for _, threads in final} == {threads for _, threads in trial} == {1}
    assert summary["best"]["val_metric"] == pytest.approx(summary["val_metric"], rel=1e-12)


PRIVATE_SEARCH = """
import sys
sys.path.insert(0, {tests!r})
import test_search
from autolr.config import SearchConfig
from autolr.search import SearchSite, TrialPlan, search

search(
    test_search.tiny_task(loss_fn=test_search.WaitingLoss({started!r}, {scanned!r})),
    test_search.CHOICE,
    SearchConfig(num_samples=1, lr_scales=None),
    SearchSite(
        tracking_uri={uri!r},
        experiment_id={experiment!r},
        parent_run_id=None,
        storage_path={storage!r},
        name="private",
        ray_address={address!r},
    ),
    TrialPlan(epochs=1),
    progress=False,
)
"""


class WaitingLoss:
    """Cross-entropy that, at its first training step, says so and waits for the test."""

    def __init__(self, started: str, scanned: str) -> None:
        self.started, self.scanned = Path(started), Path(scanned)

    def __call__(self, outputs, targets):
        if torch.is_grad_enabled() and not self.started.exists():
            self.started.touch()
            deadline = time.monotonic() + 60
            while not self.scanned.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return F.cross_entropy(outputs, targets)


def private_search(store, tmp_path, address: str | None = None) -> tuple[subprocess.Popen, dict]:
    """A driver process running a 1-trial search, with its own Ray unless ``address``."""
    files = {"started": str(tmp_path / "started"), "scanned": str(tmp_path / "scanned")}
    script = PRIVATE_SEARCH.format(
        tests=str(Path(__file__).parent),
        uri=store[0].tracking_uri,
        experiment=store[0].experiment_id,
        storage=str(tmp_path / "ray_results"),
        address=address,
        **files,
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    return driver, files


def descendants(root: int) -> set[int]:
    """``root`` and every process under it, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = {root}, [root]
    while todo:
        pid = todo.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        todo += [child for child in children if child not in found]
        found.update(children)
    return found


def listening(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process name) of each listening TCP socket of ``pids``, per ss."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    sockets = []
    for line in out.splitlines():
        owners = re.findall(r'"([^"]+)",pid=(\d+)', line)
        sockets += [(line.split()[3], name) for name, pid in owners if int(pid) in pids]
    return sockets


@pytest.mark.slow
def test_a_private_ray_listens_on_loopback_only(store, tmp_path):
    driver, files = private_search(store, tmp_path)
    try:
        deadline = time.monotonic() + 180
        while not Path(files["started"]).exists():
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the trial did not start within 180 s"
            time.sleep(0.1)
        sockets = listening(descendants(driver.pid))  # while the trial trains
    finally:
        Path(files["scanned"]).touch()
        output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, output[-3000:]

    names = {name for _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the scan saw Ray's processes
    # ss writes 127.0.0.1:P, or [::ffff:127.0.0.1]:P for a dual-stack socket; all
    # interfaces are 0.0.0.0:P, *:P or [::]:P. Ray 2.60 binds every port to the node
    # IP once that is loopback, so no process is an exception.
    exposed = [(a, n) for a, n in sockets if a.rpartition(":")[0].strip("[]") not in LOOPBACK]
    assert not exposed, sockets
    # and it does not print ray's token notice on every run (the README says what it exposes)
    assert "Token authentication is enabled" not in output


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


@pytest.mark.slow
def test_an_unreachable_ray_address_fails_at_once_with_one_line(store, tmp_path):
    driver, _ = private_search(store, tmp_path, address="127.0.0.1:1")  # nothing listens
    try:
        output = driver.communicate(timeout=120)[0]  # ray.init alone retried for minutes
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()

    assert driver.returncode == 1
    (line,) = [line for line in output.splitlines() if line.startswith("autolr.errors.")]
    assert line.startswith("autolr.errors.ConfigError: ")
    assert "cannot connect to the Ray cluster at '127.0.0.1:1'" in line
    assert "nothing answered at 127.0.0.1:1" in line


def test_workers_that_the_cluster_or_the_batch_cannot_hold_fail_in_one_line_before_tune_starts(
    ray_cluster, store, tmp_path
):
    from autolr.errors import ArgumentError

    with pytest.raises(ArgumentError) as caught:
        run_search(tiny_task(), SearchConfig(workers_per_trial=3), store, tmp_path, epochs=1)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("search.workers_per_trial=3 can never be placed"), message
    assert "3 x 1 CPU = 3 CPUs, but the cluster has 2" in message
    with pytest.raises(ArgumentError, match=r"batch_size=1 is smaller; expected at least one"):
        task = Task(bn_net, blobs(), blobs(128, seed=1), batch_size=1)  # 2 workers, 1 example
        run_search(task, SearchConfig(workers_per_trial=2), store, tmp_path, epochs=1)
    assert not (tmp_path / "ray_results").exists() or not any((tmp_path / "ray_results").iterdir())
    assert child_runs(store) == []


@pytest.mark.slow
def test_a_two_worker_trial_logs_once_per_epoch_the_metrics_of_one_process(
    ray_cluster, store, tmp_path
):
    # Ray Train's workers under DDP (search.workers_per_trial); tests/test_ddp.py has
    # the data-parallel range test and training without Ray.
    from autolr.training import train

    task = tiny_task(plain_mlp)  # no BatchNorm: its statistics would be per worker
    cfg = SearchConfig(num_samples=1, lr_scales=None, workers_per_trial=2)
    result = run_search(task, cfg, store, tmp_path, epochs=2)

    (trial,) = result.trials
    assert trial.status == "TERMINATED" and trial.epochs_run == 2, trial
    assert result.resources == {"cpu": 1.0}  # each worker's
    (run,) = child_runs(store)
    assert run.info.run_id == trial.run_id and run.info.status == "FINISHED"
    for key in EPOCH_METRICS:  # rank 0 alone logs: one value per epoch
        assert logged_steps(store, trial.run_id, key) == [1, 2], key
    # The trial's checkpoint is its Train run's last, in the trial checkpoints' format.
    from autolr.search.outcome import trial_state

    assert trial_state(trial.checkpoint)["epoch"] == 2, trial.checkpoint

    # One process trained with the same arguments on one thread (as a worker): DDP's
    # mean of two half-batch gradients is the batch's, so the metrics differ by
    # float32 rounding only (sums taken in another order; 2 gloo ranks outside Ray
    # were 4e-8 relative off after 2 epochs). rtol 1e-5; a shuffle in another order
    # was 4e-3 off.
    with torch.random.fork_rng():
        alone = train(
            task,
            max_lr=CHOICE.max_lr,
            min_lr=CHOICE.min_lr,
            epochs=2,
            weight_decay=trial.weight_decay,
            seed=cfg.seed,
            threads=1,
            progress=False,
        )
    client = mlflow.MlflowClient(store[0].tracking_uri)
    for epoch in alone.history:
        logged = {
            key: [
                m.value
                for m in client.get_metric_history(trial.run_id, key)
                if m.step == epoch.epoch
            ]
            for key in EPOCH_METRICS
        }
        expected = {
            "train_loss": epoch.train_loss,
            "val_loss": epoch.val_loss,
            "val_accuracy": epoch.val_metric,
            "lr": epoch.lr,
        }
        for key, value in expected.items():
            assert logged[key] == [pytest.approx(value, rel=1e-5)], (epoch.epoch, key)
    assert trial.val_metric == pytest.approx(alone.val_metric, rel=1e-5)
