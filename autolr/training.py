"""A plain train/evaluate loop: one schedule step per optimizer step, metrics per epoch.

Kept free of ray and mlflow: the search and tracking stages drive it through
``on_epoch``, which can checkpoint (``state()``) and stop the run.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from autolr import Task
    >>> data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    >>> task = Task(lambda: torch.nn.Linear(8, 2), data, data, batch_size=16)
    >>> result = train(task, max_lr=0.1, min_lr=0.004, epochs=2, progress=False)
    >>> len(result.history)
    2
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from autolr._checks import check_int
from autolr._distributed import rank, sum_across_ranks, world_size
from autolr.errors import ArgumentError, TrainingDivergedError
from autolr.results import EpochMetrics, TrainResult
from autolr.schedules import make_scheduler
from autolr.tasks.base import Task

OnEpoch = Callable[[EpochMetrics, Callable[[], dict]], "bool | None"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model`` (1-D, 2-D, 3-D, synced)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set ``momentum`` on every BatchNorm layer; return how many there were.

    torch's convention: ``running = (1 - momentum) * running + momentum * batch``,
    so ``momentum`` is the weight of the NEW batch statistic (default 0.1).
    """
    if not 0.0 < momentum <= 1.0:
        raise ArgumentError(f"bn_momentum must be in (0, 1], but got {momentum=}.")
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.momentum = momentum
    return len(layers)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer param groups: decay for weights, none for biases and norm scales/shifts.

    "No bias decay" as in He et al. 2019 (Bag of Tricks): behind BatchNorm a
    weight's scale is free, so L2 on it tunes the effective LR, while decay on
    biases and BN's gamma/beta only pulls the model off. In the usual layers
    the 1-D parameters are exactly those biases and norm affines.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_loaders(task: Task, seed: int) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled by a generator seeded per epoch) and val loader.

    The last training batch is dropped when it would hold a single example:
    BatchNorm cannot normalise one example in training mode, and a one-example
    step is mostly noise anyway. Shuffling changes which example sits out.
    Data is small, so loading stays in the main process (num_workers=0).

    Under torch.distributed each rank takes its share of every batch of the
    single process's loader (`_RankShare`), so the ranks' batches of a step
    together are the single process's batch, and the effective batch stays the
    one the LR was picked for. (A DistributedSampler would shuffle in another
    order: DataLoader draws a seed from the generator before the sampler's
    permutation.) A last batch too small to give every rank an example is
    dropped. Every rank validates on the whole val set.
    """
    n, world = len(task.train_set), world_size()
    if task.batch_size < world:
        raise ArgumentError(
            f"the task's batch_size={task.batch_size} is split over {world} data-parallel "
            f"ranks; expected at least one example per rank."
        )
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        task.train_set,
        batch_size=task.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=n > 1 and 0 < n % task.batch_size < max(world, 2),
    )
    if world > 1:
        train_loader = _RankShare(train_loader, rank(), world)
    val_loader = DataLoader(task.val_set, batch_size=task.batch_size, shuffle=False)
    return train_loader, val_loader


@dataclass(frozen=True)
class Fresh:
    """What a run starts from: a fresh model of a task, its optimizer and loaders."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    val_loader: DataLoader


def fresh(
    task: Task,
    *,
    seed: int,
    lr: float,
    weight_decay: float,
    bn_momentum: float | None,
    device: torch.device,
) -> Fresh:
    """The one way the range test, every trial and the final run build their start:
    the model seeded with ``seed`` on ``device``, its BatchNorm momentum, the task's
    optimizer over `param_groups` at ``lr``, and `make_loaders` (one ``drop_last``
    rule, one shuffle order), so that the range test sees the batches training does.
    """
    torch.manual_seed(seed)
    model = task.model_fn().to(device)
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    optimizer = task.make_optimizer(
        param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay
    )
    return Fresh(model, optimizer, *make_loaders(task, seed))


class _RankShare:
    """One rank's share of every batch of ``loader``: its chunk of ``world`` near-equal ones.

    Where a batch does not split evenly (a batch_size that is no multiple of
    ``world``, an epoch's last batch), DDP's mean of the ranks' mean gradients
    weighs its examples slightly unequally.
    """

    def __init__(self, loader: DataLoader, rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world
        self.generator = loader.generator  # reseeded per epoch by `train`

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]


def _batch_metric(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    if task.metric == "accuracy":
        return (outputs.argmax(dim=1) == targets).float().mean().item()
    return float(task.metric(outputs, targets))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, task: Task, device: torch.device | str
) -> tuple[float, float]:
    """(val_loss, val_metric), each a batch-size-weighted mean over ``loader``.

    With ``task.metric == "loss"`` the metric is the validation loss itself.
    """
    model.eval()
    loss_sum = metric_sum = 0.0
    count = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        outputs = model(x)
        n = len(y)
        loss_sum += task.loss_fn(outputs, y).item() * n
        if task.metric != "loss":
            metric_sum += _batch_metric(task, outputs, y) * n
        count += n
    val_loss = loss_sum / count
    return val_loss, (val_loss if task.metric == "loss" else metric_sum / count)


