"""Where users already train: the core's step hook, notebooks, Lightning, Hugging Face."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autolr import RangeTestResult, range_test, select_lr


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared machine they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DictData(Dataset):
    """Items are dicts, as Hugging Face datasets give them."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.x[i], "labels": self.y[i]}


class DictModel(nn.Module):
    """``model(**batch)`` returning a dict with the loss inside, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(16, 2)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.head(self.net(features))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def dict_setup() -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    torch.manual_seed(0)
    model = DictModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, DataLoader(DictData(), batch_size=16, shuffle=True)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["model"].keys() == after["model"].keys()
    for key, value in before["model"].items():
        assert torch.equal(value, after["model"][key]), key
    assert before["groups"] == after["groups"]
    assert torch.equal(before["rng"], after["rng"])


def dict_step(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch)["loss"]


def test_step_fn_runs_the_range_test_on_dict_batches_and_a_loss_inside_the_output():
    model, optimizer, loader = dict_setup()
    before = snapshot(model, optimizer)
    curve = range_test(
        model, optimizer, None, loader, step_fn=dict_step, num_iter=30, max_iter=30, progress=False
    )
    assert curve.lrs.size >= 10 and np.isfinite(curve.losses).all()
    assert_same(before, snapshot(model, optimizer))
    # The hook's val pass: one mean per step over the dict batches.
    val = range_test(
        model, optimizer, None, loader, step_fn=dict_step, val_loader=loader,
        num_iter=10, max_iter=10, progress=False,
    )  # fmt: skip
    assert val.loss_kind == "val" and np.isfinite(val.losses).all()


def test_a_dict_batch_without_step_fn_names_the_hook():
    model, optimizer, loader = dict_setup()
    with pytest.raises(ValueError, match="step_fn") as error:
        range_test(model, optimizer, nn.CrossEntropyLoss(), loader, num_iter=5, progress=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("loss_fn, step_fn", [(None, None), (nn.CrossEntropyLoss(), dict_step)])
def test_range_test_takes_exactly_one_of_loss_fn_and_step_fn(loss_fn, step_fn):
    model, optimizer, loader = dict_setup()
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        range_test(model, optimizer, loss_fn, loader, step_fn=step_fn, progress=False)


def test_step_fn_that_returns_a_dict_says_it_must_return_a_scalar():
    model, optimizer, loader = dict_setup()
    with pytest.raises(ValueError, match="must return a scalar tensor, but returned dict"):
        range_test(
            model, optimizer, None, loader, step_fn=lambda m, b: m(**b), num_iter=5, progress=False
        )


def test_repeats_take_the_median_of_differently_shuffled_sweeps_and_keep_the_callers_rng():
    model, optimizer, loader = dict_setup()
    options = dict(step_fn=dict_step, num_iter=20, max_iter=20, progress=False, end_lr=1.0)
    before = snapshot(model, optimizer)
    once = range_test(model, optimizer, None, loader, **options)
    thrice = range_test(model, optimizer, None, loader, repeats=3, **options)
    assert_same(before, snapshot(model, optimizer))
    assert thrice.steps == 3 * once.steps == 60
    assert np.array_equal(thrice.lrs, once.lrs)
    assert not np.array_equal(thrice.losses, once.losses)  # the repeats saw other batch orders
    again = range_test(model, optimizer, None, loader, repeats=3, **options)
    assert np.array_equal(again.losses, thrice.losses)  # seeded from the caller's stream
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        range_test(model, optimizer, None, loader, **{**options, "repeats": 0})


def synthetic_curve() -> RangeTestResult:
    lrs = np.logspace(-7, 1, 100)
    x = np.log10(lrs)
    loss = 2.3 - 0.9 * (1 + np.tanh(x + 4)) + np.where(x > -1, 10 ** (4 * (x + 1)) - 1, 0)
    noise = 1 + 0.03 * np.random.default_rng(0).standard_normal(100)
    return RangeTestResult(lrs, loss * noise, stop_reason="diverged", steps=100)


def test_reprs_are_one_short_line():
    curve = synthetic_curve()
    choice = select_lr(curve)
    assert repr(curve) == (
        "RangeTestResult(points=100, lr=1e-07..10, stop_reason='diverged', steps=100)"
    )
    assert repr(choice).startswith(f"LRChoice(max_lr={choice.max_lr:.3g}, min_lr=")
    assert len(repr(choice)) < 200 and "\n" not in repr(choice)


@pytest.fixture
def svg_backend():
    """A backend that is not Agg, as a notebook's inline one is not: a switch would show."""
    original = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(original)


def test_plot_returns_axes_and_leaves_the_backend_alone(svg_backend, tmp_path):
    from autolr.plotting import plot_range_test

    curve = synthetic_curve()
    choice = select_lr(curve)
    ax = curve.plot(choice)
    assert ax.get_xscale() == "log" and ax.get_legend() is not None
    assert curve.plot(ax=ax) is ax
    plot_range_test(curve, choice, tmp_path / "curve.png")  # the pipeline's file plot too
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert matplotlib.get_backend() == "svg"
