"""The LR range test: sweep the learning rate upwards, record the loss, put everything back.

The test trains ``model`` for up to ``num_iter`` optimizer steps, raising the
learning rate at each one, and stops early once the loss blows up. Afterwards
the model, the optimizer, the gradients, the modules' train/eval flags and the
global random streams (python, numpy, torch CPU and CUDA) are exactly as they
were, so the test can run before training without changing what training does.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from autolr._checks import check_int, mad_sd
from autolr._distributed import mean_across_ranks, world_size
from autolr._snapshot import SavedState
from autolr.errors import ArgumentError
from autolr.results import RangeTestResult

if TYPE_CHECKING:
    from autolr.config import RangeTestConfig
    from autolr.tasks.base import Task

logger = logging.getLogger(__name__)

MODES = ("exp", "linear")
STOP_WINDOW = 5  # losses whose median the divergence stop reads
# The stop reads the loss's changes, never its level, so a constant added to
# the loss changes nothing: the median must rise above its best by
# (diverge_factor - 1) times the descent before that best, and by STOP_NOISE
# sds of the batch-to-batch noise. Replayed over the 108 recorded curves of
# the 18-task benchmark (benchmarks/results/selection/curves.jsonl), the
# default diverge_factor=2 stops 31 at the old rule's step, 66 earlier
# (median 8 steps, at most 23; no max_lr pick moved: the pick cuts the curve
# at the onset, which is still on it) and 11 later (each with the onset
# already on the recorded curve). STOP_NOISE 4 moved two picks by 0.24 and
# 0.32 decade; 6 and 8 moved none.
STOP_NOISE = 6.0
# No divergence stop before this many steps (NaN/inf still stops at once): the
# noise sd needs them. Flat Gaussian curves stopped in 4 of 1000 seeds with
# 10, none with 20; 20 is also the fewest points a pick needs.
STOP_WARMUP = 20

_PAIR_HINT = (
    "range_test expects each batch to be an (inputs, targets) pair; wrap the dataset so "
    "__getitem__ returns (x, y), or give the DataLoader a collate_fn that returns "
    "(inputs, targets), or pass step_fn=lambda model, batch: <the loss> for other batches"
)


# 18 keywords: the public entry, whose every knob (the sweep, the stop, batches, AMP,
# progress) a user sets by name, as with torch-lr-finder's range_test and fastai's lr_find.
def range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor] | None,
    train_loader: Iterable,
    *,
    step_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    repeats: int = 1,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    mode: str = "exp",
    diverge_factor: float = 2.0,
    accumulation_steps: int = 1,
    val_loader: Iterable | None = None,
    amp: bool | str = "auto",
    check_every: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_iter: int | None = None,
) -> RangeTestResult:
    """Run an LR range test and restore the model and optimizer afterwards.

    Args:
        model: the model, already on its device, in the configuration you train it in.
            Each module's train/eval flag is kept: a BatchNorm you froze in eval
            mode stays in eval mode (a model wholly in eval mode is trained in
            train mode).
        optimizer: a torch optimizer over the model's parameters, with no LR
            scheduler attached yet. Its momentum/Adam state is used as it is.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``, a batch mean;
            None when ``step_fn`` computes the loss.
        train_loader: yields ``(x, y)`` batches; ``x`` is a tensor (called as
            ``model(x)``) or a tuple/list of tensors (called as ``model(*x)``).
            With ``step_fn``, any batch: a dict, a tuple of three, an object.
            It is re-iterated when it has fewer than the batches the test needs.
        step_fn: ``step_fn(model, batch) -> scalar loss tensor`` replaces
            ``loss_fn(model(x), y)``, for batches and models of any shape: dict
            batches, ``model(**batch)``, a loss inside the model's output (Hugging
            Face), a framework's own step (Lightning's ``training_step``).
            Tensors in tuples, lists and dicts arrive on ``device``; the step
            only computes the loss (no ``backward``, no ``optimizer.step``).
            With ``val_loader`` the validation loss is its mean over batches.
        repeats: tests to run, each from the restored state with its own random
            streams (batch order, dropout), combined by `median_curve`; the
            repeats use the iterations the first one settled on. One sweep is
            noisy where the loss blows up; the pipeline uses 3.
        start_lr, end_lr: the first and last learning rate of the sweep (per step).
        num_iter: optimizer steps in the full sweep, endpoints included.
        mode: ``"exp"`` (geometric steps, the usual choice) or ``"linear"``.
        diverge_factor: stop once the median of the last 5 losses has risen
            above its best by ``diverge_factor - 1`` times the descent before
            that best (2: back above the highest loss before it), and clearly
            beyond the noise; a constant added to the loss changes nothing.
            NaN or inf losses stop the test too. The point that stops the test
            is recorded, so the curve shows the blow-up.
        accumulation_steps: micro-batches per optimizer step; the recorded loss
            is their mean, one point per optimizer step.
        val_loader: if given, record the mean loss over it after each step
            (``loss_kind="val"``) instead of the training-batch loss. It is a
            full pass per step, so keep it small.
        amp: ``"auto"`` uses autocast (float16) with a GradScaler on CUDA only;
            ``True`` demands CUDA and raises ``ValueError`` elsewhere; ``False``
            never uses it.
        check_every: steps between divergence checks. Reading a loss forces a
            host-device sync, so accelerators batch them: the default is 1 on CPU
            and 10 elsewhere. Steps past the stopping point are dropped from the
            result, so it is the same for every ``check_every``.
        device: where batches are moved; default the device of the model's
            first parameter. The model is not moved.
        progress: show a tqdm bar with the current lr and loss (on a terminal only).
        max_iter: the budget, in optimizer steps, of the adaptive extension.
            When a sweep does not resolve the descent (too few points on it, or
            a drop within the noise; see `autolr.selection.unresolved`), the test
            is run again from the restored state over the same LR span with
            twice the iterations, while the steps of all sweeps fit in
            ``max_iter``. Default: the larger of ``3 * num_iter`` (one doubling)
            and one epoch of ``train_loader``; ``max_iter=num_iter`` turns it
            off. ``result.steps`` and ``result.note`` say what it took and why.

    Param groups: every group's ``lr`` is set directly at each step. Groups keep
    their ratios to the reference group (group 0, or the first group with a
    nonzero lr), so a group at lr 0 stays frozen; ``lrs`` records the reference
    group's learning rate.

    Data-parallel: under torch.distributed (a DDP model, each rank with its own
    shard of the batches) the recorded loss is the mean over the ranks, so every
    rank records one curve, takes the same stop and restores its own state; B
    per rank over N ranks measures the curve of one process at batch N x B.

    Restore: afterwards, also when the test raises, these are as they were, bit
    for bit: every parameter of the model or the optimizer (a learnable loss
    temperature the optimizer steps too), every buffer, persistent or not
    (BatchNorm statistics included), the optimizer's param groups (``lr``
    included) and state (momentum, Adam moments), the gradients, every
    module's train/eval flag, and the global random streams (python, numpy,
    torch CPU, and CUDA when used), so the test does not shift the user's
    random stream. A loader with its own generator
    still advances it. The cache is an in-memory deep copy on the model's device
    (no temp files, so parallel tests cannot clash): one extra copy of the
    parameters, buffers and optimizer state.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> result = range_test(model, opt, torch.nn.CrossEntropyLoss(),
        ...                     DataLoader(data, batch_size=16), num_iter=20, max_iter=20,
        ...                     progress=False)
        >>> len(result.lrs) <= 20, opt.param_groups[0]["lr"]
        (True, 0.1)
    """
    _check_args(start_lr, end_lr, num_iter, mode, diverge_factor, accumulation_steps, check_every)
    compute_loss = _check_step(loss_fn, step_fn)
    check_int("repeats", repeats, 1)
    _check_optimizer(optimizer)
    _check_loaders(train_loader, val_loader)
    max_iter = _budget(max_iter, num_iter, train_loader, accumulation_steps)
    device = _resolve_device(model, device)
    how = _Sweep(
        compute_loss=compute_loss,
        paired=step_fn is None,
        train_loader=train_loader,
        diverge_factor=diverge_factor,
        accumulation_steps=accumulation_steps,
        val_loader=val_loader,
        use_amp=_resolve_amp(amp, device),
        check_every=check_every or (1 if device.type == "cpu" else 10),
        device=device,
        progress=progress,
    )
    span = _Span(float(start_lr), float(end_lr), num_iter, mode)
    result = _extended(model, optimizer, how, span, max_iter)
    results = [result]
    for seed in _repeat_seeds(repeats - 1):
        with _seeded(seed, cuda=device.type == "cuda"):
            # at the iterations the first test settled on, without extending again
            settled = replace(span, num_iter=result.num_iter)
            results.append(_extended(model, optimizer, how, settled, settled.num_iter))
    if repeats == 1:
        return result
    return replace(median_curve(results), steps=sum(r.steps for r in results), note=result.note)


@dataclass(frozen=True)
class _Sweep:
    """How each sweep steps, reads its loss and stops: `range_test`'s settings, resolved."""

    compute_loss: Callable[[nn.Module, Any], torch.Tensor]
    paired: bool  # (x, y) batches for loss_fn, rather than any batch for a step_fn
    train_loader: Iterable
    diverge_factor: float
    accumulation_steps: int
    val_loader: Iterable | None
    use_amp: bool
    check_every: int
    device: torch.device
    progress: bool


