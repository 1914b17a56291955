"""MNIST-1D with a plain MLP: no BatchNorm, trained with AdamW.

The same data as `autolr.tasks.mnist1d`; a model without normalisation layers
is more sensitive to the learning rate and gives the search stage a task where
BN momentum means nothing. The MNIST-1D paper's MLP reaches about 68%.

Example:
    >>> from autolr.tasks.mnist1d_mlp import build
    >>> task = build()
    >>> task.optimizer
    'adamw'
"""

from __future__ import annotations

import functools

from torch import nn

from autolr.tasks._shared import check_int
from autolr.tasks.base import OptimizerFactory, Task
from autolr.tasks.mnist1d import NUM_CLASSES, load_mnist1d


def mlp(length: int = 40, hidden: int = 256) -> nn.Sequential:
    """Two hidden ReLU layers of ``hidden`` units over the flattened signal."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(length, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, NUM_CLASSES),
    )


# One keyword per `task_params` key a config may set (see pipelines/*.yaml).
def build(
    *,
    num_samples: int = 5000,
    length: int = 40,
    data_seed: int = 42,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    hidden: int = 256,
    optimizer: str | OptimizerFactory = "adamw",
    batch_size: int = 128,
    epochs: int = 20,
) -> Task:
    """The MNIST-1D MLP task; arguments as in `autolr.tasks.mnist1d.build`.

    Args:
        hidden: units per hidden layer.
        epochs: 1cycle budget (3200 training examples per epoch).
    """
    check_int("hidden", hidden, 1)
    train_set, val_set, test_set = load_mnist1d(
        num_samples, length, data_seed, val_fraction, split_seed
    )
    return Task(
        model_fn=functools.partial(mlp, length, hidden),
        train_set=train_set,
        val_set=val_set,
        test_set=test_set,
        optimizer=optimizer,
        batch_size=batch_size,
        epochs=epochs,
        name="mnist1d_mlp",
    )
