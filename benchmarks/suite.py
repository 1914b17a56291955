"""The selection suite: 18 small tasks that stand in for the models users bring.

Nine families, two tasks each, so that every tuned constant can be chosen on
eight families and reported on the ninth (leave-one-family-out). Between them
the tasks cover SGD with momentum and AdamW, small (<= 32) and large (>= 512)
batches, classification, a character language model and regression. All data
is generated or ships with a pip package (mnist1d, scikit-learn, the Python
standard library's own docstrings); nothing is downloaded. Each training run
takes a few seconds on one CPU core.

Every task is an `autolr.Task`, so the pipeline runs them as they are:

    python -m autolr.pipeline --task benchmarks.suite:gru_lm_adamw
"""

from __future__ import annotations

import functools
import importlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autolr import Task
from autolr.tasks import digits as digits_task
from autolr.tasks import mnist1d as mnist1d_task
from autolr.tasks._shared import channel_dataset


@dataclass(frozen=True)
class Spec:
    """A suite task: its builder, family, and how its score is compared."""

    name: str
    family: str
    optimizer: str  # "sgd" or "adamw"
    batch_size: int
    kind: str  # "accuracy" (pp), "lm" (val loss in nats) or "regression" (val MSE ratio)


def _split(x: np.ndarray, y: np.ndarray, n_val: int, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(x))
    val, tr = order[:n_val], order[n_val:]
    return x[tr], y[tr], x[val], y[val]


def _datasets(x_tr, y_tr, x_val, y_val, y_dtype=torch.long):
    as_x = functools.partial(torch.as_tensor, dtype=torch.float32)
    return (
        TensorDataset(as_x(x_tr), torch.as_tensor(y_tr, dtype=y_dtype)),
        TensorDataset(as_x(x_val), torch.as_tensor(y_val, dtype=y_dtype)),
    )


# ---------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def tabular(seed: int = 0):
    """A 20-feature, 5-class problem with informative, redundant and noise features."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=3000,
        n_features=20,
        n_informative=10,
        n_redundant=4,
        n_classes=5,
        n_clusters_per_class=2,
        class_sep=1.5,
        flip_y=0.02,
        random_state=seed,
    )
    x = (x - x.mean(0)) / x.std(0)
    return _datasets(*_split(x, y, 600, seed))


@functools.lru_cache(maxsize=4)
def friedman(seed: int = 0):
    """Friedman #1 regression (10 features, 5 of them used), targets standardised."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=3000, n_features=10, noise=0.5, random_state=seed)
    y = (y - y.mean()) / y.std()
    return _datasets(*_split(x, y[:, None], 600, seed), y_dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def linear_regression(seed: int = 0):
    """A wide sparse linear regression with noise, targets standardised."""
    from sklearn.datasets import make_regression

    x, y = make_regression(
        n_samples=6000, n_features=50, n_informative=20, noise=20.0, random_state=seed
    )
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return _datasets(*_split(x, y[:, None], 1000, seed), y_dtype=torch.float32)


_DOC_MODULES = (
    "argparse",
    "ast",
    "asyncio",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http",
    "inspect",
    "itertools",
    "json",
    "logging",
    "math",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "zipfile",
)
SEQ_LEN = 32


@functools.lru_cache(maxsize=1)
def stdlib_text() -> str:
    """English prose from the docstrings of standard-library modules and their members."""
    parts = []
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__] + [
            getattr(getattr(module, attr, None), "__doc__", None) for attr in sorted(vars(module))
        ]
        parts += [d for d in docs if isinstance(d, str) and len(d) > 80]
    text = " ".join(" ".join(p.split()) for p in dict.fromkeys(parts))  # unique, one line
    return "".join(c for c in text.lower() if 32 <= ord(c) < 127)


@functools.lru_cache(maxsize=1)
def char_lm():
    """Next-character prediction on `stdlib_text`, in windows of `SEQ_LEN` characters."""
    text = stdlib_text()[:150_000]
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    n = (len(ids) - 1) // SEQ_LEN
    x = ids[: n * SEQ_LEN].view(n, SEQ_LEN)
    y = ids[1 : n * SEQ_LEN + 1].view(n, SEQ_LEN)
    n_val = n // 8  # the last eighth of the text
    return TensorDataset(x[:-n_val], y[:-n_val]), TensorDataset(x[-n_val:], y[-n_val:]), len(vocab)


def _subset_classes(dataset: TensorDataset, classes: range) -> TensorDataset:
    x, y = dataset.tensors
    keep = (y >= classes.start) & (y < classes.stop)
    return TensorDataset(x[keep], y[keep] - classes.start)


# ---------------------------------------------------------------- models