def evaluate_weights(
    task: Task, state_dict: dict, dataset: Any, device: torch.device | str | None = None
) -> tuple[float, float]:
    """(loss, metric) of ``task``'s model holding ``state_dict``, over ``dataset``.

    How the pipeline scores its final model on the task's test split, and how
    a logged ``state_dict`` is checked against the metric reported with it.
    """
    device = torch.device(device) if device is not None else default_device()
    with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten: leave no trace
        model = task.model_fn()
    model.load_state_dict(state_dict)
    loader = DataLoader(dataset, batch_size=task.batch_size, shuffle=False)
    return evaluate(model.to(device), loader, task, device)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    task: Task,
    device: torch.device,
    accumulation_steps: int = 1,
) -> tuple[float, float]:
    """One pass over ``loader``: one optimizer and schedule step per ``accumulation_steps`` batches.

    The gradient of a step is that of its batches' mean loss, as the range test
    takes it; an epoch's last step may gather fewer batches. Returns the
    batch-size-weighted mean training loss and the LR of the last step. Raises
    FloatingPointError at the first NaN or infinite loss. Under torch.distributed
    (``model`` a DDP module) the loss is that of all ranks' batches together.
    """
    model.train()
    loss_sum, count = 0.0, 0
    batches = len(loader)
    distributed = world_size() > 1
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        loss = task.loss_fn(model(x), y)
        n = len(y)
        if distributed:  # the loss of every rank's batch, so that all ranks raise together
            pair = torch.stack([loss.detach().float() * n, loss.new_tensor(float(n))])
            loss_sum_all, n_all = sum_across_ranks(pair).tolist()
            loss_value, n = loss_sum_all / n_all, int(n_all)
        else:
            loss_value = loss.item()
        lr = optimizer.param_groups[0]["lr"]
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the training loss became {loss_value} at lr={lr:.4g}")
        first = i - i % accumulation_steps  # this step's first batch
        last = min(first + accumulation_steps, batches)  # one past its last
        (loss / (last - first)).backward()
        if i + 1 == last:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss_value * n
        count += n
    return loss_sum / count, lr


def steps_per_epoch(batches: int, accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of ``batches``: the last one may gather fewer."""
    return math.ceil(batches / accumulation_steps)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads (None: as set), then restore the setting."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel: gradients are averaged over the ranks."""
    devices = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=devices)


def _rng_state() -> dict[str, Any]:
    # Only torch's RNGs: all tensors, so a checkpoint loads with torch.load(weights_only=True).
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_train_args(
    epochs: int, weight_decay: float, accumulation_steps: int, threads: int | None
) -> None:
    check_int("epochs", epochs, 1)
    if not weight_decay >= 0.0:
        raise ArgumentError(f"weight_decay must be >= 0, but got {weight_decay=}.")
    check_int("accumulation_steps", accumulation_steps, 1)
    check_int("threads", threads, 1, optional=True)


def changed_settings(saved: dict[str, Any], setup: dict[str, Any]) -> dict[str, tuple]:
    """``{key: (saved, now)}`` where a `train` ``state()``'s settings differ from ``setup``."""
    saved = {"accumulation_steps": 1, **saved}  # states from before it was recorded
    return {k: (saved.get(k), v) for k, v in setup.items() if saved.get(k) != v}


