"""The Task contract: the user's plug-in that autolr tunes.

A task builder is any importable ``def build(**params) -> autolr.Task``,
referenced as ``"module:function"``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autolr.errors import TaskError

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # (params, lr, weight_decay) -> Optimizer
Metric = Callable[[torch.Tensor, torch.Tensor], float]  # (outputs, targets) -> batch mean

OPTIMIZERS = ("sgd", "adamw")
MODES = {"accuracy": "max", "loss": "min"}  # each built-in metric's direction
METRICS = tuple(MODES)


@dataclass(frozen=True)
class Task:
    """What to train and on what data.

    Args:
        model_fn: builds a fresh, randomly initialised model on each call.
        train_set, val_set: map-style datasets whose items are ``(x, y)``. The
            range test trains on ``train_set``; the search, the selection and
            the reported ``val_metric`` read ``val_set``.
        loss_fn: the training loss, ``loss_fn(outputs, targets) -> scalar``.
        metric: ``"accuracy"`` (higher is better), ``"loss"`` (the validation
            loss, lower is better) or a callable ``(outputs, targets) -> float``,
            averaged over validation batches.
        mode: the metric's direction, ``"max"`` (higher is better) or ``"min"``;
            derived for ``"accuracy"`` and ``"loss"``, required for a callable
            (an error rate or an MAE is minimised, a score maximised).
        optimizer: ``"sgd"`` (momentum 0.9, Nesterov), ``"adamw"``, or a callable
            ``(params, lr, weight_decay) -> torch.optim.Optimizer``.
        batch_size: examples per training step.
        epochs: the task's suggested 1cycle budget; the config overrides it.
        name: a label for logs and the summary.
        test_set: optional held-out ``(x, y)`` data, read once, by the final model
            only (the summary's ``test_metric``), so that the reported score is on
            data the search never saw. The built-in tasks have one.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
        >>> task = Task(lambda: torch.nn.Linear(8, 2), data, data, batch_size=16)
        >>> task.metric_name
        'accuracy'
    """

    model_fn: Callable[[], nn.Module]
    train_set: Any
    val_set: Any
    loss_fn: Callable[..., torch.Tensor] = field(default_factory=nn.CrossEntropyLoss)
    metric: str | Metric = "accuracy"
    optimizer: str | OptimizerFactory = "sgd"
    batch_size: int = 128
    epochs: int | None = None
    name: str = "task"
    mode: str | None = None  # "max" or "min"; None: the built-in metric's own
    test_set: Any = None

    def __post_init__(self) -> None:
        if not callable(self.model_fn):
            raise TaskError(f"model_fn must be callable, but got {type(self.model_fn).__name__}.")
        for attr in ("train_set", "val_set", "test_set"):
            data = getattr(self, attr)
            if attr == "test_set" and data is None:
                continue
            if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
                raise TaskError(
                    f"{attr} must be a map-style dataset (with __getitem__ and __len__) "
                    f"yielding (x, y), but got {type(data).__name__}."
                )
            if len(data) == 0:
                raise TaskError(f"{attr} is empty; expected at least one (x, y) example.")
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise TaskError(
                f"metric must be one of {METRICS} or a callable, but got {self.metric!r}."
            )
        self._check_mode()
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise TaskError(
                f"optimizer must be one of {OPTIMIZERS} or a callable "
                f"(params, lr, weight_decay) -> Optimizer, but got {self.optimizer!r}."
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TaskError(f"batch_size must be a positive int, but got {self.batch_size!r}.")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise TaskError(f"epochs must be a positive int or None, but got {self.epochs!r}.")

    def _check_mode(self) -> None:
        """Derive ``mode`` for a built-in metric; a callable must come with one."""
        if self.mode is not None and self.mode not in ("max", "min"):
            raise TaskError(f"mode must be 'max' or 'min' (or None), but got {self.mode!r}.")
        if not isinstance(self.metric, str):
            if self.mode is None:
                raise TaskError(
                    f"a callable metric ({self.metric_name}) needs mode='max' (higher is "
                    "better) or mode='min' (lower is better), but got mode=None."
                )
            return
        own = MODES[self.metric]
        if self.mode not in (None, own):
            raise TaskError(
                f"metric {self.metric!r} is {own}imised; expected mode={own!r} or None, "
                f"but got mode={self.mode!r}."
            )
        object.__setattr__(self, "mode", own)  # frozen: set once, while constructing

    @property
    def metric_name(self) -> str:
        return (
            self.metric
            if isinstance(self.metric, str)
            else getattr(self.metric, "__name__", "metric")
        )

    @property
    def higher_is_better(self) -> bool:
        return self.mode == "max"

    def make_optimizer(self, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """The task's optimizer over ``params`` at learning rate ``lr``."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
            )
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return self.optimizer(params, lr, weight_decay)


def load_builder(ref: str) -> Callable[..., Task]:
    """Import a task builder from ``"module:function"``."""
    module_name, sep, func_name = ref.partition(":")
    if not sep or not module_name or not func_name:
        raise TaskError(f"a task is referenced as 'module:function', but got {ref!r}.")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, and whatever the module raises while importing
        raise TaskError(
            f"cannot import task module {module_name!r} (from {ref!r}): {type(exc).__name__}: {exc}"
        ) from exc
    builder = getattr(module, func_name, None)
    if not callable(builder):
        raise TaskError(f"module {module_name!r} has no callable {func_name!r} (from {ref!r}).")
    return builder


def build_task(ref: str, **params: Any) -> Task:
    """Import ``ref`` and call it with ``params``; check that it returns a Task."""
    builder = load_builder(ref)
    try:
        inspect.signature(builder).bind(**params)
    except TypeError as exc:
        raise TaskError(f"task builder {ref!r} rejected params {sorted(params)}: {exc}") from exc
    except ValueError:  # no signature to check (some builtins); the call will tell
        pass
    try:
        task = builder(**params)
    except Exception as exc:
        raise TaskError(f"task builder {ref!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise TaskError(
            f"task builder {ref!r} must return an autolr.Task, but returned {type(task).__name__}."
        )
    return task
