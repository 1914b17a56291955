"""Hugging Face ``Trainer``: autolr's range test on the Trainer's own loss, then 1cycle.

Hugging Face has no LR finder: its maintainers declined one because finders
suggest ~1e-3 where transformers want ~1e-5 (transformers#16013). autolr's
pick backs off from where the loss blows up on *this* model and data, and the
search validates it by training.

``find_lr(trainer)`` runs `autolr.range_test` on the Trainer's optimizer
(``create_optimizer``: its param groups, no decay on biases and norms), its
train dataloader (dict batches, its collator) and ``compute_loss`` (the loss
from the model's output, label smoothing included), puts the model and
optimizer back bit for bit, and makes the Trainer's ``create_scheduler`` hook
build a step-wise 1cycle with the picked ``max_lr``/``min_lr`` over the
number of steps ``train()`` computes.

Example:
    >>> trainer = Trainer(model=model, args=args, train_dataset=data)  # doctest: +SKIP
    >>> choice = find_lr(trainer)  # doctest: +SKIP
    >>> trainer.train()  # trains with 1cycle over [choice.min_lr, choice.max_lr]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        'autolr.integrations.transformers needs transformers: pip install "autolr[transformers]"'
    ) from error

from autolr.integrations._common import check_method, drop_scheduler_mark, sweep_and_pick
from autolr.results import LRChoice
from autolr.schedules import one_cycle

__all__ = ["find_lr", "install_one_cycle"]


def find_lr(
    trainer: Trainer,
    *,
    method: str = "changepoint",
    pct_start: float = 0.3,
    **range_test_options: Any,
) -> LRChoice:
    """Range-test ``trainer``'s model, install the 1cycle on it and return the pick.

    ``range_test_options`` go to `autolr.range_test` (``num_iter``,
    ``start_lr``, ``end_lr``, ``repeats``, ``max_iter``, ``progress``...);
    ``gradient_accumulation_steps`` comes from the Trainer's arguments. The
    curve is ``trainer.autolr_curve`` afterwards, for ``.plot()``.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"find_lr needs a transformers.Trainer, but got {type(trainer).__name__}.")
    check_method(method)
    trainer.lr_scheduler = None  # one passed as optimizers=(opt, sched) is replaced by the 1cycle
    optimizer = trainer.create_optimizer()
    drop_scheduler_mark(optimizer)

    def step(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        with trainer.compute_loss_context_manager():
            return trainer.compute_loss(model, batch)

    curve, choice = sweep_and_pick(
        trainer.model,
        optimizer,
        trainer.get_train_dataloader(),
        step,  # the Trainer's own mixed precision, if any, wraps compute_loss
        trainer.args.gradient_accumulation_steps,
        method,
        range_test_options,
    )
    trainer.autolr_curve = curve
    install_one_cycle(trainer, choice, pct_start=pct_start)
    return choice


def install_one_cycle(trainer: Trainer, choice: LRChoice, *, pct_start: float = 0.3) -> None:
    """Make ``trainer.train()`` schedule its optimizer with 1cycle over ``choice``'s range.

    Through the Trainer's ``create_scheduler`` hook, so the cycle spans the steps
    ``train()`` itself computes (epochs or ``max_steps``, accumulation included)
    and a second ``train()`` gets a fresh cycle.
    """

    def create_scheduler(
        num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        trainer.lr_scheduler = one_cycle(
            optimizer or trainer.optimizer,
            max_lr=choice.max_lr,
            min_lr=choice.min_lr,
            total_steps=num_training_steps,
            pct_start=pct_start,
        )
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler  # the instance's hook, as a subclass would