@dataclass(frozen=True)
class _Span:
    """The LRs of one sweep: ``num_iter`` of them from ``start_lr`` to ``end_lr``."""

    start_lr: float
    end_lr: float
    num_iter: int
    mode: str  # "exp" or "linear"

    def schedule(self) -> np.ndarray:
        space = np.geomspace if self.mode == "exp" else np.linspace
        return space(self.start_lr, self.end_lr, self.num_iter)


def _extended(
    model: nn.Module, optimizer: torch.optim.Optimizer, how: _Sweep, span: _Span, max_iter: int
) -> RangeTestResult:
    """Sweep ``span``; while the descent is unresolved, again at twice the iterations,
    as long as the steps of all sweeps fit in ``max_iter`` (the adaptive extension)."""
    from autolr.selection import unresolved  # selection reads curves; only its check is needed

    steps, tried = 0, []
    while True:
        schedule = span.schedule()
        losses, stop_reason = _sweep(model, optimizer, schedule.tolist(), how)
        steps += len(losses)
        result = RangeTestResult(
            lrs=schedule[: len(losses)],
            losses=np.asarray(losses, dtype=np.float64),
            stop_reason=stop_reason,
            mode=span.mode,
            loss_kind="train" if how.val_loader is None else "val",
            start_lr=span.start_lr,
            end_lr=span.end_lr,
            num_iter=span.num_iter,
        )
        why = unresolved(result)
        if why is None or steps + 2 * span.num_iter > max_iter:
            break
        tried.append(f"{span.num_iter} iterations ({why})")
        span = replace(span, num_iter=2 * span.num_iter)
    note = f"extended to {span.num_iter} iterations after " + ", ".join(tried) if tried else ""
    if why is not None:
        note += f"{'; ' if note else ''}unresolved at {span.num_iter} iterations ({why}) "
        note += f"within max_iter={max_iter}"
    logger.info(
        "range test %s after %d of %d steps (lr %.3g -> %.3g)%s",
        result.stop_reason,
        len(result.lrs),
        span.num_iter,
        result.lrs[0],
        result.lrs[-1],
        f"; {note}" if note else "",
    )
    return replace(result, steps=steps, note=note, optimizer=type(optimizer).__name__)


