"""Lightning: autolr's range test on the module's own ``training_step``, then 1cycle.

Two ways in, as Lightning's own ``LearningRateFinder`` and ``Tuner.lr_find``:

- ``Trainer(callbacks=[AutoLR()])``: at fit start the range test runs on the
  trainer's optimizer and train dataloader, the model and optimizer are put back
  bit for bit, and a step-wise 1cycle with the picked ``max_lr``/``min_lr``
  replaces whatever scheduler ``configure_optimizers`` returned.
- ``choice = find_lr(trainer, module)``: the same test now (a fit that stops
  after it), returning the `autolr.LRChoice`; the next ``trainer.fit`` trains
  with its 1cycle.

Example:
    >>> import lightning as L  # doctest: +SKIP
    >>> trainer = L.Trainer(max_epochs=10, callbacks=[AutoLR()])  # doctest: +SKIP
    >>> trainer.fit(module, datamodule)  # doctest: +SKIP
    >>> trainer.callbacks[0].choice  # doctest: +SKIP
    LRChoice(max_lr=0.0312, min_lr=0.000871, confidence=0.84, method='changepoint', warnings=0)

The range test's steps are not logged (``self.log`` is silenced while it
runs) and skip gradient clipping; ``accumulate_grad_batches`` is honoured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.seed import isolate_rng
    from lightning.pytorch.utilities.types import LRSchedulerConfig
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        'autolr.integrations.lightning needs Lightning: pip install "autolr[lightning]"'
    ) from error
# Lightning's own finders end the fit with this after their test; `fit` then
# tears down and returns normally (lightning.pytorch.trainer.call).
from lightning.pytorch.utilities.exceptions import _TunerExitException

from autolr.errors import ArgumentError
from autolr.integrations._common import check_method, drop_scheduler_mark, sweep_and_pick
from autolr.results import LRChoice, RangeTestResult
from autolr.schedules import one_cycle

__all__ = ["AutoLR", "find_lr"]


class AutoLR(pl.Callback):
    """Run autolr at fit start and train with the 1cycle it picks.

    Args:
        method: the `autolr.select_lr` rule.
        choice: skip the range test and install this range (what `find_lr` does).
        pct_start: the share of steps the 1cycle climbs (`autolr.schedules.one_cycle`).
        range_test_options: passed to `autolr.range_test` (``num_iter``,
            ``start_lr``, ``end_lr``, ``repeats``, ``max_iter``, ``progress``...).

    After the fit starts, ``curve`` holds the `autolr.RangeTestResult` and
    ``choice`` the `autolr.LRChoice`.
    """

    def __init__(
        self,
        *,
        method: str = "changepoint",
        choice: LRChoice | None = None,
        pct_start: float = 0.3,
        **range_test_options: Any,
    ) -> None:
        check_method(method)
        if choice is not None and not isinstance(choice, LRChoice):
            raise TypeError(f"choice must be an autolr.LRChoice, but got {type(choice).__name__}.")
        self.method = method
        self.pct_start = pct_start
        self.options = {"progress": False, **range_test_options}
        self._given = choice
        self._exit = False  # find_lr: stop the fit once the range is known
        self.curve: RangeTestResult | None = None
        self.choice: LRChoice | None = choice

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = _the_optimizer(trainer, pl_module)
        drop_scheduler_mark(optimizer)  # configure_optimizers' scheduler is replaced below
        total_steps = trainer.estimated_stepping_batches  # also sets up the train dataloader
        if not math.isfinite(total_steps):
            raise ArgumentError(
                "AutoLR's 1cycle needs a finite training length, but the trainer has "
                f"max_epochs={trainer.max_epochs} and max_steps={trainer.max_steps}."
            )
        if self._given is None:
            self.curve, self.choice = sweep_and_pick(
                pl_module,
                optimizer,
                _train_loader(trainer),
                _training_step(trainer),  # the precision plugin's autocast runs inside it
                trainer.accumulate_grad_batches,
                self.method,
                self.options,
            )
        if self._exit:
            raise _TunerExitException()
        scheduler = one_cycle(
            optimizer,
            max_lr=self.choice.max_lr,
            min_lr=self.choice.min_lr,
            total_steps=int(total_steps),
            pct_start=self.pct_start,
        )
        trainer.strategy.lr_scheduler_configs = [
            LRSchedulerConfig(scheduler, name="autolr-1cycle", interval="step")
        ]


def find_lr(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    *,
    method: str = "changepoint",
    pct_start: float = 0.3,
    **range_test_options: Any,
) -> LRChoice:
    """Range-test ``module`` now and return the pick; the next ``trainer.fit`` uses its 1cycle.

    Like Lightning's ``Tuner(trainer).lr_find(module)``: a fit that stops after
    the range test. The module's weights and buffers and the random streams
    are as they were; the optimizer is the one ``configure_optimizers`` builds
    again at the next fit.
    """
    finder = AutoLR(method=method, pct_start=pct_start, **range_test_options)
    finder._exit = True
    trainer.callbacks.append(finder)
    try:
        with isolate_rng():  # the fit's own data setup draws from the streams too
            trainer.fit(module, datamodule=datamodule)
    finally:
        trainer.callbacks.remove(finder)
    if finder.choice is None:
        raise RuntimeError("the fit ended before AutoLR's range test ran")  # a bug, not user input
    # One installer: a second find_lr replaces the first one's.
    trainer.callbacks = [c for c in trainer.callbacks if not (isinstance(c, AutoLR) and c._given)]
    trainer.callbacks.append(AutoLR(choice=finder.choice, pct_start=pct_start))
    return finder.choice


def _the_optimizer(trainer: pl.Trainer, module: pl.LightningModule) -> torch.optim.Optimizer:
    if not module.automatic_optimization:
        raise ArgumentError(
            "AutoLR needs automatic optimization (the range test steps the optimizer itself), "
            "but the module sets automatic_optimization = False."
        )
    if len(trainer.optimizers) != 1:
        raise ArgumentError(
            f"AutoLR needs exactly one optimizer from configure_optimizers, "
            f"but got {len(trainer.optimizers)}."
        )
    return trainer.optimizers[0]


def _train_loader(trainer: pl.Trainer) -> Any:
    loader = trainer.train_dataloader
    if loader is None or isinstance(loader, (Mapping, list, tuple)):
        kind = "none" if loader is None else type(loader).__name__
        raise ArgumentError(f"AutoLR needs one train dataloader, but the trainer has {kind}.")
    return loader


def _training_step(trainer: pl.Trainer) -> Any:
    """``step_fn`` for the range test: the module's training_step, as the fit loop calls it."""
    index = 0

    def step(module: pl.LightningModule, batch: Any) -> torch.Tensor:
        nonlocal index
        batch = trainer.strategy.batch_to_device(batch)  # the module's transfer hooks
        with trainer.precision_plugin.train_step_context(), _unlogged(module):
            output = module.training_step(batch, index)
        index += 1
        loss = output["loss"] if isinstance(output, Mapping) else output
        if not isinstance(loss, torch.Tensor):
            raise ArgumentError(
                "AutoLR needs training_step to return the loss (a tensor or a dict with "
                f"'loss') on every batch, but batch {index - 1} gave {type(output).__name__}."
            )
        return loss

    return step


@contextmanager
def _unlogged(module: pl.LightningModule) -> Iterator[None]:
    """Silence self.log: logging is not allowed at fit start, and the test is no training."""

    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    module.log = module.log_dict = ignore  # instance attributes shadow the methods
    try:
        yield
    finally:
        del module.log, module.log_dict
