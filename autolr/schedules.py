"""1cycle and cyclical learning-rate schedules, built on torch's schedulers.

All are stepped once per optimizer step (not per epoch). The LR range comes
from the range test: the cycle climbs from ``min_lr`` to ``max_lr`` and back.
``"step"`` is the hand-tuned baseline that 1cycle is measured against.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    >>> sched = make_scheduler("onecycle", opt, max_lr=0.5, min_lr=0.02, total_steps=100)
    >>> round(opt.param_groups[0]["lr"], 6)
    0.02
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import CyclicLR, LRScheduler, MultiStepLR, OneCycleLR

from autolr._checks import check_int
from autolr.errors import ArgumentError

# Cyclical momentum (Smith 2018): high momentum while the LR is low, low while it is high.
# For Adam/AdamW torch cycles beta1 over the same range.
BASE_MOMENTUM = 0.85
MAX_MOMENTUM = 0.95

SCHEDULES = ("onecycle", "onecycle3", "triangular", "triangular2", "exp_range", "step")
CLR_MODES = ("triangular", "triangular2", "exp_range")


def _momentum_cycle(optimizer: torch.optim.Optimizer, cycle: bool) -> dict[str, Any]:
    """torch's cyclical-momentum keywords: the range above, where the optimizer has one."""
    return {
        "cycle_momentum": cycle and has_momentum(optimizer),
        "base_momentum": BASE_MOMENTUM,
        "max_momentum": MAX_MOMENTUM,
    }


def has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    """Whether torch can cycle this optimizer's momentum (SGD's, or beta1 of Adam-likes).

    SGD with ``momentum=0`` counts as without: cycling would switch momentum on.
    """
    if "betas" in optimizer.defaults:
        return True
    return "momentum" in optimizer.defaults and any(
        group.get("momentum", 0.0) > 0.0 for group in optimizer.param_groups
    )


def _check_lr_range(min_lr: float, max_lr: float) -> None:
    if not (math.isfinite(max_lr) and 0.0 < min_lr < max_lr):
        raise ArgumentError(
            f"the schedule needs 0 < min_lr < max_lr, but got {min_lr=}, {max_lr=}."
        )


# 9 keywords: torch OneCycleLR's knobs (pct_start, final_div_factor, three_phase,
# momentum cycling, the annealing), with min_lr in place of its div_factor.
def one_cycle(
    optimizer: torch.optim.Optimizer,
    *,
    max_lr: float,
    min_lr: float,
    total_steps: int,
    three_phase: bool = False,
    anneal: str = "cos",
    pct_start: float = 0.3,
    final_div_factor: float = 1e4,
    cycle_momentum: bool = True,
) -> OneCycleLR:
    """1cycle (Smith & Topin 2018) over ``total_steps`` optimizer steps.

    The LR starts at ``min_lr``, rises to ``max_lr`` over the first
    ``pct_start`` of the steps, then anneals to ``min_lr / final_div_factor``.
    With ``three_phase`` it first comes back down to ``min_lr`` symmetrically
    and only the last phase anneals further, as in the Super-Convergence paper.
    Momentum (SGD) or beta1 (Adam, AdamW) cycles inversely between 0.95 and
    0.85; an optimizer without momentum just keeps its own.
    """
    _check_lr_range(min_lr, max_lr)
    check_int("total_steps", total_steps, 1)
    if not 0.0 < pct_start < 1.0:
        raise ArgumentError(f"pct_start must be in (0, 1), but got {pct_start=}.")
    if three_phase and pct_start >= 0.5:
        raise ArgumentError(f"a three-phase cycle needs pct_start < 0.5, but got {pct_start=}.")
    if anneal not in ("cos", "linear"):
        raise ArgumentError(f"anneal must be 'cos' or 'linear', but got {anneal=}.")
    if not final_div_factor >= 1.0:
        raise ArgumentError(f"final_div_factor must be >= 1, but got {final_div_factor=}.")
    return OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=float(pct_start),  # torch rejects an int here
        anneal_strategy=anneal,
        div_factor=max_lr / min_lr,  # so the cycle starts at min_lr
        final_div_factor=final_div_factor,
        three_phase=three_phase,
        **_momentum_cycle(optimizer, cycle_momentum),
    )


