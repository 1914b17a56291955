"""Plots of the stages' results. Reads results, decides nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autolr.results import LRChoice, RangeTestResult, TrainResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and Ray workers
    import matplotlib.pyplot as plt

    return plt


def plot_range_test(result: RangeTestResult, choice: LRChoice | None, path: str | Path) -> Path:
    """Raw and smoothed loss vs LR, with change points and the picked range."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training(train: TrainResult, path: str | Path) -> Path:
    """Validation metric and losses per epoch."""
    plt = _pyplot()
    epochs = [m.epoch for m in train.history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
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
    plt.close(fig)
    return path
