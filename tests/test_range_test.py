"""The range test on tiny real models: the sweep, the stops, and the exact restore."""

from __future__ import annotations

import copy
import math
import random
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from autolr import RangeTestResult, range_test

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def classifier(dropout: float = 0.1) -> nn.Module:
    """A small MLP with BatchNorm (running stats to restore) and Dropout (RNG to restore)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)
    )


def class_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def regression_data(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(
        x, x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    )


def regression_setup() -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    """Plain SGD on least squares: stable at small lr, blows up exponentially at large lr."""
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    loader = DataLoader(regression_data(), batch_size=32)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), loader


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def pretrain(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    """A few real steps so momentum buffers / Adam moments and BN stats exist."""
    loader = DataLoader(class_data(), batch_size=16, shuffle=True)
    model.train()
    for _, (x, y) in zip(range(steps), loader, strict=False):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_nested_equal(a, b) -> None:
    """Equal bit for bit: tensors by torch.equal (same dtype too), the rest by ==."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_nested_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_nested_equal(x, y)
    else:
        assert a == b


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "grads": [p.grad for p in model.parameters()],
            "training": [m.training for m in model.modules()],
        }
    )


def objects_of(optimizer: torch.optim.Optimizer) -> list[int]:
    """The ids of the optimizer's containers and state tensors."""
    state_tensors = [v for s in optimizer.state.values() for v in s.values()]
    return [id(x) for x in [optimizer.param_groups, *optimizer.param_groups, *state_tensors]]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_model_and_optimizer_state_are_restored_bit_for_bit(optimizer_name: str) -> None:
    model = classifier()
    optimizer = make_optimizer(optimizer_name, model)
    pretrain(model, optimizer)
    before = full_state(model, optimizer)
    lr_before = optimizer.param_groups[0]["lr"]
    bn = model[1]
    bn_before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    assert optimizer.state_dict()["state"], "pretraining should have created optimizer state"
    objects = objects_of(optimizer)

    loader = DataLoader(class_data(), batch_size=16, shuffle=True)
    result = range_test(
        model, optimizer, nn.CrossEntropyLoss(), loader, num_iter=30, progress=False
    )

    assert len(result.lrs) >= 5  # the test really trained, so there was something to undo
    assert_nested_equal(full_state(model, optimizer), before)
    assert optimizer.param_groups[0]["lr"] == lr_before
    assert objects_of(optimizer) == objects  # refilled in place, not replaced
    assert torch.equal(bn.running_mean, bn_before[0])
    assert torch.equal(bn.running_var, bn_before[1])
    assert torch.equal(bn.num_batches_tracked, bn_before[2])


def test_state_is_restored_when_the_loss_fn_raises_midway() -> None:
    model = classifier()
    optimizer = make_optimizer("sgd", model)
    pretrain(model, optimizer)
    model.eval()  # the user's mode, and existing grads, must come back too
    nn.functional.cross_entropy(model(class_data()[:8][0]), class_data()[:8][1]).backward()
    before = full_state(model, optimizer)
    calls = 0

    def flaky_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("boom on call 5")
        return nn.functional.cross_entropy(outputs, targets)

    loader = DataLoader(class_data(), batch_size=16)
    with pytest.raises(RuntimeError, match="boom"):
        range_test(model, optimizer, flaky_loss, loader, num_iter=20, progress=False)

    assert calls == 5
    assert not model.training
    assert_nested_equal(full_state(model, optimizer), before)


def test_random_streams_are_unchanged_by_the_test() -> None:
    model = classifier(dropout=0.5)  # dropout and the shuffling loader both draw randoms
    optimizer = make_optimizer("sgd", model)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    loader = DataLoader(class_data(), batch_size=16, shuffle=True)
    range_test(model, optimizer, nn.CrossEntropyLoss(), loader, num_iter=20, progress=False)

    assert random.getstate() == states[0]
    assert_nested_equal(list(np.random.get_state()), list(states[1]))
    assert torch.equal(torch.get_rng_state(), states[2])