def _resume(
    resume: dict | None,
    setup: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> list[EpochMetrics]:
    """Load a `train` ``state()`` into a fresh start; the epochs it had run (none without one)."""
    if resume is None:
        return []
    changed = changed_settings(resume["setup"], setup)
    if changed:
        raise ArgumentError(
            f"resume= comes from a run with other settings; (saved, now) = {changed}."
        )
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    _set_rng_state(resume["rng"])
    return [EpochMetrics(**m) for m in resume["history"]]  # as long as its "epoch" says


def _state(
    history: list[EpochMetrics],
    setup: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """`train`'s ``state()``: a checkpoint dict for ``resume=``, a deep copy."""
    return copy.deepcopy(
        {
            "epoch": len(history),
            "setup": setup,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": [vars(m) for m in history],
            "rng": _rng_state(),
        }
    )


def _epoch(
    trained: nn.Module,
    start: Fresh,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    task: Task,
    device: torch.device,
    accumulation_steps: int,
    epoch: int,
) -> EpochMetrics:
    """One pass over the training batches, then the validation metrics of the plain model."""
    started = time.perf_counter()
    train_loss, lr = train_epoch(
        trained, start.train_loader, start.optimizer, scheduler, task, device, accumulation_steps
    )
    val_loss, val_metric = evaluate(start.model, start.val_loader, task, device)
    return EpochMetrics(
        epoch=epoch + 1,
        train_loss=train_loss,
        val_loss=val_loss,
        val_metric=val_metric,
        lr=lr,
        seconds=time.perf_counter() - started,
    )


# 14 keywords: the public training entry, whose every knob the search, the pipeline and
# users set by name; a settings object would only move them into another signature.
def train(
    task: Task,
    *,
    max_lr: float,
    min_lr: float,
    epochs: int,
    weight_decay: float = 0.0,
    bn_momentum: float | None = None,
    schedule: str = "onecycle",
    seed: int = 0,
    accumulation_steps: int = 1,
    threads: int | None = None,
    device: torch.device | str | None = None,
    on_epoch: OnEpoch | None = None,
    resume: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``task``'s model from scratch under ``schedule`` and evaluate every epoch.

    Args:
        max_lr, min_lr: the schedule's LR range (see `autolr.schedules`).
        epochs: passes over ``task.train_set``; the schedule spans all of them.
        weight_decay: L2 coefficient for weights; biases and norm parameters get none.
        bn_momentum: weight of the new batch statistic in every BatchNorm layer
            (torch convention; None keeps the model's own, usually 0.1).
        accumulation_steps: batches per optimizer step (the range test's
            ``accumulation_steps``: the LR is picked for that effective batch);
            the schedule counts optimizer steps.
        threads: torch threads while training (None: torch's current setting).
            Sums split over threads round differently, so runs meant to match
            bit for bit (a search trial and the final run) must use the same.
        on_epoch: ``on_epoch(metrics, state)`` after each epoch; ``state()``
            returns a checkpoint dict for ``resume=``. Returning True stops.
        resume: a ``state()`` dict; training continues after its epoch and
            reproduces the uninterrupted run (same seed and arguments). The
            dict holds only tensors and plain values, so it survives
            ``torch.save``/``torch.load(weights_only=True)``. Random data
            augmentation must draw from torch's RNG to be reproduced.
        progress: show a tqdm bar over epochs (on a terminal only).

    Data-parallel: called on every rank under torch.distributed (as Ray Train's
    TorchTrainer starts it), the model trains wrapped in DistributedDataParallel
    and each rank takes its share of every batch (see `make_loaders`), so the
    run is the single process's up to float rounding, BatchNorm aside (its
    statistics are per rank). The metrics, ``state()`` and ``resume`` are the
    plain model's; every rank reports the same train loss.

    Raises:
        TrainingDivergedError: the training loss became NaN or infinite (the LR is too
            high for this model), or ``resume`` came from a different setup.
    """
    _check_train_args(epochs, weight_decay, accumulation_steps, threads)
    with torch_threads(threads):
        device = torch.device(device) if device is not None else default_device()
        setup = dict(  # what a resumed run must share with the saved one
            max_lr=max_lr, min_lr=min_lr, epochs=epochs, weight_decay=weight_decay,
            bn_momentum=bn_momentum, schedule=schedule, seed=seed,
            accumulation_steps=accumulation_steps,
        )  # fmt: skip
        start = fresh(
            task,
            seed=seed,
            lr=min_lr,
            weight_decay=weight_decay,
            bn_momentum=bn_momentum,
            device=device,
        )
        model, optimizer = start.model, start.optimizer
        scheduler = make_scheduler(
            schedule,
            optimizer,
            max_lr=max_lr,
            min_lr=min_lr,
            total_steps=epochs * steps_per_epoch(len(start.train_loader), accumulation_steps),
        )
        history = _resume(resume, setup, model, optimizer, scheduler)
        # Wrapped after the resume: DDP starts every rank from rank 0's weights.
        trained = _data_parallel(model, device) if world_size() > 1 else model

        state = functools.partial(_state, history, setup, model, optimizer, scheduler)
        bar = _epoch_bar(task.name, len(history), epochs, progress)
        for epoch in bar:
            # Reseeding per epoch makes the shuffle a function of (seed, epoch), so resume needs no
            # loader state.
            start.train_loader.generator.manual_seed(seed + epoch)
            try:
                metrics = _epoch(trained, start, scheduler, task, device, accumulation_steps, epoch)
            except FloatingPointError as exc:
                raise TrainingDivergedError(
                    f"{exc} in epoch {epoch + 1} of {epochs} (max_lr={max_lr:.4g}); expected a "
                    f"finite loss. Lower max_lr."
                ) from exc
            history.append(metrics)
            # A dict, not keywords: a metric named "loss" would clash with the train loss.
            bar.set_postfix(
                {"train_loss": metrics.train_loss, f"val_{task.metric_name}": metrics.val_metric}
            )
            if on_epoch is not None and on_epoch(metrics, state):
                break
        bar.close()
    return TrainResult(
        history=tuple(history),
        metric=task.metric_name,
        val_metric=history[-1].val_metric,
        val_loss=history[-1].val_loss,
        seconds=sum(m.seconds for m in history),
    )


def _epoch_bar(name: str, done: int, epochs: int, progress: bool) -> tqdm:
    """A tqdm bar over the epochs still to train, on a terminal only (as in range_test)."""
    return tqdm(
        range(done, epochs),
        desc=name,
        unit="epoch",
        initial=done,
        total=epochs,
        disable=None if progress else True,
    )