def _check_loaders(train_loader: Iterable, val_loader: Iterable | None) -> None:
    _check_not_empty(train_loader, "train_loader")
    if val_loader is None:
        return
    _check_not_empty(val_loader, "val_loader")
    if isinstance(val_loader, Iterator):
        raise ArgumentError(
            "val_loader is a one-shot iterator, but the val loss is computed over it "
            "after every step; pass a re-iterable loader, such as a DataLoader or a list."
        )


def _repeat_seeds(count: int) -> list[int]:
    """Seeds for the repeats, drawn from the caller's torch stream without advancing it."""
    state = torch.get_rng_state()
    seeds = torch.randint(0, 2**31 - 1, (count,)).tolist()
    torch.set_rng_state(state)
    return seeds


@contextmanager
def _seeded(seed: int, cuda: bool) -> Iterator[None]:
    """Seed python, numpy and torch (CUDA too) for one repeat; the caller's streams after."""
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_rng)
            np.random.set_state(numpy_rng)


def _sweep(
    model: nn.Module, optimizer: torch.optim.Optimizer, schedule: list[float], how: _Sweep
) -> tuple[list[float], str]:
    """One sweep over ``schedule``; (losses, stop reason). State is restored afterwards."""
    ratios = _lr_ratios(optimizer)
    saved = SavedState.capture(model, optimizer, cuda=how.device.type == "cuda")
    modes = _train_modes(model)
    scaler = torch.amp.GradScaler(how.device.type, enabled=how.use_amp)
    prepare = _to_device if how.paired else _move
    batches = (prepare(batch, how.device) for batch in _cycle(how.train_loader))
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses still on the device, read in batches
    stop_reason = None
    # disable=None: a bar on a terminal only; in a log (CI, a Ray job, `> out.log`)
    # tqdm would write a line per update, hundreds per run
    bar = tqdm(
        total=len(schedule), desc="range test", disable=None if how.progress else True, leave=False
    )
    try:
        _apply_modes(modes)
        for step, lr in enumerate(schedule):
            _set_lr(optimizer, lr, ratios)
            loss = _train_step(
                model,
                optimizer,
                how.compute_loss,
                batches,
                how.accumulation_steps,
                scaler,
                how.device,
            )
            if how.val_loader is not None:
                loss = _val_loss(model, how, prepare)
                _apply_modes(modes)  # _val_loss evaluated in eval mode
            # Under torch.distributed every rank records the loss over all ranks' batches,
            # so all see one curve and stop at the same step (a rank that stopped alone
            # would leave the others waiting in DDP's all-reduce). A no-op otherwise.
            pending.append(mean_across_ranks(loss))
            bar.update(1)
            if len(pending) == how.check_every or step == len(schedule) - 1:
                stop_reason = _read(pending, losses, how.diverge_factor)
                pending.clear()
                bar.set_postfix(lr=f"{schedule[len(losses) - 1]:.2e}", loss=f"{losses[-1]:.4g}")
                if stop_reason is not None:
                    break
    finally:
        batches.close()  # shuts down the loader's workers now, not at garbage collection
        bar.close()
        saved.restore(model, optimizer)
    return losses, stop_reason or "completed"


