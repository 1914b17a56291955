import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autolr import Task
from autolr.training import evaluate, make_loaders, param_groups, set_bn_momentum, train


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: on a shared 2-core machine thread hand-offs cost 10x the math.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n: int = 96, seed: int = 0) -> TensorDataset:
    """Two Gaussian blobs in 8 dimensions, labels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 1.5 * (2 * y[:, None] - 1)
    return TensorDataset(x, y)


def bn_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def tiny_task(**kwargs) -> Task:
    defaults = {"model_fn": bn_mlp, "train_set": blobs(), "val_set": blobs(seed=1)}
    return Task(**(defaults | {"batch_size": 16, "name": "blobs"} | kwargs))


def snapshot_at(epoch: int, into: list):
    """An on_epoch that saves state() at ``epoch``; it stops there if told to."""

    def on_epoch(metrics, state, stop=False):
        if metrics.epoch == epoch:
            into.append(state())
            return stop

    return on_epoch


def test_training_lowers_the_loss_and_learns_a_separable_task():
    result = train(tiny_task(), max_lr=0.5, min_lr=0.02, epochs=4, progress=False)
    assert [m.epoch for m in result.history] == [1, 2, 3, 4]
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.val_metric > 0.9
    assert result.metric == "accuracy"
    assert result.history[-1].lr < 0.02  # 1cycle anneals below min_lr at the end


def test_resume_from_a_saved_state_reproduces_the_uninterrupted_run_exactly():
    task = tiny_task()
    kwargs = {"max_lr": 0.5, "min_lr": 0.02, "epochs": 4, "seed": 3, "progress": False}
    kwargs["device"] = "cpu"  # bit-exact; CUDA kernels need not be deterministic
    straight_end: list[dict] = []
    straight = train(task, on_epoch=snapshot_at(4, straight_end), **kwargs)

    saved: list[dict] = []
    stopped = train(task, on_epoch=lambda m, s: snapshot_at(2, saved)(m, s, stop=True), **kwargs)
    assert len(stopped.history) == 2
    buffer = io.BytesIO()
    torch.save(saved[0], buffer)  # as a Ray Tune checkpoint would
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed_end: list[dict] = []
    resumed = train(task, resume=checkpoint, on_epoch=snapshot_at(4, resumed_end), **kwargs)
    drop_time = [(m.epoch, m.train_loss, m.val_loss, m.val_metric, m.lr) for m in straight.history]
    assert [(m.epoch, m.train_loss, m.val_loss, m.val_metric, m.lr) for m in resumed.history] == (
        drop_time
    )
    for name, weight in straight_end[0]["model"].items():
        assert torch.equal(weight, resumed_end[0]["model"][name]), name


def test_resume_refuses_a_state_from_a_run_with_other_settings():
    task = tiny_task()
    saved: list[dict] = []
    train(task, max_lr=0.5, min_lr=0.02, epochs=2, progress=False, on_epoch=snapshot_at(1, saved))
    with pytest.raises(ValueError, match="max_lr"):
        train(task, max_lr=0.4, min_lr=0.02, epochs=2, progress=False, resume=saved[0])


def test_bn_momentum_reaches_every_batchnorm_layer():
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.BatchNorm1d(8))
    assert set_bn_momentum(model, 0.3) == 2
    assert [m.momentum for m in model if isinstance(m, nn.BatchNorm1d)] == [0.3, 0.3]
    assert set_bn_momentum(nn.Linear(2, 2), 0.3) == 0
    with pytest.raises(ValueError, match="bn_momentum must be in"):
        set_bn_momentum(model, 0.0)


def test_train_applies_bn_momentum_to_the_model_it_builds():
    built: list[nn.Module] = []

    def model_fn() -> nn.Module:
        built.append(bn_mlp())
        return built[-1]

    task = tiny_task(model_fn=model_fn)
    train(task, max_lr=0.5, min_lr=0.02, epochs=1, bn_momentum=0.05, progress=False)
    assert built[0][1].momentum == 0.05


def test_weight_decay_applies_to_weights_but_not_to_biases_or_batchnorm():
    groups = param_groups(bn_mlp(), weight_decay=1e-3)
    decayed = {tuple(p.shape) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-3 and decayed == {(16, 8), (2, 16)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4  # 2 biases, BN


def test_returning_true_from_on_epoch_stops_training():
    seen = []
    result = train(
        tiny_task(),
        max_lr=0.5,
        min_lr=0.02,
        epochs=5,
        progress=False,
        on_epoch=lambda metrics, state: seen.append(metrics.epoch) or metrics.epoch == 2,
    )
    assert seen == [1, 2]
    assert len(result.history) == 2


def test_a_custom_metric_is_averaged_over_validation_batches_by_size():
    def top1(outputs, targets):
        return (outputs.argmax(dim=1) == targets).float().mean().item()

    kwargs = {"max_lr": 0.5, "min_lr": 0.02, "epochs": 2, "progress": False}
    custom = train(tiny_task(metric=top1, mode="max", batch_size=20), **kwargs)  # 96 = 4 x 20 + 16
    builtin = train(tiny_task(batch_size=20), **kwargs)
    assert custom.metric == "top1"
    assert custom.val_metric == pytest.approx(builtin.val_metric)


def test_evaluate_with_loss_metric_reports_the_validation_loss_twice():
    task = tiny_task(metric="loss")
    torch.manual_seed(0)
    model = bn_mlp()
    _, val_loader = make_loaders(task, seed=0)
    val_loss, val_metric = evaluate(model, val_loader, task, "cpu")
    model.eval()
    x, y = task.val_set.tensors
    assert val_loss == val_metric == pytest.approx(nn.functional.cross_entropy(model(x), y).item())


def test_a_lone_last_training_example_is_dropped_so_batchnorm_never_sees_one():
    assert len(make_loaders(tiny_task(train_set=blobs(33)), seed=0)[0]) == 2  # 16 + 16 (+1)
    assert len(make_loaders(tiny_task(train_set=blobs(34)), seed=0)[0]) == 3  # 16 + 16 + 2
    train(tiny_task(train_set=blobs(33)), max_lr=0.5, min_lr=0.02, epochs=1, progress=False)


def test_a_nonfinite_training_loss_stops_with_the_epoch_and_lr():
    data = blobs()
    data.tensors[0][5, 0] = math.nan
    with pytest.raises(ValueError, match=r"became nan at lr=0\.0\d* in epoch 1 of 2"):
        train(tiny_task(train_set=data), max_lr=0.5, min_lr=0.02, epochs=2, progress=False)


def test_train_rejects_a_bad_epoch_count():
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        train(tiny_task(), max_lr=0.5, min_lr=0.02, epochs=0, progress=False)


def plain_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


class StepLog:
    """An SGD factory that records the LR of every optimizer step it sees."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def __call__(self, params, lr, weight_decay):
        optimizer = torch.optim.SGD(  # the "sgd" task optimizer
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
        optimizer.register_step_post_hook(
            lambda opt, *_: self.lrs.append(opt.param_groups[0]["lr"])
        )
        return optimizer


def onecycle_lrs(max_lr: float, min_lr: float, total_steps: int) -> list[float]:
    """The LR of each step of 1cycle over ``total_steps`` optimizer steps."""
    from autolr.schedules import make_scheduler

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=min_lr)
    schedule = make_scheduler(
        "onecycle", optimizer, max_lr=max_lr, min_lr=min_lr, total_steps=total_steps
    )
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_accumulation_steps_once_per_k_batches_on_a_schedule_of_optimizer_steps():
    # 96 examples in batches of 16: 6 batches an epoch, so steps of 4 + 2 batches.
    kwargs = {"max_lr": 0.5, "min_lr": 0.02, "epochs": 2, "progress": False}
    steps = StepLog()
    accumulated = train(
        tiny_task(model_fn=plain_mlp, optimizer=steps), accumulation_steps=4, **kwargs
    )
    assert steps.lrs == pytest.approx(onecycle_lrs(0.5, 0.02, total_steps=2 * 2), rel=1e-12)

    # One effective batch: 4 x 16 accumulated is one batch of 64 (and 2 x 16 one of 32),
    # as the same shuffle deals the same examples to both.
    big = train(tiny_task(model_fn=plain_mlp, batch_size=64), **kwargs)
    assert accumulated.val_loss == pytest.approx(big.val_loss, rel=1e-5)
    one_by_one = train(tiny_task(model_fn=plain_mlp), **kwargs)
    assert one_by_one.val_loss != pytest.approx(big.val_loss, rel=1e-3)


