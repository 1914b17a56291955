"""README's fastai recipe: fastai's lr_find feeds autolr.select_lr, fit_one_cycle trains.

fastai is no extra of autolr; this runs where it is installed (it installs
beside torch==2.13.0 when torch is named: `pip install fastai torch==2.13.0`).
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autolr

pytest.importorskip("fastai")
from fastai.callback.core import Callback  # noqa: E402
from fastai.callback.schedule import fit_one_cycle, lr_find  # noqa: E402, F401  (patch Learner)
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.metrics import accuracy  # noqa: E402


class RawLosses(Callback):
    """Each training batch's LR and loss. The Recorder keeps an exponential moving average
    (beta 0.98), whose lag moves the curve to higher LRs."""

    def before_fit(self):
        self.lrs, self.losses = [], []

    def after_batch(self):
        if self.training:
            self.lrs.append(self.opt.hypers[-1]["lr"])
            self.losses.append(self.loss.item())


def blobs() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 20, generator=g)
    y = (x[:, :5].sum(1) > 0).long()
    train = DataLoader(TensorDataset(x[:1536], y[:1536]), batch_size=32, shuffle=True)
    return train, DataLoader(TensorDataset(x[1536:], y[1536:]), batch_size=256)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))


def test_fastais_lr_find_feeds_select_lr_and_fit_one_cycle_trains_over_its_range():
    train, valid = blobs()
    learn = Learner(
        DataLoaders(train, valid), mlp(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy
    )
    raw = RawLosses()
    with learn.no_logging(), learn.no_bar(), learn.added_cbs(raw):
        learn.lr_find(start_lr=1e-7, end_lr=10, num_it=100, show_plot=False)
    stop = "diverged" if len(raw.lrs) < 100 else "completed"  # lr_find stops at divergence
    curve = autolr.RangeTestResult(raw.lrs, raw.losses, stop_reason=stop)
    choice = autolr.select_lr(curve)

    # the same pick as autolr's own range test of the model with fastai's optimizer (Adam)
    model = mlp()
    own = autolr.select_lr(
        autolr.range_test(
            model,
            torch.optim.Adam(model.parameters()),
            nn.CrossEntropyLoss(),
            train,
            start_lr=1e-7,
            end_lr=10,
            num_iter=100,
            progress=False,
        )
    )
    assert choice.max_lr == pytest.approx(own.max_lr, rel=0.5)

    with learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(3, lr_max=choice.max_lr, div=choice.max_lr / choice.min_lr)
    assert learn.validate()[1] > 0.9  # accuracy
