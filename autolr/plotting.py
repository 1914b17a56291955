"""Plots of the stages' results. Reads results, decides nothing.

matplotlib's backend is never switched: files are drawn on bare
``matplotlib.figure.Figure`` objects (no pyplot, no display needed on servers
and Ray workers), and `draw_range_test` draws where a notebook can show it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from autolr.results import LRChoice, RangeTestResult, TrainResult


def _figure(**kwargs: Any) -> Any:
    """A figure that no backend or pyplot state knows about; ``savefig`` renders it with Agg."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def draw_range_test(result: RangeTestResult, choice: LRChoice | None = None, ax: Any = None) -> Any:
    """Raw and smoothed loss vs LR, with change points and the picked range, on ``ax``.

    With no ``ax``: a new pyplot figure if pyplot is already imported (a notebook
    displays it), else a bare Figure. Returns the Axes.
    """
    if ax is None:
        if "matplotlib.pyplot" in sys.modules:
            _, ax = sys.modules["matplotlib.pyplot"].subplots(figsize=(8, 4.5))
        else:
            ax = _figure(figsize=(8, 4.5)).subplots()
    finite = np.isfinite(result.losses)
    ax.plot(
        result.lrs[finite],
        result.losses[finite],
        color="0.7",
        lw=1,
        label=f"{result.loss_kind} loss (raw)",
    )
    if choice is not None:
        if choice.smoothed.size:
            ax.plot(10**choice.log_lrs, choice.smoothed, color="C0", lw=2, label="smoothed")
        for i, lr in enumerate(choice.changepoints):
            ax.axvline(lr, color="C2", ls="--", lw=1, label="change point" if i == 0 else None)
        ax.axvspan(choice.min_lr, choice.max_lr, color="C1", alpha=0.15, label="1cycle range")
        ax.axvline(choice.max_lr, color="C3", lw=1.5, label=f"max_lr = {choice.max_lr:.3g}")
        ax.axvline(choice.min_lr, color="C1", lw=1.5, label=f"min_lr = {choice.min_lr:.3g}")
        ax.set_title(f"LR range test: {choice.method} pick, confidence {choice.confidence:.2f}")
    else:
        ax.set_title("LR range test")
    if finite.any():
        lo = np.nanmin(result.losses[finite])
        first = result.losses[finite][0]
        ax.set_ylim(lo - 0.05 * abs(first - lo) - 1e-3, max(first, lo) * 1.5 + 1e-3)
    ax.set_xscale("log" if result.mode == "exp" else "linear")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    return ax


def plot_range_test(result: RangeTestResult, choice: LRChoice | None, path: str | Path) -> Path:
    """`draw_range_test` into an image file."""
    fig = _figure(figsize=(8, 4.5), dpi=110)
    draw_range_test(result, choice, fig.subplots())
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_training(train: TrainResult, path: str | Path) -> Path:
    """Validation metric and losses per epoch."""
    epochs = [m.epoch for m in train.history]
    fig = _figure(figsize=(9, 3.5), dpi=110)
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot(epochs, [m.train_loss for m in train.history], label="train loss")
    ax_loss.plot(epochs, [m.val_loss for m in train.history], label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_metric.plot(epochs, [m.val_metric for m in train.history], color="C2")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(f"val {train.metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