def cyclic(
    optimizer: torch.optim.Optimizer,
    *,
    base_lr: float,
    max_lr: float,
    step_size_up: int,
    mode: str = "triangular",
    gamma: float = 1.0,
    cycle_momentum: bool = True,
) -> CyclicLR:
    """Cyclical learning rates (Smith 2017) between ``base_lr`` and ``max_lr``.

    A cycle is ``2 * step_size_up`` optimizer steps. ``mode`` is
    ``"triangular"`` (constant amplitude), ``"triangular2"`` (amplitude halves
    each cycle) or ``"exp_range"`` (amplitude scaled by ``gamma**step``).
    """
    _check_lr_range(base_lr, max_lr)
    check_int("step_size_up", step_size_up, 1)
    if mode not in CLR_MODES:
        raise ArgumentError(f"mode must be one of {CLR_MODES}, but got {mode=}.")
    if not 0.0 < gamma <= 1.0:
        raise ArgumentError(f"gamma must be in (0, 1], but got {gamma=}.")
    return CyclicLR(
        optimizer,
        base_lr=base_lr,
        max_lr=max_lr,
        step_size_up=step_size_up,
        mode=mode,
        gamma=gamma,
        **_momentum_cycle(optimizer, cycle_momentum),
    )


def step_decay(
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    total_steps: int,
    milestones: tuple[float, ...] = (0.5, 0.75),
    gamma: float = 0.1,
) -> MultiStepLR:
    """The step schedule people train with by hand: ``lr``, times ``gamma`` at each milestone.

    ``milestones`` are fractions of ``total_steps``; the default divides the LR
    by 10 at 50% and 75% of the run (He et al. 2016). Sets ``lr`` on the
    optimizer, since torch's MultiStepLR starts from the optimizer's own LR.
    """
    if not (math.isfinite(lr) and lr > 0.0):
        raise ArgumentError(f"lr must be a finite number > 0, but got {lr=}.")
    check_int("total_steps", total_steps, 1)
    if not all(0.0 < m < 1.0 for m in milestones):
        raise ArgumentError(f"milestones must be fractions in (0, 1), but got {milestones=}.")
    if not 0.0 < gamma < 1.0:
        raise ArgumentError(f"gamma must be in (0, 1), but got {gamma=}.")
    for group in optimizer.param_groups:
        group["lr"] = lr
    steps = sorted(round(m * total_steps) for m in milestones)
    return MultiStepLR(optimizer, milestones=steps, gamma=gamma)


def make_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    max_lr: float,
    min_lr: float,
    total_steps: int,
    **options: Any,
) -> LRScheduler:
    """The schedule called ``name`` over ``total_steps`` optimizer steps.

    ``"onecycle"`` and ``"onecycle3"`` (three-phase) take `one_cycle`'s options.
    The CLR modes run ``cycles`` whole cycles (default 2) so the run ends at
    ``min_lr``; ``"exp_range"`` defaults ``gamma`` so that the amplitude falls
    tenfold over the run. Other `cyclic` options pass through. ``"step"`` holds
    ``max_lr`` and divides it by 10 at 50% and 75% of the steps; it has no
    ``min_lr``.
    """
    check_int("total_steps", total_steps, 1)
    if name in ("onecycle", "onecycle3"):
        options.setdefault("three_phase", name == "onecycle3")
        return one_cycle(
            optimizer, max_lr=max_lr, min_lr=min_lr, total_steps=total_steps, **options
        )
    if name in CLR_MODES:
        cycles = options.pop("cycles", 2)
        check_int("cycles", cycles, 1)
        options.setdefault("step_size_up", max(1, total_steps // (2 * cycles)))
        if name == "exp_range":
            options.setdefault("gamma", 0.1 ** (1.0 / total_steps))
        return cyclic(optimizer, base_lr=min_lr, max_lr=max_lr, mode=name, **options)
    if name == "step":
        return step_decay(optimizer, lr=max_lr, total_steps=total_steps, **options)
    raise ArgumentError(f"schedule must be one of {SCHEDULES}, but got {name!r}.")