def test_parallel_tests_on_copies_do_not_interfere() -> None:
    model = classifier(dropout=0.0)
    optimizer = make_optimizer("sgd", model)
    pretrain(model, optimizer)

    def run(seen: list, index: int) -> None:
        # Records what it saw; the main thread asserts (an assert in a thread is a warning).
        m = copy.deepcopy(model)
        o = make_optimizer("sgd", m)
        o.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # else it aliases the buffers
        before = full_state(m, o)
        loader = DataLoader(class_data(), batch_size=16)  # no shuffle: no shared RNG
        result = range_test(m, o, nn.CrossEntropyLoss(), loader, num_iter=40, progress=False)
        seen[index] = (result, before, full_state(m, o))

    alone: list = [None]
    run(alone, 0)
    together: list = [None, None]
    threads = [threading.Thread(target=run, args=(together, i)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for seen in [*alone, *together]:
        assert seen is not None, "a range test raised in its thread"
        result, before, after = seen
        assert isinstance(result, RangeTestResult) and len(result.lrs) >= 5
        np.testing.assert_array_equal(result.losses, alone[0][0].losses)
        assert_nested_equal(after, before)


def test_exp_sweep_is_geometric_from_start_to_end() -> None:
    model, optimizer, loader = regression_setup()
    result = range_test(
        model, optimizer, nn.MSELoss(), loader, start_lr=1e-5, end_lr=1e-2, num_iter=16,
        max_iter=16, progress=False,
    )  # fmt: skip
    assert result.stop_reason == "completed"
    assert (result.mode, result.loss_kind, result.num_iter) == ("exp", "train", 16)
    assert result.lrs[0] == 1e-5 and result.lrs[-1] == pytest.approx(1e-2, rel=1e-12)
    np.testing.assert_allclose(result.lrs[1:] / result.lrs[:-1], 10 ** (3 / 15), rtol=1e-12)
    assert result.losses.dtype == np.float64 and np.isfinite(result.losses).all()


def test_linear_sweep_is_evenly_spaced() -> None:
    model, optimizer, loader = regression_setup()
    result = range_test(
        model, optimizer, nn.MSELoss(), loader, start_lr=1e-4, end_lr=1e-2, num_iter=12,
        max_iter=12, mode="linear", progress=False,
    )  # fmt: skip
    assert result.mode == "linear" and len(result.lrs) == 12
    np.testing.assert_allclose(np.diff(result.lrs), (1e-2 - 1e-4) / 11, rtol=1e-9)
    assert result.lrs[-1] == pytest.approx(1e-2, rel=1e-12)


def test_param_groups_keep_their_lr_ratios() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[1].parameters(), "lr": 0.01},
        ]
    )
    seen: list[tuple[float, float]] = []

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"]))
        return nn.functional.mse_loss(outputs, targets)

    loader = DataLoader(regression_data(), batch_size=32)
    result = range_test(
        model,
        optimizer,
        loss_fn,
        loader,
        start_lr=1e-5,
        end_lr=1e-3,
        num_iter=8,
        max_iter=8,
        progress=False,
    )
    assert [lr0 for lr0, _ in seen] == result.lrs.tolist()
    np.testing.assert_allclose([lr1 / lr0 for lr0, lr1 in seen], 0.1, rtol=1e-12)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]


def test_a_blow_up_stops_early_as_diverged_and_records_the_blow_up() -> None:
    model, optimizer, loader = regression_setup()
    result = range_test(
        model, optimizer, nn.MSELoss(), loader, start_lr=1e-4, end_lr=10.0, num_iter=60,
        max_iter=60, progress=False,
    )  # fmt: skip
    assert result.stop_reason == "diverged"
    assert 2 <= len(result.lrs) < 60
    assert result.losses[-1] > 4.0 * result.losses[:-1].min()  # the stopping point is kept


def test_a_nan_or_inf_loss_stops_as_nonfinite() -> None:
    model, optimizer, loader = regression_setup()
    result = range_test(
        model, optimizer, nn.MSELoss(), loader, start_lr=1e-4, end_lr=1e6, num_iter=60,
        diverge_factor=math.inf, progress=False,
    )  # fmt: skip
    assert result.stop_reason == "nonfinite"
    assert not np.isfinite(result.losses[-1]) and np.isfinite(result.losses[:-1]).all()