def mlp(d_in: int, d_out: int, width: int, depth: int, act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


class Block(nn.Module):
    """A pre-activation-free basic residual block: conv-BN-ReLU-conv-BN + skip."""

    def __init__(self, dims: int, c: int):
        super().__init__()
        conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}[dims]
        self.body = nn.Sequential(
            conv(c, c, 3, padding=1, bias=False),
            norm(c),
            nn.ReLU(),
            conv(c, c, 3, padding=1, bias=False),
            norm(c),
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


def resnet(dims: int, c: int = 16, blocks: int = 3, classes: int = 10) -> nn.Sequential:
    conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[dims]
    return nn.Sequential(
        conv(1, c, 3, padding=1, bias=False),
        norm(c),
        nn.ReLU(),
        *[Block(dims, c) for _ in range(blocks)],
        pool(1),
        nn.Flatten(),
        nn.Linear(c, classes),
    )


def plain_cnn(c: int = 32) -> nn.Sequential:
    """The MNIST-1D CNN without any normalization (conv biases back in)."""
    return nn.Sequential(
        nn.Conv1d(1, c, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(c, 2 * c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(2 * c, 2 * c, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(2 * c, 10),
    )


class CharRNN(nn.Module):
    def __init__(self, vocab: int, cell: str, hidden: int = 128, emb: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


class TinyTransformer(nn.Module):
    """A ViT-style encoder: patches -> tokens (+ a class token), pre-LN blocks, LayerNorm head."""

    def __init__(
        self, patch_dim: int, tokens: int, classes: int = 10, d: int = 48, layers: int = 2
    ):
        super().__init__()
        self.patch_dim = patch_dim
        self.embed = nn.Linear(patch_dim, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, d))
        block = nn.TransformerEncoderLayer(
            d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        tokens = self.embed(self.patches(x))
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens)[:, 0]))

    def patches(self, x):
        if x.ndim == 4:  # (B, 1, 8, 8) images -> 2x2 patches
            b = x.shape[0]
            x = x.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4)
            return x.reshape(b, 16, 4)
        return x.reshape(x.shape[0], -1, self.patch_dim)  # (B, 1, L) signals -> windows


# ---------------------------------------------------------------- fine-tuning


@functools.lru_cache(maxsize=2)
def pretrained(source: str) -> dict:
    """A CNN trained (1cycle, 6 epochs, seed 0) on classes 0-4 of ``source``: its state dict.

    The suite pretrains its own backbones, so nothing is downloaded; the
    fine-tuning tasks then train on classes 5-9, which the backbone never saw.
    """
    from autolr.training import train

    module = {"digits": digits_task, "mnist1d": mnist1d_task}[source]
    train_set, val_set = (_subset_classes(d, range(0, 5)) for d in frozen_data(source))
    task = Task(module.cnn, train_set, val_set, optimizer="sgd", batch_size=64, name="pretrain")
    state = {}

    def keep(metrics, get_state):
        state.update(get_state()["model"])

    train(
        task, max_lr=0.3, min_lr=0.012, epochs=6, weight_decay=5e-4, on_epoch=keep, progress=False
    )
    return state


def finetune_model(source: str) -> nn.Module:
    module = {"digits": digits_task, "mnist1d": mnist1d_task}[source]
    with torch.random.fork_rng():  # the first call pretrains, which reseeds torch
        state = pretrained(source)
    model = module.cnn()
    model.load_state_dict(state)
    model[-1] = nn.Linear(model[-1].in_features, 5)  # a fresh head for the new classes
    return model


def _finetune_data(source: str, n_train: int):
    train_set, val_set = (_subset_classes(d, range(5, 10)) for d in frozen_data(source))
    x, y = train_set.tensors
    return TensorDataset(x[:n_train], y[:n_train]), val_set  # fine-tuning sees little data


# ---------------------------------------------------------------- the tasks


@functools.lru_cache(maxsize=2)
def frozen_data(source: str) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) of ``source`` exactly as the suite's cached grids were measured on.

    The built-in tasks now hold validation out of the training split and keep a
    test split (9427e19); the suite keeps its own earlier split so that the
    cached oracle grids in ``benchmarks/results/selection/`` stay valid: MNIST-1D's
    4000 training signals for training and its 1000 test signals for validation;
    digits split 80/20 (stratified, seed 0), standardised by the training split.
    """
    if source == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset
        from mnist1d.utils import ObjectView

        args = get_dataset_args(as_dict=True) | {
            "num_samples": 5000,
            "final_seq_length": 40,
            "seed": 42,
        }
        np_state, py_state = np.random.get_state(), random.getstate()
        try:  # make_dataset reseeds the global RNGs
            data = make_dataset(ObjectView(args))
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return (
            channel_dataset(data["x"], data["y"]),
            channel_dataset(data["x_test"], data["y_test"]),
        )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    mean, std = x_train.mean(), x_train.std()
    return (
        channel_dataset((x_train - mean) / std, y_train),
        channel_dataset((x_val - mean) / std, y_val),
    )


def _mnist1d():
    return frozen_data("mnist1d")


def _digits():
    return frozen_data("digits")


def _lm(cell: str):
    train_set, val_set, vocab = char_lm()
    return functools.partial(CharRNN, vocab, cell), (train_set, val_set)


P = functools.partial
# name: (family, optimizer, batch size, kind, () -> (model_fn, (train, val)), epochs)
TABLE = {
    "mnist1d_cnn_sgd": ("cnn_bn", "sgd", 128, "accuracy", lambda: (mnist1d_task.cnn, _mnist1d()), 6),
    "digits_cnn_adamw": ("cnn_bn", "adamw", 32, "accuracy", lambda: (digits_task.cnn, _digits()), 6),
    "digits_resnet_sgd": ("resnet", "sgd", 64, "accuracy", lambda: (P(resnet, 2), _digits()), 6),
    "mnist1d_resnet_adamw": ("resnet", "adamw", 512, "accuracy", lambda: (P(resnet, 1), _mnist1d()), 12),
    "tabular_mlp_sgd": ("mlp_relu", "sgd", 32, "accuracy", lambda: (P(mlp, 20, 5, 128, 2, nn.ReLU), tabular()), 6),
    "mnist1d_mlp_adamw": ("mlp_relu", "adamw", 1024, "accuracy", lambda: (P(mlp, 40, 10, 256, 3, nn.ReLU), _mnist1d()), 30),
    "tabular_tanh_sgd": ("mlp_tanh", "sgd", 32, "accuracy", lambda: (P(mlp, 20, 5, 128, 2, nn.Tanh), tabular()), 6),
    "mnist1d_tanh_adamw": ("mlp_tanh", "adamw", 512, "accuracy", lambda: (P(mlp, 40, 10, 256, 2, nn.Tanh), _mnist1d()), 30),
    "mnist1d_plain_cnn_sgd": ("no_norm", "sgd", 64, "accuracy", lambda: (plain_cnn, _mnist1d()), 6),
    "digits_plain_mlp_adamw": ("no_norm", "adamw", 512, "accuracy", lambda: (P(mlp, 64, 10, 128, 2, nn.ReLU), _digits()), 40),
    "gru_lm_adamw": ("rnn_lm", "adamw", 32, "lm", lambda: _lm("gru"), 2),
    "lstm_lm_sgd": ("rnn_lm", "sgd", 64, "lm", lambda: _lm("lstm"), 3),
    "digits_vit_adamw": ("attention", "adamw", 32, "accuracy", lambda: (P(TinyTransformer, 4, 16), _digits()), 6),
    "mnist1d_transformer_sgd": ("attention", "sgd", 512, "accuracy", lambda: (P(TinyTransformer, 4, 10), _mnist1d()), 12),
    "friedman_mlp_adamw": ("regression", "adamw", 64, "regression", lambda: (P(mlp, 10, 1, 128, 2, nn.ReLU), friedman()), 8),
    "linear_mlp_sgd": ("regression", "sgd", 512, "regression", lambda: (P(mlp, 50, 1, 128, 2, nn.ReLU), linear_regression()), 20),
    "digits_finetune_sgd": ("finetune", "sgd", 16, "accuracy", lambda: (P(finetune_model, "digits"), _finetune_data("digits", 300)), 4),
    "mnist1d_finetune_adamw": ("finetune", "adamw", 32, "accuracy", lambda: (P(finetune_model, "mnist1d"), _finetune_data("mnist1d", 600)), 5),
}  # fmt: skip
SPECS = {name: Spec(name, *row[:4]) for name, row in TABLE.items()}
FAMILIES = tuple(dict.fromkeys(s.family for s in SPECS.values()))
LOSSES = {"accuracy": nn.CrossEntropyLoss(), "lm": lm_loss, "regression": nn.MSELoss()}


def build(name: str, epochs: int | None = None) -> Task:
    """The suite task ``name`` (see `TABLE`), as an `autolr.Task`.

    ``python -m autolr.pipeline --task benchmarks.suite:build --set task_params.name=NAME``
    """
    if name not in TABLE:
        raise ValueError(f"name must be one of {sorted(TABLE)}, but got {name!r}.")
    _, optimizer, batch_size, kind, make, default_epochs = TABLE[name]
    model_fn, (train_set, val_set) = make()
    return Task(
        model_fn=model_fn,
        train_set=train_set,
        val_set=val_set,
        loss_fn=LOSSES[kind],
        metric="accuracy" if kind == "accuracy" else "loss",
        optimizer=optimizer,
        batch_size=batch_size,
        epochs=epochs or default_epochs,
        name=name,
    )


for _name in TABLE:  # `--task benchmarks.suite:<name>` works too
    globals()[_name] = functools.partial(build, _name)


def score_gap(kind: str, best: float, value: float) -> float:
    """How much worse ``value`` is than ``best``: pp of accuracy, nats, or % of MSE."""
    if not math.isfinite(value):
        return math.inf
    if kind == "accuracy":
        return 100.0 * (best - value)
    if kind == "lm":
        return value - best
    return 100.0 * (value / best - 1.0)


def curve_result(curve: dict, name: str):
    """A cached curve as a `RangeTestResult`, naming its optimizer if the cache did not."""
    from autolr.results import RangeTestResult

    optimizer = curve.get("optimizer") or {"sgd": "SGD", "adamw": "AdamW"}[SPECS[name].optimizer]
    return RangeTestResult(**(curve | {"optimizer": optimizer}))
