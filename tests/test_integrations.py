"""Where users already train: the core's step hook, notebooks, Lightning, Hugging Face."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autolr import RangeTestResult, range_test, select_lr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def one_cycle_lrs(choice, total_steps: int) -> list[float]:
    """The LR before each step of autolr's 1cycle over ``choice``: what training must follow."""
    from autolr.schedules import one_cycle

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    scheduler = one_cycle(
        optimizer, max_lr=choice.max_lr, min_lr=choice.min_lr, total_steps=total_steps
    )
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_plot_in_a_notebook_draws_on_a_pyplot_figure_the_notebook_shows(svg_backend):
    import matplotlib.pyplot as plt  # a notebook's inline backend imports it

    ax = synthetic_curve().plot()
    assert ax.figure.number in plt.get_fignums()
    plt.close(ax.figure)
    assert matplotlib.get_backend() == "svg"


# --- Lightning -------------------------------------------------------------------------------


def lightning_module(optimizers: str):
    """A tiny module whose configure_optimizers returns ``optimizers``' shape, logging as usual."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2)
            )

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)  # not allowed at fit start: the test silences it
            return {"loss": loss}

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            if optimizers == "optimizer":
                return optimizer
            if optimizers == "list":
                return [optimizer]
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
            if optimizers == "dict":
                return {"optimizer": optimizer, "lr_scheduler": scheduler}
            return [optimizer], [scheduler]

        def train_dataloader(self):
            data = DictData()
            pairs = torch.utils.data.TensorDataset(data.x, data.y)
            return DataLoader(pairs, batch_size=16, shuffle=True)  # 4 steps an epoch

    return Tiny()


def lightning_trainer(*callbacks):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def lightning_callbacks():
    """Callbacks that snapshot the state before AutoLR and compare it after; record the LRs."""
    import lightning.pytorch as pl

    class Before(pl.Callback):
        def on_fit_start(self, trainer, module):
            # Lightning's data setup draws from the torch stream; AutoLR runs it
            # first too, so the snapshot is taken after it.
            _ = trainer.estimated_stepping_batches
            self.state = snapshot(module, trainer.optimizers[0])
            self.momenta = {k: dict(v) for k, v in trainer.optimizers[0].state.items()}

    class After(pl.Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_fit_start(self, trainer, module):
            self.state = snapshot(module, trainer.optimizers[0])
            self.momenta = {k: dict(v) for k, v in trainer.optimizers[0].state.items()}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    return Before(), After()


@pytest.mark.parametrize("optimizers", ["optimizer", "dict", "lists"])
def test_lightning_callback_picks_restores_and_trains_with_the_one_cycle(optimizers):
    from autolr.integrations.lightning import AutoLR

    before, after = lightning_callbacks()
    autolr_callback = AutoLR(num_iter=60)
    module = lightning_module(optimizers)
    lightning_trainer(before, autolr_callback, after).fit(module)
    choice = autolr_callback.choice
    assert choice.min_lr < choice.max_lr and autolr_callback.curve.lrs.size > 20
    # Bit for bit: weights, BatchNorm statistics, RNG; the optimizer's state is
    # empty before the first step, and the groups' lr and momentum are the 1cycle's now.
    assert_same({**before.state, "groups": []}, {**after.state, "groups": []})
    assert before.momenta == after.momenta == {}
    assert after.lrs == pytest.approx(one_cycle_lrs(choice, 12))  # the user's StepLR is gone


def test_lightning_find_lr_returns_the_pick_and_the_next_fit_trains_with_it():
    from autolr.integrations.lightning import find_lr

    module = lightning_module("list")
    before = snapshot(module, torch.optim.SGD(module.parameters(), lr=0.1))
    _, after = lightning_callbacks()
    trainer = lightning_trainer(after)
    choice = find_lr(trainer, module, num_iter=60)
    assert_same(before, snapshot(module, torch.optim.SGD(module.parameters(), lr=0.1)))
    assert after.lrs == []  # the finder's fit stopped before training
    trainer.fit(module)
    assert after.lrs == pytest.approx(one_cycle_lrs(choice, 12))


def test_lightning_endless_training_is_refused_in_one_line():
    from autolr.integrations.lightning import AutoLR

    trainer = lightning_trainer(AutoLR(num_iter=10))
    trainer.fit_loop.max_epochs = -1  # Trainer(max_epochs=-1): train until stopped
    with pytest.raises(ValueError, match="needs a finite training length") as error:
        trainer.fit(lightning_module("optimizer"))
    assert "\n" not in str(error.value)


def test_integrations_refuse_an_unknown_method_before_any_work():
    from autolr.integrations import lightning, transformers

    with pytest.raises(ValueError, match="method must be one of"):
        lightning.AutoLR(method="valey")
    with pytest.raises(ValueError, match="method must be one of"):
        transformers.find_lr(object.__new__(transformers.Trainer), method="valey")


def test_lightning_manual_optimization_is_refused_in_one_line():
    from autolr.integrations.lightning import AutoLR

    module = lightning_module("optimizer")
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="needs automatic optimization") as error:
        lightning_trainer(AutoLR(num_iter=10)).fit(module)
    assert "\n" not in str(error.value)


# --- Hugging Face ----------------------------------------------------------------------------


def test_transformers_find_lr_picks_restores_and_trains_with_the_one_cycle(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the model is built from a config: no download
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from autolr.integrations.transformers import find_lr

    class Record(TrainerCallback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        vocab_size=100, max_position_embeddings=16,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (32, 8), generator=g)
    data = [
        {"input_ids": row, "attention_mask": torch.ones(8, dtype=torch.long), "labels": label}
        for row, label in zip(ids, (ids[:, 0] > 50).long(), strict=True)
    ]  # dict items; the model computes the loss from "labels"
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    record = Record()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[record])
    before = snapshot(model, trainer.create_optimizer())
    choice = find_lr(trainer, num_iter=60)
    assert_same(before, snapshot(model, trainer.optimizer))
    assert trainer.optimizer.state == {} and trainer.autolr_curve.lrs.size > 20
    trainer.train()
    assert record.lrs == pytest.approx(one_cycle_lrs(choice, 12))  # 4 steps an epoch


def test_lightning_fits_confirm_the_pick_with_the_callback_given_each_range():
    """The README's pattern: confirm_lr calls a fit that hands AutoLR the scaled range."""
    import dataclasses

    from autolr import confirm_lr
    from autolr.integrations.lightning import AutoLR, find_lr

    choice = find_lr(lightning_trainer(), lightning_module("optimizer"), num_iter=60)
    ran: list[tuple[float, list[float]]] = []

    def fit(max_lr: float, min_lr: float) -> float:
        _, after = lightning_callbacks()
        given = AutoLR(choice=dataclasses.replace(choice, max_lr=max_lr, min_lr=min_lr))
        trainer = lightning_trainer(given, after)
        trainer.fit(lightning_module("optimizer"))
        ran.append((max_lr, after.lrs))
        return trainer.callback_metrics["train_loss"].item()

    confirmed = confirm_lr(choice, fit, higher_is_better=False, scales=(0.5, 1, 2), progress=False)
    assert [t.scale for t in confirmed.trials][:3] == [1, 0.5, 2]
    for max_lr, lrs in ran:  # each fit trained its own range's 1cycle
        scaled = dataclasses.replace(
            choice, max_lr=max_lr, min_lr=max_lr * choice.min_lr / choice.max_lr
        )
        assert lrs == pytest.approx(one_cycle_lrs(scaled, 12))
    assert confirmed.metric == min(t.metric for t in confirmed.trials)
