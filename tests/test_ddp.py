"""Data-parallel range tests and training: 2 gloo ranks on CPU against one process.

The ranks are 2 processes forked with torch.multiprocessing (a few seconds).
A search whose trials run on Ray Train's DDP workers is tested in test_search.py,
with its Ray and MLflow store.
"""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from services import free_port
from test_search import plain_mlp, tiny_task
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from autolr import range_test
from autolr.config import RangeTestConfig, SearchConfig, load_config
from autolr.errors import ArgumentError, ConfigError
from autolr.range_test import range_test_task
from autolr.search import trial_resources
from autolr.search.space import concurrent_trials
from autolr.training import make_loaders, train

BATCH = 16  # per rank; the single process takes 2 x BATCH
RANGE_ITERS = 60  # the regression below descends, then blows up at step 47


def regression_data(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(
        x, x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    )


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def _sweep(world: int, rank: int) -> dict:
    """A range test of `mlp` at BATCH per rank over ``world`` ranks; its state before and after.

    Both set-ups shuffle with DistributedSampler(seed=0), so each step's batches
    over the ranks hold exactly the examples of the single process's batch.
    """
    data = regression_data()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=BATCH * (2 // world), sampler=sampler)
    # One real step first, so there is momentum to restore.
    x, y = next(iter(loader))
    nn.functional.mse_loss(trained(x), y).backward()
    optimizer.step()
    before = _state(model, optimizer)
    result = range_test(
        trained, optimizer, nn.functional.mse_loss, loader, start_lr=1e-4, end_lr=10.0,
        num_iter=RANGE_ITERS, max_iter=RANGE_ITERS, progress=False,
    )  # fmt: skip
    return {
        "losses": result.losses,
        "stop_reason": result.stop_reason,
        "before": before,
        "after": _state(model, optimizer),
    }


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "lr": [g["lr"] for g in optimizer.param_groups],
        "rng": torch.get_rng_state(),
    }


def _task_runs() -> dict:
    """What a DDP trial runs on each rank: a task's range test and training, 2 epochs."""
    task = tiny_task(plain_mlp)
    cfg = RangeTestConfig(num_iter=40, max_iter=40, repeats=1, val_loss=True)
    curve = range_test_task(task, cfg, progress=False)
    result = train(task, max_lr=0.3, min_lr=0.01, epochs=2, weight_decay=1e-3, progress=False)
    _, y = next(iter(make_loaders(task, seed=0)[0]))
    return {"curve": curve.losses, "history": [vars(m) for m in result.history], "batch": len(y)}


def _rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    # A rank left waiting in a collective (a peer stopped alone) errors after 60 s
    # instead of gloo's 30 minutes; the sweeps take well under a second.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save({**_sweep(2, rank), **_task_runs()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, one_torch_thread) -> list[dict]:
    """`_sweep` and `_task_runs` on 2 gloo ranks: each rank's results."""
    out = tmp_path_factory.mktemp("ranks")
    _sweep(1, 0)  # first: it imports what the sweep needs (4 s), which fork shares
    # fork, not spawn: the children start from this process's imports (spawn took 10 s).
    mp.start_processes(_rank_main, args=(free_port(), str(out)), nprocs=2, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for m, n in zip(a["momentum"], b["momentum"], strict=True):
        assert torch.equal(m, n)
    assert a["lr"] == b["lr"] and torch.equal(a["rng"], b["rng"])


def test_a_two_rank_range_test_gives_the_curve_of_one_process_at_twice_the_batch(two_ranks):
    single, ranks = _sweep(1, 0), two_ranks

    # Every rank recorded the same curve (the loss averaged over the ranks) and so
    # stopped at the same step, for the same reason.
    np.testing.assert_array_equal(ranks[0]["losses"], ranks[1]["losses"])
    assert ranks[0]["stop_reason"] == ranks[1]["stop_reason"]
    # Every rank is back where it started, bit for bit: weights, momentum, lr, RNG.
    for r in ranks:
        _assert_same_state(r["before"], r["after"])
    # Against one process at 2 x BATCH: the same examples per step, and DDP's mean of
    # the two half-batch gradients is the full batch's gradient, so only float32
    # rounding differs (sums taken in another order): seen 0 to 4e-7 relative while
    # the loss descends, 2e-5 at the last finite point of the blow-up, the same
    # stopping step. rtol 1e-4 leaves room for another BLAS; a rank's own half-batch
    # loss is 10-50% off.
    two, one = ranks[0]["losses"], single["losses"]
    assert len(two) == len(one) and ranks[0]["stop_reason"] == single["stop_reason"]
    finite = np.isfinite(one)
    np.testing.assert_allclose(two[finite], one[finite], rtol=1e-4)
    assert np.array_equal(np.isfinite(two), finite)
    _assert_same_state(single["before"], single["after"])


def test_workers_per_trial_is_a_count_of_one_or_more():
    for bad in ("0", "-2", "1.5"):
        with pytest.raises(ConfigError, match=r"^search(: expected |\.)workers_per_trial") as err:
            load_config(overrides=[f"search.workers_per_trial={bad}"])
        assert "\n" not in str(err.value)
    assert load_config(overrides=["search.workers_per_trial=4"]).search.workers_per_trial == 4
    # ASHA would stop trials inside their Ray Train runs, whose workers kept their CPUs.
    with pytest.raises(ConfigError, match=r'^search: expected scheduler "fifo" with work'):
        load_config(overrides=["search.workers_per_trial=2", "search.scheduler=asha"])


def test_ddp_workers_ask_for_whole_gpus_and_a_cluster_too_small_for_them_is_refused():
    two = SearchConfig(workers_per_trial=2, cpus_per_trial=2)
    assert trial_resources({"CPU": 8.0}, two) == {"cpu": 2.0}
    assert trial_resources({"CPU": 8.0, "GPU": 4.0}, two) == {"cpu": 2.0, "gpu": 1.0}
    assert concurrent_trials({"CPU": 8.0, "GPU": 4.0}, {"cpu": 2.0, "gpu": 1.0}, two) == 2
    assert concurrent_trials({"CPU": 9.0}, {"cpu": 2.0}, two) == 2  # 4 CPUs a trial
    with pytest.raises(ArgumentError, match=r"2 x 1 GPU = 2 GPUs, but the cluster has 1"):
        trial_resources({"CPU": 8.0, "GPU": 1.0}, two)  # NCCL: one GPU per rank
    with pytest.raises(ArgumentError, match=r"2 x 2 CPU = 4 CPUs, but the cluster has 3"):
        trial_resources({"CPU": 3.0}, two)


def test_a_task_range_test_and_training_on_two_ranks_split_the_batches_of_one_process(
    two_ranks,
):
    # Each rank takes half of every batch of the single process's loader, so the
    # task's range test and its training are the single process's up to float32
    # rounding (seen 4e-8 relative for training, up to 5e-7 on the curve); rtol 1e-5.
    # DistributedSampler's shuffle order was 4e-3 off.
    single = _task_runs()
    assert single["batch"] == 32 and [r["batch"] for r in two_ranks] == [16, 16]
    for rank in two_ranks:
        np.testing.assert_allclose(rank["curve"], single["curve"], rtol=1e-5)
        assert len(rank["history"]) == 2
        for mine, theirs in zip(rank["history"], single["history"], strict=True):
            for key in ("train_loss", "val_loss", "val_metric", "lr"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