def _train_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """The train/eval flag of each module during the sweep's training steps.

    The user's own: a submodule they put in eval mode (a frozen BatchNorm) stays
    in eval mode, so the curve is measured in their training configuration. A
    model left wholly in eval mode (its root's flag off) is trained as
    ``model.train()`` would. The flags are restored afterwards either way.
    """
    return [(module, module.training or not model.training) for module in model.modules()]


def _apply_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def _budget(
    max_iter: int | None, num_iter: int, train_loader: Iterable, accumulation_steps: int
) -> int:
    check_int("max_iter", max_iter, num_iter, optional=True)  # at least num_iter
    if max_iter is not None:
        return max_iter
    try:
        epoch = len(train_loader) // accumulation_steps  # type: ignore[arg-type]
    except TypeError:
        epoch = 0
    return max(3 * num_iter, epoch)


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterator,
    accumulation_steps: int,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> torch.Tensor:
    """One optimizer step over ``accumulation_steps`` micro-batches; their mean loss."""
    model.zero_grad(set_to_none=True)  # also the params the optimizer does not own
    optimizer.zero_grad(set_to_none=True)
    micro_losses = []
    for _ in range(accumulation_steps):
        batch = next(batches)
        with torch.autocast(device.type, enabled=scaler.is_enabled()):
            loss = _loss(model, step, batch)
        scaler.scale(loss / accumulation_steps).backward()
        micro_losses.append(loss.detach().float())
    scaler.step(optimizer)
    scaler.update()
    return torch.stack(micro_losses).mean()


