"""MNIST-1D (Greydanus 2020) with a small 1-D CNN: autolr's default task.

The data is generated procedurally (no download): 10 digit-like 1-D templates,
scaled, sheared, translated and noised into length-40 signals. The default
4000/1000 train/test split is the paper's; its CNN reaches about 94% on the
test split. autolr holds 20% of the training split out for validation (what the
search and selection read), so the test split is scored once, by the final
model. This 4-conv CNN with BatchNorm and global average pooling got about 98%
in 10 epochs of 1cycle over a wide range of max_lr (trained on all 4000).

Example:
    >>> from autolr.tasks.mnist1d import build
    >>> task = build()
    >>> len(task.train_set), len(task.val_set), len(task.test_set)
    (3200, 800, 1000)
"""

from __future__ import annotations

import functools
import random

import numpy as np
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


@functools.lru_cache(maxsize=8)
def load_mnist1d(
    num_samples: int = 5000,
    length: int = 40,
    seed: int = 42,
    val_fraction: float = 0.2,
    split_seed: int = 0,
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, val, test) datasets of ``(x, y)`` with x of shape ``(1, length)``.

    ``num_samples`` counts all splits; mnist1d keeps 80% for training, of which
    ``val_fraction`` (per class, seeded by ``split_seed``) is held out for
    validation. Cached per process: generating 5000 samples takes about 2 s.
    """
    check_int("num_samples", num_samples, 50)
    check_int("length", length, 8)
    check_fraction("val_fraction", val_fraction)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        from mnist1d.utils import ObjectView
    except ImportError as exc:
        raise missing_package("mnist1d", "mnist1d") from exc

    args = get_dataset_args(as_dict=True) | {
        "num_samples": num_samples,
        "final_seq_length": length,
        "seed": seed,
    }
    # make_dataset reseeds numpy's and Python's global RNGs; restore them so that
    # building a task has no side effect on anyone else's randomness.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(ObjectView(args))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    train, val = held_out(data["y"], val_fraction, split_seed)
    return (
        channel_dataset(data["x"][train], data["y"][train]),
        channel_dataset(data["x"][val], data["y"][val]),
        channel_dataset(data["x_test"], data["y_test"]),
    )


def cnn(channels: int = 32) -> nn.Sequential:
    """4 conv layers (C, C, 2C, 2C channels), two 2x max-pools, global average pool.

    Global pooling makes the classifier indifferent to where the digit sits,
    which is what MNIST-1D's random translations call for.
    """
    c = channels
    return nn.Sequential(
        *conv_bn_relu(1, 1, c, 5),
        *conv_bn_relu(1, c, c, 3),
        nn.MaxPool1d(2),
        *conv_bn_relu(1, c, 2 * c, 3),
        nn.MaxPool1d(2),
        *conv_bn_relu(1, 2 * c, 2 * c, 3),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(2 * c, NUM_CLASSES),
    )


# One keyword per `task_params` key a config may set (see pipelines/*.yaml).
def build(
    *,
    num_samples: int = 5000,
    length: int = 40,
    data_seed: int = 42,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    channels: int = 32,
    optimizer: str | OptimizerFactory = "sgd",
    batch_size: int = 128,
    epochs: int = 10,
) -> Task:
    """MNIST-1D classified by `cnn`: train / validation / test.

    Args:
        num_samples: examples in all splits together (80% train and validation, 20% test).
        length: samples per signal.
        data_seed: seed of the procedural generator (42 is mnist1d's own).
        val_fraction: share of the training split held out for validation.
        split_seed: seed of that (per class) hold-out.
        channels: width of the first conv layers (later ones have twice as many).
        epochs: 1cycle budget of 3200 training examples per epoch (10 epochs of 4000 took
            about 5 s on one CPU core).
    """
    check_int("channels", channels, 1)
    train_set, val_set, test_set = load_mnist1d(
        num_samples, length, data_seed, val_fraction, split_seed
    )
    return Task(
        model_fn=functools.partial(cnn, channels),
        train_set=train_set,
        val_set=val_set,
        test_set=test_set,
        optimizer=optimizer,
        batch_size=batch_size,
        epochs=epochs,
        name="mnist1d",
    )