@pytest.mark.parametrize("end_lr", [10.0, 1e-2])
def test_batched_divergence_checks_give_the_same_curve(end_lr: float) -> None:
    results = []
    for check_every in (1, 7):
        model, optimizer, loader = regression_setup()
        results.append(
            range_test(
                model,
                optimizer,
                nn.MSELoss(),
                loader,
                start_lr=1e-4,
                end_lr=end_lr,
                num_iter=60,
                check_every=check_every,
                progress=False,
            )  # fmt: skip
        )
    assert results[0].stop_reason == results[1].stop_reason
    np.testing.assert_array_equal(results[0].lrs, results[1].lrs)
    np.testing.assert_array_equal(results[0].losses, results[1].losses)


class Counting(Dataset):
    """Wraps a dataset and counts the examples drawn from it."""

    def __init__(self, data: Dataset) -> None:
        self.data, self.drawn = data, 0

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        self.drawn += 1
        return self.data[i]


def test_a_loader_shorter_than_the_sweep_is_cycled() -> None:
    model, optimizer, _ = regression_setup()
    data = Counting(regression_data(64))
    loader = DataLoader(data, batch_size=32)  # 2 batches for 10 steps
    result = range_test(
        model, optimizer, nn.MSELoss(), loader, start_lr=1e-5, end_lr=1e-3, num_iter=10,
        max_iter=10, progress=False,
    )  # fmt: skip
    assert result.stop_reason == "completed" and len(result.lrs) == 10
    assert data.drawn == 10 * 32


def test_accumulation_records_one_point_per_step_from_two_batches() -> None:
    model, optimizer, _ = regression_setup()
    data = Counting(regression_data(64))
    micro_losses: list[float] = []

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(outputs, targets)
        micro_losses.append(loss.item())
        return loss

    result = range_test(
        model, optimizer, loss_fn, DataLoader(data, batch_size=16), start_lr=1e-5, end_lr=1e-3,
        num_iter=6, max_iter=6, accumulation_steps=2, progress=False,
    )  # fmt: skip
    assert len(result.lrs) == 6 and data.drawn == 6 * 2 * 16
    expected = np.asarray(micro_losses).reshape(6, 2).mean(axis=1)
    np.testing.assert_allclose(result.losses, expected, rtol=1e-6)


def test_validation_mode_records_the_val_loss_in_eval_mode() -> None:
    model = classifier()
    optimizer = make_optimizer("sgd", model)
    modes: list[bool] = []

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        modes.append(model.training)
        return nn.functional.cross_entropy(outputs, targets)

    train = DataLoader(class_data(), batch_size=16, shuffle=True)
    val = DataLoader(class_data(32), batch_size=16)  # 2 batches per evaluation
    result = range_test(
        model,
        optimizer,
        loss_fn,
        train,
        end_lr=1e-2,
        num_iter=5,
        max_iter=5,
        val_loader=val,
        progress=False,
    )
    assert result.loss_kind == "val" and len(result.lrs) == 5
    assert modes == [True, False, False] * 5  # a train step, then the val pass in eval mode
    assert model.training


def dict_batches() -> DataLoader:
    class Dicts(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            return {"x": torch.randn(8), "y": 0}

    return DataLoader(Dicts(), batch_size=2)


def single_tensor_batches() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(4, 8)), batch_size=2)