def _read(pending: list[torch.Tensor], losses: list[float], diverge_factor: float) -> str | None:
    """Move ``pending`` losses into ``losses`` up to the first that stops the test.

    Returns ``"nonfinite"``, ``"diverged"`` or None (keep going). The stopping
    loss itself is recorded so the curve shows the blow-up.
    """
    for value in torch.stack(pending).tolist():  # one host-device sync for the whole batch
        losses.append(value)
        if not math.isfinite(value):
            return "nonfinite"
        if _diverged(losses, diverge_factor):
            return "diverged"
    return None


def _diverged(losses: list[float], diverge_factor: float) -> bool:
    """Whether the loss has risen above its best by (diverge_factor - 1) x the descent.

    Read on the median of the last `STOP_WINDOW` losses, so one bad batch
    cannot end the sweep (on a noisy MSE regression a single batch ended it a
    decade early), and only on changes of the loss: the descent is the highest
    median before the best one minus the best, and the rise must also beat
    `STOP_NOISE` sds of the noise, so a sweep still on its plateau (no descent
    yet) stops only on a clear rise.
    """
    if len(losses) < STOP_WARMUP:
        return False
    medians = np.median(np.lib.stride_tricks.sliding_window_view(losses, STOP_WINDOW), axis=1)
    i_best = int(np.argmin(medians))
    best = float(medians[i_best])
    rise = float(medians[-1]) - best
    if rise <= (diverge_factor - 1.0) * (float(medians[: i_best + 1].max()) - best):
        return False
    noise = mad_sd(np.diff(losses)) / math.sqrt(2.0)  # a difference of two: var = 2 sd^2
    # The float32 losses are rounded to ~1e-7 of their magnitude: no rise below that.
    return rise > max(STOP_NOISE * noise, 1e-6 * float(np.abs(losses).max()))


def _check_step(
    loss_fn: Callable | None, step_fn: Callable | None
) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The one callable that turns (model, batch) into the loss."""
    if (loss_fn is None) == (step_fn is None):
        raise ArgumentError(
            "range_test needs exactly one of loss_fn (for (x, y) batches) and step_fn "
            f"(model, batch) -> loss, but got {loss_fn=} and {step_fn=}."
        )
    if step_fn is not None:
        return step_fn

    def pair_step(model: nn.Module, batch: tuple[Any, Any]) -> torch.Tensor:
        x, y = batch
        return loss_fn(model(*x) if isinstance(x, (tuple, list)) else model(x), y)

    pair_step.__qualname__ = "loss_fn"  # the name the scalar check below gives the user
    return pair_step


def _loss(model: nn.Module, step: Callable, batch: Any) -> torch.Tensor:
    loss = step(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        name = "loss_fn" if getattr(step, "__qualname__", "") == "loss_fn" else "step_fn"
        raise ArgumentError(f"{name} must return a scalar tensor, but returned {shape}.")
    return loss.reshape(())


@torch.no_grad()
def _val_loss(model: nn.Module, how: _Sweep, prepare: Callable) -> torch.Tensor:
    """The example-weighted mean loss over ``how.val_loader`` (per batch with a step_fn).

    ``prepare`` moves a batch to ``how.device``, as for the training batches.
    """
    model.eval()
    device = how.device
    total = torch.zeros((), device=device)
    count = 0
    for raw in how.val_loader:
        batch = prepare(raw, device)
        with torch.autocast(device.type, enabled=how.use_amp):
            loss = _loss(model, how.compute_loss, batch)
        y = batch[1] if how.paired else None
        n = y.shape[0] if isinstance(y, torch.Tensor) and y.ndim > 0 else 1
        total += loss.float() * n
        count += n
    if count == 0:
        raise ArgumentError("val_loader is empty; expected at least one (x, y) batch.")
    return total / count


def _cycle(loader: Iterable) -> Iterator:
    """Yield the loader's batches forever, re-iterating it when it runs out."""
    total = 0
    while True:
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if count == 0 and total > 0:
            raise ArgumentError(
                f"train_loader ran out after {total} batches and yielded none when iterated "
                "again (a one-shot iterator or generator?); pass a re-iterable loader, such "
                "as a DataLoader or a list of batches."
            )
        if count == 0:
            raise ArgumentError("train_loader is empty; expected at least one (x, y) batch.")
        total += count


