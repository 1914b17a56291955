"""scikit-learn's handwritten digits (8x8 images, shipped offline) with a small 2-D CNN.

1797 images of 10 classes, split 80/20 (stratified, seeded). Trained with
AdamW, so the built-in tasks cover both of autolr's optimizers.

Example:
    >>> from autolr.tasks.digits import build
    >>> task = build()
    >>> len(task.train_set), len(task.val_set)
    (1437, 360)
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.data import TensorDataset

from autolr.errors import TaskError
from autolr.tasks._shared import channel_dataset, check_int, conv_bn_relu, missing_package
from autolr.tasks.base import OptimizerFactory, Task

NUM_CLASSES = 10


@functools.lru_cache(maxsize=4)
def load_digits(val_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) datasets of ``(x, y)`` with x of shape ``(1, 8, 8)``, standardised."""
    if not 0.0 < val_fraction < 1.0:
        raise TaskError(f"val_fraction must be in (0, 1), but got {val_fraction=}.")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise missing_package("scikit-learn", "digits") from exc

    digits = sk_load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.images,
        digits.target,
        test_size=val_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    # Standardise with the training split's statistics only.
    mean, std = x_train.mean(), x_train.std()
    return (
        channel_dataset((x_train - mean) / std, y_train),
        channel_dataset((x_val - mean) / std, y_val),
    )


def cnn(channels: int = 32) -> nn.Sequential:
    """3 conv layers (C, C, 2C channels), one 2x max-pool (8x8 -> 4x4), global average pool."""
    c = channels
    return nn.Sequential(
        *conv_bn_relu(2, 1, c, 3),
        *conv_bn_relu(2, c, c, 3),
        nn.MaxPool2d(2),
        *conv_bn_relu(2, c, 2 * c, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * c, NUM_CLASSES),
    )


def build(
    *,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    channels: int = 32,
    optimizer: str | OptimizerFactory = "adamw",
    batch_size: int = 64,
    epochs: int = 10,
) -> Task:
    """The digits task.

    Args:
        val_fraction: share of the 1797 images held out for validation.
        split_seed: seed of the stratified train/val split.
        channels: width of the first conv layers.
        epochs: 1cycle budget (1437 training images per epoch).
    """
    check_int("channels", channels, 1)
    train_set, val_set = load_digits(val_fraction, split_seed)
    return Task(
        model_fn=functools.partial(cnn, channels),
        train_set=train_set,
        val_set=val_set,
        optimizer=optimizer,
        batch_size=batch_size,
        epochs=epochs,
        name="digits",
    )