def empty_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(0, 8), torch.zeros(0, dtype=torch.long)))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"start_lr": 0.0}, "start_lr"),
        ({"start_lr": -1e-3}, "start_lr"),
        ({"end_lr": 1e-8}, "end_lr"),
        ({"start_lr": 1e-3, "end_lr": 1e-3}, "end_lr"),
        ({"num_iter": 1}, "num_iter"),
        ({"mode": "cosine"}, "mode"),
        ({"diverge_factor": 1.0}, "diverge_factor"),
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"check_every": 0}, "check_every"),
        ({"amp": True}, "CUDA"),
        ({"amp": "yes"}, "amp"),
        ({"train_loader": empty_loader()}, "empty"),
        ({"train_loader": []}, "empty"),
        ({"val_loader": []}, "empty"),
        ({"train_loader": dict_batches()}, "collate_fn"),
        ({"train_loader": single_tensor_batches()}, "(inputs, targets)"),
        ({"loss_fn": nn.CrossEntropyLoss(reduction="none")}, "scalar"),
    ],
)
def test_bad_input_raises_a_value_error_naming_it(kwargs: dict, words: str) -> None:
    model = classifier()
    optimizer = make_optimizer("sgd", model)
    before = full_state(model, optimizer)
    args = {
        "loss_fn": nn.CrossEntropyLoss(),
        "train_loader": DataLoader(class_data(), batch_size=16),
        "progress": False,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        range_test(model, optimizer, **args)
    assert_nested_equal(full_state(model, optimizer), before)


def test_an_optimizer_with_a_scheduler_attached_is_refused() -> None:
    model = classifier()
    optimizer = make_optimizer("sgd", model)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    loader = DataLoader(class_data(), batch_size=16)
    with pytest.raises(ValueError, match="scheduler.*after the range test"):
        range_test(model, optimizer, nn.CrossEntropyLoss(), loader, progress=False)


def test_grads_of_params_the_optimizer_does_not_own_are_restored() -> None:
    model = classifier()
    optimizer = torch.optim.SGD(model[4].parameters(), lr=0.1, momentum=0.9)  # last layer only
    x, y = class_data()[:16]
    nn.functional.cross_entropy(model(x), y).backward()
    before = full_state(model, optimizer)

    loader = DataLoader(class_data(), batch_size=16)
    range_test(model, optimizer, nn.CrossEntropyLoss(), loader, num_iter=10, progress=False)

    assert_nested_equal(full_state(model, optimizer), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_amp_path_restores_state_and_the_cuda_random_stream() -> None:
    model = classifier().cuda()
    optimizer = make_optimizer("adamw", model)
    pretrain_loader = DataLoader(class_data(), batch_size=16)
    for x, y in pretrain_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
        optimizer.step()
    before = full_state(model, optimizer)
    cuda_rng = torch.cuda.get_rng_state_all()

    loader = DataLoader(class_data(), batch_size=16, shuffle=True)  # batches moved by the test
    result = range_test(
        model, optimizer, nn.CrossEntropyLoss(), loader, end_lr=1e3, num_iter=40, max_iter=40,
        progress=False,
    )  # fmt: skip

    # AdamW up to lr 1e3 blows up; on CPU (fp32) the stop came at step 32-33 of 40, at a
    # loss of 5-16, far from float16's overflow, so the AMP path must stop the same way.
    assert result.stop_reason == "diverged" and 20 <= len(result.lrs) < 40
    assert_nested_equal(full_state(model, optimizer), before)
    assert_nested_equal(torch.cuda.get_rng_state_all(), cuda_rng)


def _curve(losses, stop_reason="diverged"):
    from autolr import RangeTestResult

    lrs = np.geomspace(1e-3, 1.0, 6)[: len(losses)]
    return RangeTestResult(lrs, np.asarray(losses, float), stop_reason=stop_reason, num_iter=6)


def test_the_median_curve_runs_while_most_tests_run_and_takes_the_middle_stop():
    from autolr.range_test import median_curve

    short = _curve([3.0, 2.0, 9.0])  # diverged at the 3rd step
    middle = _curve([2.0, 1.0, 1.0, np.nan], stop_reason="nonfinite")
    full = _curve([1.0, 3.0, 2.0, 1.0, 1.0, 1.0], stop_reason="completed")
    median = median_curve([full, short, middle])
    assert median.lrs.size == 4 and median.stop_reason == "nonfinite"
    np.testing.assert_array_equal(median.losses, [2.0, 2.0, 2.0, np.inf])
    np.testing.assert_array_equal(median.lrs, full.lrs[:4])
    assert median_curve([short]) is short


def test_the_median_curve_refuses_tests_of_different_sweeps():
    from autolr import RangeTestResult
    from autolr.range_test import median_curve

    other = RangeTestResult(np.geomspace(1e-4, 1.0, 3), np.ones(3), stop_reason="completed")
    with pytest.raises(ValueError, match="same LRs"):
        median_curve([_curve([1.0, 1.0, 1.0]), other])
    with pytest.raises(ValueError, match="at least one"):
        median_curve([])


def test_a_task_range_test_with_repeats_is_the_median_of_seeded_tests():
    from autolr import Task
    from autolr.config import RangeTestConfig
    from autolr.range_test import median_curve, range_test_task

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    task = Task(lambda: torch.nn.Linear(4, 2), data, data, batch_size=16)
    cfg = RangeTestConfig(num_iter=20, max_iter=20, repeats=3, seed=5)
    singles = [
        range_test_task(
            task, RangeTestConfig(num_iter=20, max_iter=20, repeats=1, seed=s), progress=False
        )
        for s in (5, 6, 7)
    ]
    combined = range_test_task(task, cfg, progress=False)
    np.testing.assert_array_equal(combined.losses, median_curve(singles).losses)
    assert not np.array_equal(singles[0].losses, singles[1].losses)


# --- the adaptive extension -------------------------------------------------------


def extension_setup(num_iter: int, **kwargs) -> tuple[nn.Module, RangeTestResult]:
    """Least squares over 6 decades: at 50 or fewer steps the descent is under-resolved."""
    model, optimizer, loader = regression_setup()
    result = range_test(
        model, optimizer, nn.MSELoss(), loader, start_lr=1e-5, end_lr=10.0,
        num_iter=num_iter, progress=False, **kwargs,
    )  # fmt: skip
    return model, result


def test_an_unresolved_descent_extends_the_sweep_and_says_why() -> None:
    before = copy.deepcopy(regression_setup()[0].state_dict())
    model, result = extension_setup(50)
    assert result.num_iter == 100  # one doubling resolved it
    assert result.steps > len(result.lrs) and result.steps <= 3 * 50
    assert result.note.startswith("extended to 100 iterations after 50 iterations (")
    assert "standard errors deep" in result.note
    np.testing.assert_allclose(np.log10(result.lrs[1:] / result.lrs[:-1]), 6 / 99, rtol=1e-9)
    for key, value in model.state_dict().items():  # restored after every sweep
        assert torch.equal(value, before[key])


def test_the_extension_stops_at_its_budget_and_says_the_descent_is_still_unresolved() -> None:
    _, result = extension_setup(20)  # default budget 3 x 20 steps: one doubling
    assert result.num_iter == 40 and result.steps <= 60
    assert "unresolved at 40 iterations" in result.note and "max_iter=60" in result.note


def test_max_iter_equal_to_num_iter_turns_the_extension_off() -> None:
    _, result = extension_setup(50, max_iter=50)
    assert result.num_iter == 50 and result.steps == len(result.lrs)
    assert result.note.startswith("unresolved at 50 iterations")


def test_a_resolved_descent_is_not_extended() -> None:
    _, result = extension_setup(100)
    assert result.num_iter == 100 and result.steps == len(result.lrs) and result.note == ""


def test_max_iter_below_num_iter_is_refused() -> None:
    with pytest.raises(ValueError, match="max_iter must be None or an int >= 50"):
        extension_setup(50, max_iter=20)


def test_one_bad_batch_does_not_stop_the_sweep() -> None:
    # The stop reads the median of the last 5 losses: a single spike passes.
    model, optimizer, loader = regression_setup()
    calls = iter(range(10_000))

    def spiky(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(outputs, targets)
        return loss * 100.0 if next(calls) == 10 else loss

    result = range_test(
        model, optimizer, spiky, loader, start_lr=1e-5, end_lr=1e-3, num_iter=30,
        max_iter=30, progress=False,
    )  # fmt: skip
    assert result.stop_reason == "completed" and len(result.lrs) == 30
    assert result.losses[10] > 20 * result.losses[9]


def test_a_task_range_test_sees_the_batches_of_the_first_training_epoch():
    from autolr import Task
    from autolr.config import RangeTestConfig
    from autolr.range_test import range_test_task
    from autolr.training import train

    x = torch.arange(22.0).unsqueeze(1)  # 22 % 4 = 2: a partial last batch
    data = TensorDataset(x, x.squeeze(1).long() % 2)
    seen_inputs: list[list[float]] = []

    def model() -> nn.Module:
        return nn.Sequential(Recorder(seen_inputs), nn.Linear(1, 2))

    task = Task(model, data, data, batch_size=4)
    range_test_task(
        task, RangeTestConfig(num_iter=20, max_iter=20, repeats=1, seed=3), progress=False
    )
    swept = seen_inputs[:6]  # one epoch: 5 full batches and a partial one
    seen_inputs.clear()
    train(task, max_lr=0.1, min_lr=0.01, epochs=1, seed=3, progress=False)
    assert swept == seen_inputs[:6] and len(swept[-1]) == 2


class Recorder(nn.Module):
    """Records the (training-mode) inputs it sees, as lists."""

    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.log.append(x.squeeze(1).tolist())
        return x


class CountsSteps(nn.Module):
    """Adds one to a non-persistent buffer on every training forward (not in state_dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        return x


def test_non_persistent_buffers_and_optimizer_params_outside_the_model_are_restored() -> None:
    model = nn.Sequential(nn.Linear(8, 3), CountsSteps())
    temperature = nn.Parameter(torch.ones(()))  # learnable, in the optimizer, not the model
    optimizer = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)

    def tempered(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs / temperature, targets)

    loader = DataLoader(class_data(), batch_size=16)
    result = range_test(
        model, optimizer, tempered, loader, end_lr=1.0, num_iter=20, max_iter=20, progress=False
    )

    assert len(result.lrs) >= 10  # the buffer counted and the temperature moved meanwhile
    assert (model[1].seen.item(), temperature.item()) == (0.0, 1.0)


def test_a_submodule_in_eval_mode_stays_in_eval_mode_and_every_flag_is_restored() -> None:
    model = classifier()
    model[1].eval()  # a frozen BatchNorm: its running statistics must not move
    model[3].eval()  # and dropout off
    optimizer = make_optimizer("sgd", model)
    flags = [m.training for m in model.modules()]
    seen: list[tuple[bool, bool, bool]] = []
    model.register_forward_pre_hook(
        lambda m, _: seen.append((m.training, m[1].training, m[3].training))
    )

    loader = DataLoader(class_data(), batch_size=16)
    range_test(model, optimizer, nn.CrossEntropyLoss(), loader, num_iter=10, progress=False)

    assert seen and set(seen) == {(True, False, False)}
    assert [m.training for m in model.modules()] == flags


def learnable_data() -> TensorDataset:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 8, generator=g)
    return TensorDataset(x, (x @ torch.randn(8, 3, generator=g)).argmax(1))


def shifted_ce_sweep(shift: float) -> RangeTestResult:
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(
        learnable_data(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets) + shift  # same gradients

    return range_test(
        model, optimizer, loss_fn, loader, start_lr=1e-3, end_lr=1e3, num_iter=60, max_iter=60,
        progress=False,
    )  # fmt: skip


def test_a_constant_added_to_the_loss_changes_neither_the_stop_nor_the_pick() -> None:
    from autolr import select_lr

    base = shifted_ce_sweep(0.0)
    base_choice = select_lr(base)
    assert base.stop_reason == "diverged" and len(base.lrs) < 60
    for shift in (-10.0, 50.0):
        shifted = shifted_ce_sweep(shift)
        assert (shifted.stop_reason, len(shifted.lrs)) == (base.stop_reason, len(base.lrs))
        np.testing.assert_allclose(shifted.losses - shift, base.losses, atol=1e-4)
        choice = select_lr(shifted)
        assert choice.max_lr == pytest.approx(base_choice.max_lr, rel=1e-6)
        assert choice.confidence == pytest.approx(base_choice.confidence, rel=1e-5)
        assert choice.warnings == base_choice.warnings == ()


def test_a_loss_that_reached_zero_does_not_diverge_on_a_small_rise() -> None:
    # A hinge loss at exactly 0 then back at 0.11 has risen by a tenth of its descent.
    script = iter([*np.linspace(1.0, 0.0, 20), *[0.0] * 10, *[0.11] * 10, *[0.0] * 20])

    def hinge_like(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.sum() * 0.0 + next(script)

    model, optimizer, loader = regression_setup()
    result = range_test(
        model, optimizer, hinge_like, loader, start_lr=1e-5, end_lr=1e-3, num_iter=60,
        max_iter=60, progress=False,
    )  # fmt: skip
    assert (result.stop_reason, len(result.lrs)) == ("completed", 60)


def frozen_classifier() -> nn.Module:
    return classifier().requires_grad_(False)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("lbfgs", "LBFGS.step needs one"),
        ("frozen model", "none of the optimizer's 6 parameters requires grad"),
        ("device meta", "device=meta"),
        ("model on meta", "parameters on meta"),
        ("one-shot train iterator", "ran out after 4 batches"),
        ("one-shot val iterator", "val_loader is a one-shot iterator"),
    ],
)
def test_unusable_setups_raise_one_line_errors_that_say_what_is_wrong(case, words) -> None:
    model = frozen_classifier() if case == "frozen model" else classifier()
    if case == "model on meta":
        model = model.to("meta")
    optimizer = (
        torch.optim.LBFGS(model.parameters()) if case == "lbfgs" else make_optimizer("sgd", model)
    )
    batches = list(DataLoader(class_data(), batch_size=16))  # 4 batches
    args = {"train_loader": batches, "num_iter": 20, "max_iter": 20, "progress": False}
    if case == "device meta":
        args["device"] = "meta"
    if case == "one-shot train iterator":
        args["train_loader"] = iter(batches)
    if case == "one-shot val iterator":
        args["val_loader"] = iter(batches)
    with pytest.raises(ValueError, match=words) as caught:
        range_test(model, optimizer, nn.CrossEntropyLoss(), **args)
    assert "\n" not in str(caught.value)


@pytest.mark.filterwarnings("ignore:select_lr")  # a weak descent at 20 points: warned, picked
def test_a_short_sweep_is_not_cut_below_the_points_a_pick_needs() -> None:
    # num_iter=20 used to stop at step 18 and then read as "diverged at once".
    from autolr import select_lr

    model, optimizer, loader = regression_setup()
    result = range_test(
        model, optimizer, nn.MSELoss(), loader, start_lr=1e-2, end_lr=10.0, num_iter=20,
        max_iter=20, progress=False,
    )  # fmt: skip
    assert (result.stop_reason, len(result.lrs)) == ("diverged", 20)
    assert 1e-2 < select_lr(result).max_lr < 10.0


@pytest.mark.filterwarnings("ignore:select_lr")  # a noisy descent: low confidence, warned
def test_the_diverge_factor_does_not_move_the_pick_on_a_noisy_regression() -> None:
    # Batches of 8 with noise sd 1: the batch loss jumps 3-10x between steps.
    from autolr import select_lr

    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 8, generator=g)
    data = TensorDataset(x, x @ torch.randn(8, 1, generator=g) + torch.randn(256, 1, generator=g))
    picks = []
    for diverge_factor in (2.0, 20.0):
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = DataLoader(
            data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        result = range_test(
            model, optimizer, nn.MSELoss(), loader, start_lr=1e-5, end_lr=10.0, num_iter=100,
            max_iter=100, diverge_factor=diverge_factor, progress=False,
        )  # fmt: skip
        assert result.stop_reason == "diverged" and len(result.lrs) > 60
        picks.append(select_lr(result).max_lr)
    assert picks[0] == picks[1]


def test_the_progress_bar_is_for_terminals_and_writes_nothing_to_a_log(capsys) -> None:
    # in a log (CI, a Ray job, `> out.log`) a bar wrote a line per update
    model, optimizer, loader = regression_setup()
    range_test(model, optimizer, nn.MSELoss(), loader, num_iter=30, max_iter=30, progress=True)
    assert "range test" not in capsys.readouterr().err