def _to_device(batch: Any, device: torch.device) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = (
            f"a dict with keys {sorted(map(str, batch))}"
            if isinstance(batch, dict)
            else f"a {type(batch).__name__} of length {len(batch)}"
            if isinstance(batch, (tuple, list))
            else f"a {type(batch).__name__}"
        )
        raise ArgumentError(f"{_PAIR_HINT}, but got {got}.")
    return tuple(_move(part, device) for part in batch)  # type: ignore[return-value]


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, Mapping):  # dict batches; Hugging Face's BatchEncoding is a Mapping
        return {key: _move(v, device) for key, v in value.items()}
    return value


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, ratios: list[float]) -> None:
    for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
        if isinstance(group["lr"], torch.Tensor):  # tensor lrs (capturable Adam) stay tensors
            group["lr"].fill_(lr * ratio)
        else:
            group["lr"] = lr * ratio


def _lr_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's lr relative to group 0, or to the first group with a nonzero lr."""
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    reference = next((lr for lr in lrs if lr != 0.0), 0.0)
    if reference == 0.0:
        return [1.0] * len(lrs)
    return [lr / reference for lr in lrs]


def _check_args(
    start_lr: float,
    end_lr: float,
    num_iter: int,
    mode: str,
    diverge_factor: float,
    accumulation_steps: int,
    check_every: int | None,
) -> None:
    # `not x > 0` rather than `x <= 0` so that NaN is rejected too.
    if not (start_lr > 0 and math.isfinite(start_lr)):
        raise ArgumentError(f"start_lr must be a finite number > 0, but got {start_lr=}.")
    if not (end_lr > start_lr and math.isfinite(end_lr)):
        raise ArgumentError(
            f"end_lr must be finite and > start_lr, but got {end_lr=} with {start_lr=}."
        )
    check_int("num_iter", num_iter, 2)  # two points define a sweep
    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {MODES}, but got {mode=}.")
    if not diverge_factor > 1:
        raise ArgumentError(f"diverge_factor must be > 1, but got {diverge_factor=}.")
    check_int("accumulation_steps", accumulation_steps, 1)
    check_int("check_every", check_every, 1, optional=True)


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ArgumentError(
            f"range_test steps the optimizer once per batch without a closure, but "
            f"{type(optimizer).__name__}.step needs one (it re-evaluates the loss); use a "
            f"first-order optimizer such as SGD or AdamW for the range test."
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(p.requires_grad for p in params):
        raise ArgumentError(
            f"none of the optimizer's {len(params)} parameters requires grad, so there is "
            f"nothing to train; unfreeze some (param.requires_grad_(True)) before the range test."
        )
    # Every torch LRScheduler stores "initial_lr" in the groups it drives; it would
    # fight the sweep over the lr, and the restore would rewind it only halfway.
    if any("initial_lr" in group for group in optimizer.param_groups):
        raise ArgumentError(
            "the optimizer already has an LR scheduler attached (its param groups carry "
            "'initial_lr'); create the scheduler after the range test, or pass a fresh optimizer."
        )


def _check_not_empty(loader: Iterable, name: str) -> None:
    try:
        size = len(loader)  # type: ignore[arg-type]
    except TypeError:  # iterable-style loaders have no len; _cycle checks them lazily
        return
    if size == 0:
        raise ArgumentError(f"{name} is empty; expected at least one (x, y) batch.")


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    held = next((p.device for p in model.parameters()), None)  # where the model's weights are
    resolved = torch.device(device) if device is not None else held or torch.device("cpu")
    if "meta" in (resolved.type, held.type if held is not None else None):
        # Meta tensors have shapes but no data: there is no loss to record.
        raise ArgumentError(
            f"range_test needs a model and a device with data, but got device={resolved} and "
            f"parameters on {held or 'no device'}; materialize "
            f"the model first (model.to_empty(device='cpu'), then initialize it)."
        )
    return resolved


def _resolve_amp(amp: bool | str, device: torch.device) -> bool:
    if amp == "auto":
        return device.type == "cuda"
    if amp is True:
        if device.type != "cuda":
            # Raise rather than fall back: a silent fp32 run would mislead timing and memory.
            raise ArgumentError(
                f"amp=True needs a CUDA device (autocast + GradScaler), but got {device=}; "
                "pass amp='auto' to use AMP only on CUDA, or amp=False."
            )
        return True
    if amp is False:
        return False
    raise ArgumentError(f"amp must be 'auto', True or False, but got {amp=}.")


def range_test_task(
    task: Task,
    cfg: RangeTestConfig,
    *,
    weight_decay: float = 0.0,
    bn_momentum: float | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> RangeTestResult:
    """Range-test fresh models of ``task`` the way `autolr.training.train` trains them.

    Same optimizer, param groups (no decay on biases and norms), BatchNorm
    momentum and device as the training that follows. ``cfg.repeats`` tests
    (seeds ``cfg.seed``, ``cfg.seed + 1``, ...) are combined by `median_curve`.
    Under torch.distributed every rank calls it: the model is trained in DDP on
    each rank's share of the batches, as `train` does.
    """
    from autolr.training import _data_parallel, default_device, fresh

    results: list[RangeTestResult] = []
    num_iter, max_iter = cfg.num_iter, cfg.max_iter
    where = torch.device(device) if device is not None else default_device()
    distributed = world_size() > 1
    for seed in range(cfg.seed, cfg.seed + cfg.repeats):
        # What `train` starts from: its first epoch's batches, in its order.
        start = fresh(
            task,
            seed=seed,
            lr=cfg.start_lr,
            weight_decay=weight_decay,
            bn_momentum=bn_momentum,
            device=where,
        )
        result = range_test(
            _data_parallel(start.model, where) if distributed else start.model,
            start.optimizer,
            task.loss_fn,
            start.train_loader,
            start_lr=cfg.start_lr,
            end_lr=cfg.end_lr,
            num_iter=num_iter,
            mode=cfg.mode,
            diverge_factor=cfg.diverge_factor,
            accumulation_steps=cfg.accumulation_steps,
            val_loader=start.val_loader if cfg.val_loss else None,
            amp=False,  # `train` runs in full precision: measure the same thing
            progress=progress,
            max_iter=max_iter,
        )
        # The first test finds how many iterations resolve the descent; the
        # repeats use as many, so that their median is over one sweep.
        num_iter = max_iter = result.num_iter
        results.append(result)
    curve = median_curve(results)
    return replace(curve, steps=sum(r.steps for r in results), note=results[0].note)


def median_curve(results: Sequence[RangeTestResult]) -> RangeTestResult:
    """The pointwise median of range tests of the same sweep.

    A test counts as +inf from where it stopped, so the median curve runs as
    long as more than half of the tests did and ends with the stop reason of
    the test that ended there. Where the loss blows up is the noisiest part of
    a range test: on MNIST-1D the onset ranged over 0.42..1.29 across 8 seeds
    (std 0.155 decade of the max_lr pick); the median of 3 tests cut that to
    0.069, and to 0.09 on digits and the MNIST-1D MLP.
    """
    if not results:
        raise ArgumentError("median_curve needs at least one RangeTestResult, but got none.")
    if len(results) == 1:
        return results[0]
    full = max(results, key=lambda r: r.lrs.size)
    if any(not np.array_equal(r.lrs, full.lrs[: r.lrs.size]) for r in results):
        raise ArgumentError("median_curve needs range tests of one sweep (the same LRs per step).")
    losses = np.full((len(results), full.lrs.size), np.inf)
    for row, result in zip(losses, results, strict=True):
        row[: result.losses.size] = np.where(np.isnan(result.losses), np.inf, result.losses)
    ender = sorted(results, key=lambda r: r.lrs.size)[(len(results) - 1) // 2]
    n = ender.lrs.size
    return replace(ender, lrs=full.lrs[:n], losses=np.median(losses[:, :n], axis=0))
