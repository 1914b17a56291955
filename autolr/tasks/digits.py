"""scikit-learn's handwritten digits (8x8 images, shipped offline) with a small 2-D CNN.

1797 images of 10 classes, split per class (seeded): 20% for test, and 20% of
the rest for validation. Trained with AdamW, so the built-in tasks cover both
of autolr's optimizers.

Example:
    >>> from autolr.tasks.digits import build
    >>> task = build()
    >>> len(task.train_set), len(task.val_set), len(task.test_set)
    (1151, 287, 359)
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.data import TensorDataset

from autolr.tasks._shared import (
    channel_dataset,
    check_fraction,
    check_int,
    conv_bn_relu,
    held_out,
    missing_package,
)
from autolr.tasks.base import OptimizerFactory, Task

NUM_CLASSES = 10


@functools.lru_cache(maxsize=4)
def load_digits(
    val_fraction: float = 0.2, seed: int = 0, test_fraction: float = 0.2
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, val, test) datasets of ``(x, y)`` with x of shape ``(1, 8, 8)``, standardised.

    ``test_fraction`` of all images, then ``val_fraction`` of the rest, per class.
    """
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise missing_package("scikit-learn", "digits") from exc

    digits = sk_load_digits()
    x, y = digits.images, digits.target
    rest, test = held_out(y, test_fraction, seed)
    train, val = (rest[i] for i in held_out(y[rest], val_fraction, seed + 1))
    # Standardise with the training split's statistics only.
    mean, std = x[train].mean(), x[train].std()
    return tuple(channel_dataset((x[i] - mean) / std, y[i]) for i in (train, val, test))


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
    test_fraction: float = 0.2,
    split_seed: int = 0,
    channels: int = 32,
    optimizer: str | OptimizerFactory = "adamw",
    batch_size: int = 64,
    epochs: int = 10,
) -> Task:
    """The digits task.

    Args:
        val_fraction: share of the images left after the test split held out for validation.
        test_fraction: share of the 1797 images held out for the final test.
        split_seed: seed of the per-class splits.
        channels: width of the first conv layers.
        epochs: 1cycle budget (1151 training images per epoch).
    """
    check_int("channels", channels, 1)
    train_set, val_set, test_set = load_digits(val_fraction, split_seed, test_fraction)
    return Task(
        model_fn=functools.partial(cnn, channels),
        train_set=train_set,
        val_set=val_set,
        test_set=test_set,
        optimizer=optimizer,
        batch_size=batch_size,
        epochs=epochs,
        name="digits",
    )