def test_the_threads_setting_holds_while_training_and_is_restored_after():
    seen = []
    train(
        tiny_task(),
        max_lr=0.5,
        min_lr=0.02,
        epochs=1,
        threads=2,
        on_epoch=lambda *_: seen.append(torch.get_num_threads()),
        progress=False,
    )
    assert seen == [2] and torch.get_num_threads() == 1  # the fixture's setting


def test_the_range_test_steps_through_the_batches_of_trainings_first_epoch():
    """One builder (`autolr.training.fresh`) starts both: same shuffle, same drop rule."""
    from autolr.config import RangeTestConfig
    from autolr.range_test import range_test_task

    seen: dict[str, list] = {"range test": [], "training": []}
    into = seen["range test"]

    class Recording(nn.Module):  # records each training batch it is given
        def __init__(self):
            super().__init__()
            self.net = bn_mlp()

        def forward(self, x):
            if self.training:
                into.append(x.clone())
            return self.net(x)

    task = tiny_task(model_fn=Recording, train_set=blobs(402))  # 25 batches of 16, one of 2
    cfg = RangeTestConfig(num_iter=20, max_iter=20, repeats=1, seed=3, end_lr=1e-3)
    range_test_task(task, cfg, progress=False)
    into = seen["training"]
    train(task, max_lr=1e-3, min_lr=1e-4, epochs=1, seed=3, progress=False)
    assert len(seen["range test"]) == 20 and len(seen["training"]) == 26
    for a, b in zip(seen["range test"], seen["training"], strict=False):
        assert torch.equal(a, b)
