"""CIFAR-10 with ResNet-56, the Super-Convergence paper's setting (Smith & Topin 2018).

Reads a local copy in torchvision's layout and never downloads. The python
pickle batches are read with pickle + numpy, and augmentation (4-pixel-padded
random crop, horizontal flip) is done on tensors, so torchvision is not needed.
On a CPU this task is slow; it is meant for a GPU.

Example:
    >>> from autolr.tasks.cifar10 import build
    >>> task = build(root="~/data")  # reads ~/data/cifar-10-batches-py/  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from autolr.errors import TaskError
from autolr.tasks._shared import check_fraction, check_int, held_out
from autolr.tasks.base import OptimizerFactory, Task

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# Per-channel mean and std of the training images, in [0, 1] pixel units.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4  # pixels of zero padding before the random 32x32 crop


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (dicts, lists, bytes, numpy arrays) and nothing
    else: a planted file in the data folder must not run code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # the official files (numpy 1)
        ("numpy._core.multiarray", "_reconstruct"),  # numpy 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes, in protocol 2 pickles from Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_batches(folder: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with path.open("rb") as f:
                batch = _BatchUnpickler(f, encoding="bytes").load()
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
            raise TaskError(
                f"cannot read the CIFAR-10 batch {path}: expected a python pickle with b'data' "
                f"(N x 3072 uint8) and b'labels', as in {URL}. ({type(exc).__name__}: {exc})"
            ) from exc
    return torch.from_numpy(np.concatenate(images)), torch.as_tensor(labels, dtype=torch.long)


@functools.lru_cache(maxsize=2)
def read_cifar10(root: str) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """((train_images, train_labels), (test_images, test_labels)); images uint8 (N, 3, 32, 32).

    ``root`` is the folder that contains ``cifar-10-batches-py/``, as for
    ``torchvision.datasets.CIFAR10(root)``; pass it resolved (it keys the per-process
    cache).
    """
    folder = Path(root) / FOLDER
    missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise TaskError(
            f"CIFAR-10 not found: expected {folder}/ holding data_batch_1 ... data_batch_5 and "
            f"test_batch (missing: {', '.join(missing)}). autolr never downloads data: get "
            f"{URL}, untar it inside {folder.parent}, or pass root= the folder that contains "
            f"{FOLDER}/."
        )
    return _read_batches(folder, TRAIN_FILES), _read_batches(folder, (TEST_FILE,))


class CIFAR10(Dataset):
    """Normalised float images from uint8 tensors; optional crop-and-flip augmentation.

    Augmentation draws from torch's global RNG, which the training loop seeds
    and checkpoints.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment:
            image = F.pad(image, (PAD, PAD, PAD, PAD))
            top, left = torch.randint(0, 2 * PAD + 1, (2,)).tolist()
            image = image[:, top : top + 32, left : left + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image.float() / 255 - self.mean) / self.std, self.labels[index]


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and an identity shortcut (a 1x1 projection when shapes change)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _blocks_per_stage(depth: int) -> int:
    check_int("depth", depth, 8)
    if (depth - 2) % 6 != 0:
        raise TaskError(f"depth must be 6n + 2 (20, 32, 44, 56, ...), but got {depth=}.")
    return (depth - 2) // 6


def resnet(depth: int = 56, num_classes: int = 10) -> nn.Sequential:
    """He et al.'s CIFAR ResNet: 3 stages of (depth - 2) / 6 blocks, 16/32/64 channels."""
    blocks_per_stage = _blocks_per_stage(depth)
    layers: list[nn.Module] = [
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
    ]
    c_in = 16
    for stage, c_out in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(c_in, c_out, stride))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


# One keyword per `task_params` key a config may set (see pipelines/*.yaml).
def build(
    *,
    root: str | os.PathLike = "data",
    depth: int = 56,
    augment: bool = True,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    optimizer: str | OptimizerFactory = "sgd",
    batch_size: int = 128,
    epochs: int = 30,
) -> Task:
    """CIFAR-10 classified by `resnet`: 45000 train / 5000 validation / the 10000 test images.

    Args:
        root: the folder containing ``cifar-10-batches-py/`` (torchvision's layout).
        depth: ResNet depth, 6n + 2 (56 in the Super-Convergence paper).
        augment: random crop and flip of the training images.
        val_fraction: share of the 50000 training images held out for validation
            (per class, seeded by ``split_seed``).
        epochs: 1cycle budget (352 steps per epoch at batch size 128).
    """
    _blocks_per_stage(depth)  # fail on a bad depth now, not inside a training run
    check_fraction("val_fraction", val_fraction)
    folder = str(Path(root).expanduser().resolve())
    (images, labels), (test_images, test_labels) = read_cifar10(folder)
    train, val = (torch.from_numpy(i) for i in held_out(labels.numpy(), val_fraction, split_seed))
    return Task(
        model_fn=functools.partial(resnet, depth),
        train_set=CIFAR10(images[train], labels[train], augment=augment),
        val_set=CIFAR10(images[val], labels[val], augment=False),
        test_set=CIFAR10(test_images, test_labels, augment=False),
        optimizer=optimizer,
        batch_size=batch_size,
        epochs=epochs,
        name="cifar10",
    )
