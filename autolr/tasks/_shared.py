"""Helpers shared by the built-in task builders."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autolr import _checks
from autolr.errors import TaskError


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise TaskError unless ``value`` is an int (not a bool) >= ``minimum``."""
    _checks.check_int(name, value, minimum, error=TaskError)


def channel_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """``(x, y)`` pairs: float32 inputs with a leading channel axis of 1, int64 labels."""
    inputs = torch.as_tensor(x, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(inputs, torch.as_tensor(y, dtype=torch.long))


def conv_bn_relu(dims: int, c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    """A same-padded ``dims``-D convolution, BatchNorm and ReLU."""
    conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}[dims]
    # No conv bias: the BatchNorm right after it has its own shift.
    return [
        conv(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
    ]


def missing_package(package: str, task: str) -> TaskError:
    """The error for a built-in task whose data package is absent (the ``pipeline`` extra)."""
    return TaskError(
        f"the {task} task reads its data with {package}, which is not installed; "
        'expected it from the pipeline extra: pip install "autolr[pipeline]"'
    )


def check_fraction(name: str, value: object) -> None:
    """Raise TaskError unless ``value`` is a number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise TaskError(f"{name} must be in (0, 1), but got {name}={value!r}.")


def held_out(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) sorted indices: a seeded ``fraction`` of each class held out.

    Per class, so a small split still holds every class in proportion.
    """
    rng = np.random.default_rng(seed)
    out = [
        rng.permutation(members)[: round(fraction * members.size)]
        for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    held = np.sort(np.concatenate(out))
    return np.setdiff1d(np.arange(labels.size), held), held
