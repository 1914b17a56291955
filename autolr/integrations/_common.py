"""What both integrations do around the framework's own step: check, free, test, pick."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from autolr.errors import ArgumentError
from autolr.range_test import range_test
from autolr.results import LRChoice, RangeTestResult
from autolr.selection import METHODS, select_lr


def check_method(method: str) -> None:
    """Refuse an unknown selection method now, not after the fit's setup or the test."""
    if method not in METHODS:
        raise ArgumentError(f"method must be one of {METHODS}, but got {method=}.")


def drop_scheduler_mark(optimizer: torch.optim.Optimizer) -> None:
    """Forget the scheduler the user built (the 1cycle replaces it): its ``initial_lr``
    mark on the groups would make the range test refuse the optimizer."""
    for group in optimizer.param_groups:
        group.pop("initial_lr", None)


def sweep_and_pick(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    step: Callable,
    accumulation_steps: int,
    method: str,
    options: dict[str, Any],
) -> tuple[RangeTestResult, LRChoice]:
    """`autolr.range_test` on the framework's step, then `autolr.select_lr`."""
    curve = range_test(
        model,
        optimizer,
        None,
        loader,
        step_fn=step,
        accumulation_steps=accumulation_steps,
        amp=False,  # the framework's own mixed precision, if any, runs inside its step
        **{"progress": False, **options},
    )
    return curve, select_lr(curve, method)
