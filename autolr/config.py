"""Typed pipeline configuration: YAML file + ``--set key=value`` overrides.

Every key is checked against the dataclasses below; a wrong key or value
raises `ConfigError` naming what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autolr._checks import one_line
from autolr.errors import ConfigError

SCHEDULERS = ("asha", "fifo")  # Tune's ASHAScheduler, FIFOScheduler
# Factors on both ends of the curve's 1cycle range that the search tries, so the max LR is
# validated by training, not only read off the curve: 9 factors over 0.7 decade either
# side of the pick, one trial each (the pick twice with 10 trials). Chosen
# leave-one-family-out on the 18-task selection suite among 3, 5, 7 or 9 factors over
# +-0.3, 0.5, 0.7 or 0.9 decade (every fold chose this set): simulated on the grid
# (4 seeds near the best), the held-out pick validated this way is 0.08 goal units
# from the best 1cycle LR on average and 1.3 at worst, against 0.29 / 1.9 with the 5
# factors (0.2, 0.45, 1, 2.2, 5) of before, at the same 10 trials. Measured end to end
# (2 pipeline runs per task) the two sets are within noise of each other: -0.44 / 2.8
# against -0.29 / 1.5 goal units, and 1.1 / 9.4 against 0.86 / 9.4 with the chosen max
# LR retrained on the grid's protocol. The best LR sits -0.3..1.0 decades below the
# divergence onset (benchmarks/results/selection.md).
LR_SCALES = (0.2, 0.3, 0.45, 0.67, 1.0, 1.5, 2.2, 3.3, 5.0)


@dataclass(frozen=True)
class RangeTestConfig:
    start_lr: float = 1e-7  # first LR of the sweep
    end_lr: float = 10.0  # last LR of the sweep
    num_iter: int = 100  # optimizer steps in the sweep
    # steps of all sweeps when the test extends itself (None: max(3 * num_iter, one epoch))
    max_iter: int | None = None
    mode: str = "exp"  # "exp" or "linear" spacing
    # stop once the loss rises above its best by (factor - 1) x the descent to it
    diverge_factor: float = 2.0
    # batches per optimizer step, in the range test, every trial and the final run alike
    accumulation_steps: int = 1
    val_loss: bool = False  # record the validation loss instead of the batch loss
    repeats: int = 3  # tests with seeds seed, seed+1, ...; their median curve is used
    seed: int = 0

    def __post_init__(self) -> None:
        from autolr.selection._curve import MIN_POINTS  # what selection needs of a curve

        _check(
            0 < self.start_lr < self.end_lr,
            "range_test",
            "0 < start_lr < end_lr",
            f"start_lr={self.start_lr}, end_lr={self.end_lr}",
        )
        _check(
            self.num_iter >= MIN_POINTS,
            "range_test",
            f"num_iter >= {MIN_POINTS}",
            f"{self.num_iter}",
        )
        _check(
            self.mode in ("exp", "linear"), "range_test", "mode 'exp' or 'linear'", repr(self.mode)
        )
        _check(
            self.diverge_factor > 1, "range_test", "diverge_factor > 1", f"{self.diverge_factor}"
        )
        _check(self.repeats >= 1, "range_test", "repeats >= 1", f"{self.repeats}")
        _check(
            self.max_iter is None or self.max_iter >= self.num_iter,
            "range_test",
            "max_iter null or >= num_iter",
            f"{self.max_iter}",
        )
        _check(
            self.accumulation_steps >= 1,
            "range_test",
            "accumulation_steps >= 1",
            f"{self.accumulation_steps}",
        )


@dataclass(frozen=True)
class SelectionConfig:
    method: str = "changepoint"  # see autolr.selection.METHODS

    def __post_init__(self) -> None:
        from autolr.selection import METHODS

        _check(self.method in METHODS, "selection", f"method in {METHODS}", repr(self.method))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = None  # None: the task's suggested budget
    schedule: str = "onecycle"  # see autolr.schedules
    weight_decay: float = 5e-4  # L2 coefficient (decoupled for AdamW)
    bn_momentum: float | None = None  # torch convention: weight of the new batch statistic
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            self.epochs is None or self.epochs >= 1,
            "train",
            "epochs >= 1 or null",
            f"{self.epochs}",
        )
        from autolr.schedules import SCHEDULES

        _check(self.schedule in SCHEDULES, "train", f"schedule in {SCHEDULES}", repr(self.schedule))
        _check(
            0 <= self.weight_decay < math.inf,
            "train",
            "a finite weight_decay >= 0",
            f"{self.weight_decay}",
        )
        _check(
            self.bn_momentum is None or 0 < self.bn_momentum <= 1,
            "train",
            "bn_momentum in (0, 1] or null",
            f"{self.bn_momentum}",
        )


@dataclass(frozen=True)
class SearchConfig:
    """Ray Tune search of weight decay, BatchNorm momentum and the LR scale under 1cycle.

    Each dimension is drawn from a range, or from a list of values
    (``*_values``, ``lr_scales``); with ``grid`` every listed value is tried,
    every combination of the lists, ``num_samples`` times over.
    """

    enabled: bool = True
    # trials, taking lr_scales in turn from the pick outwards (search.scale_points): one
    # per scale by default, and a 10th past an edge scale or the pick again (see
    # extend_at_edge); with grid, repeats of the whole grid
    num_samples: int = 10
    epochs: int | None = None  # per trial; None: the final training's budget
    # "fifo": every trial trains its full budget; "asha": weak trials stop early.
    # FIFO by default since the search chooses the LR: ASHA compares 1cycle runs
    # at early rungs, where a higher max_lr is still near its peak and looks worse.
    # On the 18-task selection suite the pipeline's gap to the best 1cycle LR (3 drawn
    # LR factors, end to end) was -0.10 goal units mean / 2.5 worst with FIFO, 1.7 / 15
    # with ASHA, at 124 against 79 epochs of selection (benchmarks/results/selection.md).
    scheduler: str = "fifo"
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor at each rung
    weight_decay_min: float = 1e-6  # log-uniform range, plus exactly 0 with zero_wd_prob
    weight_decay_max: float = 1e-2
    zero_wd_prob: float = 0.125  # chance that a trial uses weight_decay = 0
    # log-uniform; torch convention (weight of the new batch); raised for short trials so
    # the running statistics average at most a tenth of a run (see bn_momentum_floor)
    bn_momentum_min: float = 0.01
    bn_momentum_max: float = 0.5
    # Lists replace the ranges above: e.g. Smith's grid, [1e-3, 1e-4, 1e-5, 1e-6, 0]
    # and [0.01, 0.05, 0.1, 0.3]. Drawn uniformly, or each tried with grid.
    weight_decay_values: tuple[float, ...] | None = None
    bn_momentum_values: tuple[float, ...] | None = None
    # Unitless factors on the curve's max_lr and min_lr, one per trial; None or [1.0]: the pick only
    lr_scales: tuple[float, ...] | None = LR_SCALES
    grid: bool = False  # try every listed value (every combination) instead of drawing
    # the trial after one of each lr_scale goes one step past the range's edge when the
    # best so far trained at the lowest or highest scale (autolr.search.edge)
    extend_at_edge: bool = True
    wd_aware: bool = False  # re-run the range test inside each trial at its weight decay
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.25  # fraction of a GPU per trial; ignored without GPUs
    # Above 1: each trial trains data-parallel (DDP) on this many Ray Train workers, each
    # with cpus_per_trial CPUs and one whole GPU where the cluster has GPUs (NCCL needs
    # a GPU per rank); the task's batch is split over them, so the effective batch and
    # the LR picked for it stay those of a 1-worker trial.
    workers_per_trial: int = 1
    max_concurrent: int = 0  # 0: as many as the resources allow
    max_failures: int = 2  # retries of a crashed trial, from its last checkpoint
    seed: int = 0
    # Tune's checkpoints: a folder (None: ./ray_results, made absolute) or a URI such as
    # s3://bucket/prefix (its endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)
    storage_path: str | None = None
    ray_address: str | None = None  # None: $RAY_ADDRESS if set, else a private local Ray

    def __post_init__(self) -> None:
        self._check_budget()
        self._check_space()
        self._check_resources()

    def _check_budget(self) -> None:
        """Trials, their epochs and the scheduler."""
        _check(self.num_samples >= 1, "search", "num_samples >= 1", f"{self.num_samples}")
        _check(
            self.epochs is None or self.epochs >= 1,
            "search",
            "epochs >= 1 or null",
            f"{self.epochs}",
        )
        _check(
            self.scheduler in SCHEDULERS,
            "search",
            f"scheduler in {SCHEDULERS}",
            repr(self.scheduler),
        )
        _check(self.grace_period >= 1, "search", "grace_period >= 1", f"{self.grace_period}")
        _check(
            self.reduction_factor >= 2,
            "search",
            "reduction_factor >= 2",
            f"{self.reduction_factor}",
        )

    def _check_space(self) -> None:
        """The ranges and value lists searched over."""
        _check(
            0 < self.weight_decay_min < self.weight_decay_max,
            "search",
            "0 < weight_decay_min < weight_decay_max",
            f"{self.weight_decay_min}, {self.weight_decay_max}",
        )
        _check(
            0 <= self.zero_wd_prob <= 1, "search", "zero_wd_prob in [0, 1]", f"{self.zero_wd_prob}"
        )
        _check(
            0 < self.bn_momentum_min < self.bn_momentum_max <= 1,
            "search",
            "0 < bn_momentum_min < bn_momentum_max <= 1",
            f"{self.bn_momentum_min}, {self.bn_momentum_max}",
        )
        self._check_values("weight_decay_values", lambda v: 0 <= v < math.inf, "finite values >= 0")
        self._check_values("bn_momentum_values", lambda v: 0 < v <= 1, "values in (0, 1]")
        self._check_values("lr_scales", lambda v: 0 < v < math.inf, "finite factors > 0")
        _check(
            not self.grid
            or self.weight_decay_values is not None
            or self.bn_momentum_values is not None
            or len(self.lr_scales or ()) > 1,
            "search",
            "weight_decay_values, bn_momentum_values or 2+ lr_scales with grid: true",
            "none of them",
        )

    def _check_resources(self) -> None:
        """What a trial asks of the cluster, and where Tune writes."""
        _check(self.cpus_per_trial > 0, "search", "cpus_per_trial > 0", f"{self.cpus_per_trial}")
        _check(
            0 < self.gpus_per_trial <= 8,
            "search",
            "gpus_per_trial in (0, 8]",
            f"{self.gpus_per_trial}",
        )
        _check(
            self.workers_per_trial >= 1,
            "search",
            "workers_per_trial >= 1",
            f"{self.workers_per_trial}",
        )
        # ASHA stops a trial inside its Ray Train run; the run's workers then kept their
        # CPUs (ray 2.60, a Ray without the State API that Train's cleaner polls) and the
        # next trial waited for them forever.
        _check(
            self.workers_per_trial == 1 or self.scheduler == "fifo",
            "search",
            'scheduler "fifo" with workers_per_trial > 1',
            f"scheduler {self.scheduler!r} with workers_per_trial {self.workers_per_trial}",
        )
        _check(self.max_concurrent >= 0, "search", "max_concurrent >= 0", f"{self.max_concurrent}")
        _check(self.max_failures >= 0, "search", "max_failures >= 0", f"{self.max_failures}")
        _check(
            self.storage_path is None
            or (
                bool(re.match(r"[A-Za-z][\w+.-]*://\S", self.storage_path))
                if "://" in self.storage_path
                else bool(self.storage_path.strip())
            ),
            "search",
            "storage_path a folder, or a URI scheme://location such as s3://bucket/prefix",
            repr(self.storage_path),
        )

    def _check_values(self, name: str, ok: Callable[[float], bool], expected: str) -> None:
        """A ``*_values`` list is null or non-empty numbers that pass ``ok``; kept as a tuple."""
        values = getattr(self, name)
        if values is None:
            return
        numbers = isinstance(values, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        )
        _check(
            numbers and len(values) > 0 and all(ok(v) for v in values),
            "search",
            f"{name} a non-empty list of {expected}, or null",
            repr(list(values)) if isinstance(values, tuple) else repr(values),
        )
        # Python callers may pass a list; the frozen config stays hashable.
        object.__setattr__(self, name, tuple(float(v) for v in values))


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under ./mlruns
    experiment: str = "autolr"
    run_name: str | None = None


@dataclass(frozen=True)
class Config:
    task: str = "mnist1d"  # a built-in name or "module:function"
    task_params: dict[str, Any] = field(default_factory=dict)
    range_test: RangeTestConfig = field(default_factory=RangeTestConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, section: str, expected: str, got: str) -> None:
    if not ok:
        raise ConfigError(f"{section}: expected {expected}, but got {got}.")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML) if given, apply ``key.sub=value`` overrides, validate.

    An override of ``task`` with another task drops the file's ``task_params``:
    they are that file's task's; ``task_params.*`` overrides still apply.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config file {str(path)!r} is not valid YAML: {one_line(exc)}"
            ) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of keys, "
                f"but holds a {type(loaded).__name__}."
            )
        data = loaded or {}
    parsed = [_parse_override(item) for item in overrides]
    # A file's task_params belong to its task: another task starts from none, plus the
    # task_params overrides (in any order around the task's).
    tasks = [value for key, value in parsed if key == "task"]
    if tasks and tasks[-1] != data.get("task", Config.task):
        data.pop("task_params", None)
    for key, value in parsed:
        _set_dotted(data, key, value)
    return _build(Config, data, prefix="")


def _parse_override(item: str) -> tuple[str, Any]:
    """``"key.sub=value"`` as (key, the value read as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set takes key=value (e.g. train.epochs=5), but got {item!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {one_line(exc)}") from exc
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section.")
        node = child
    node[leaf] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, but got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; expected one of {sorted(fields)}."
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a simple type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_describe(hint)}, but got {value!r}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, but got {value!r}.")
        return dict(value)
    if origin is tuple:  # tuple[X, ...]: a YAML list, each item coerced like a single X
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_describe(hint)}, but got {value!r}.")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {_describe(hint)}, but got {value!r}.")


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return f"a list of {getattr(args[0], '__name__', args[0])}s"
    if args:
        return " or ".join(_describe(a) for a in args)
    name = getattr(hint, "__name__", str(hint))
    return "null" if hint is type(None) else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
