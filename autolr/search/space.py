"""The search space and each trial's resources, from the search's config.

Pure functions of `SearchConfig`: Tune's sampling types are imported where the
space is built, so the sizing and counting need no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from autolr.config import SearchConfig
from autolr.errors import ArgumentError


def param_space(cfg: SearchConfig, bn_searched: bool = True) -> dict[str, Any]:
    """Tune's search space: each dimension from its ``*_values`` list, else from its range.

    A list is drawn from uniformly (``tune.choice``), or with ``cfg.grid`` tried
    value by value (``tune.grid_search``; several lists give every combination).
    ``lr_scale`` exists only with 2+ ``cfg.lr_scales`` (one factor other than 1
    is a constant).
    Without a list, ``weight_decay`` is 0 or log-uniform: ``tune.sample_from``
    gets no random state, so the mixture is built from two ordinary (seeded)
    draws, a uniform one that decides "zero" and a log-uniform candidate.
    """
    from ray import tune

    space: dict[str, Any] = {}
    if cfg.weight_decay_values is not None:
        space["weight_decay"] = _from_values(cfg.weight_decay_values, cfg.grid)
    else:
        zero_wd_prob = cfg.zero_wd_prob
        space["zero_wd_draw"] = tune.uniform(0.0, 1.0)
        space["weight_decay_if_nonzero"] = tune.loguniform(
            cfg.weight_decay_min, cfg.weight_decay_max
        )
        space["weight_decay"] = tune.sample_from(
            lambda config: (
                0.0 if config["zero_wd_draw"] < zero_wd_prob else config["weight_decay_if_nonzero"]
            )
        )
    if bn_searched:
        space["bn_momentum"] = (
            _from_values(cfg.bn_momentum_values, cfg.grid)
            if cfg.bn_momentum_values is not None
            else tune.loguniform(cfg.bn_momentum_min, cfg.bn_momentum_max)
        )
    scales = cfg.lr_scales or (1.0,)
    if len(scales) > 1:
        space["lr_scale"] = _from_values(scales, cfg.grid)
    elif scales != (1.0,):
        space["lr_scale"] = scales[0]
    return space


def scale_points(cfg: SearchConfig) -> list[dict[str, float]]:
    """The trials' LR scales when they are drawn: every scale in turn, the pick first.

    Tune's ``points_to_evaluate`` fixes ``lr_scale`` and samples the rest, so the
    ``num_samples`` trials spread evenly over the scales instead of drawing them:
    8 draws from 3 scales miss one in 11% of searches (3 x (2/3)^8), and the one
    missed may be the LR that trains best. The order goes out from the pick
    (factor 1), so a search of one trial trains the curve's own range.
    """
    scales = cfg.lr_scales or ()
    if cfg.grid or len(scales) < 2:
        return []
    order = sorted(scales, key=lambda scale: abs(math.log(scale)))
    return [{"lr_scale": order[i % len(order)]} for i in range(cfg.num_samples)]


# A BatchNorm layer's running statistics, which evaluation uses (training normalises by
# each batch's own), average about the last 1/momentum steps. Over much of a short run
# that average mixes in the early weights: on the selection suite's 6 BatchNorm tasks
# (76 to 270 optimizer steps a trial, 12 pipeline runs), the trials drawn at momentum
# 0.010-0.012 (a 100-step average: 37-130 % of the run) ranked among the 3 worst of 10
# in 32 of 36 cases, 1 to 65 pp below the run's best, while those at 0.08-0.5 (at most
# 12 steps, 4-16 %) had a median gap of 0.5 pp. They also left the LR factors they
# carried untested. The floor keeps the average within this share of a trial's steps.
BN_AVERAGE_SHARE = 0.1


def bn_momentum_floor(cfg: SearchConfig, steps: int) -> float:
    """The lowest BatchNorm momentum the search draws for trials of ``steps`` optimizer
    steps: ``cfg.bn_momentum_min``, raised to ``1 / (BN_AVERAGE_SHARE * steps)`` (so
    the running statistics average at most a tenth of the run), and at most half of
    ``cfg.bn_momentum_max`` (so that a very short run still has a range to search)."""
    floor = min(1.0 / (BN_AVERAGE_SHARE * steps), cfg.bn_momentum_max / 2)
    return max(cfg.bn_momentum_min, floor)


def extends_at_edge(cfg: SearchConfig) -> bool:
    """Whether a trial goes past an edge LR scale (`autolr.search.edge`): asked for, with
    the scales taken in turn (not a grid), and a trial left after one of each."""
    scales = cfg.lr_scales or ()
    return cfg.extend_at_edge and not cfg.grid and 2 <= len(scales) < cfg.num_samples


def num_trials(cfg: SearchConfig, bn_searched: bool = True) -> int:
    """How many trials the search runs: ``num_samples``, times the grid's size with ``grid``.

    Tune repeats a grid ``num_samples`` times; the BN list counts only where
    BatchNorm momentum is searched.
    """
    if not cfg.grid:
        return cfg.num_samples
    lists = [
        cfg.weight_decay_values,
        cfg.bn_momentum_values if bn_searched else None,
        cfg.lr_scales,
    ]
    return cfg.num_samples * math.prod(len(values) for values in lists if values is not None)


def _from_values(values: tuple[float, ...], grid: bool) -> Any:
    from ray import tune

    return tune.grid_search(list(values)) if grid else tune.choice(list(values))


def _dimension(name: str, values: tuple[float, ...] | None, grid: bool) -> str:
    """How one dimension is searched, for the log: ``weight_decay (grid of 5)``."""
    if values is None:
        return name
    return f"{name} ({'grid' if grid else 'one'} of {len(values)})"


def trial_resources(cluster: Mapping[str, float], cfg: SearchConfig) -> dict[str, float]:
    """What each trial asks Ray for, sized to what ``cluster`` has; per worker with DDP.

    A GPU request on a cluster without GPUs would leave every trial pending
    forever, so trials are CPU-only there; a request above the cluster's total
    could never be met, so it is capped. With ``cfg.workers_per_trial`` above
    1, each of a trial's workers asks for ``cpus_per_trial`` CPUs and, on a
    cluster with GPUs, one whole GPU (NCCL runs one rank per device); workers
    that the whole cluster could never hold at once raise ArgumentError, since
    Ray Train would wait for them forever.
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpus <= 0:
        raise ArgumentError(
            f"the Ray cluster has no CPU to run trials on; its resources: {cluster}."
        )
    workers = cfg.workers_per_trial
    if workers == 1:
        resources = {"cpu": min(cfg.cpus_per_trial, cpus)}
        if gpus > 0:
            resources["gpu"] = min(cfg.gpus_per_trial, gpus)
        return resources
    resources = {"cpu": cfg.cpus_per_trial}
    if gpus > 0:
        resources["gpu"] = 1.0
    have = {"cpu": cpus, "gpu": gpus}
    short = [
        f"{workers} x {need:g} {kind.upper()} = {workers * need:g} {kind.upper()}s, "
        f"but the cluster has {have[kind]:g}"
        for kind, need in resources.items()
        if workers * need > have[kind]
    ]
    if short:
        raise ArgumentError(
            f"search.workers_per_trial={workers} can never be placed: a trial's workers need "
            f"{'; '.join(short)}; expected workers_per_trial x cpus_per_trial (x 1 GPU) "
            "within the cluster's total."
        )
    return resources


def concurrent_trials(
    cluster: Mapping[str, float], resources: Mapping[str, float], cfg: SearchConfig
) -> int:
    """Trials that run at once: ``cfg.max_concurrent``, else as many as the cluster holds.

    With DDP a trial's Tune process only waits on its Ray Train workers, so
    Tune would start every trial at once and leave most of them waiting for
    workers (Ray Train's guide sets ``max_concurrent_trials`` for this); with
    one worker Tune sizes it from the trial's own request (0: no limit).
    """
    if cfg.workers_per_trial == 1:
        return cfg.max_concurrent
    have = {"cpu": cluster.get("CPU", 0.0), "gpu": cluster.get("GPU", 0.0)}
    fits = min(
        int(have[kind] // (cfg.workers_per_trial * need)) for kind, need in resources.items()
    )
    return min(fits, cfg.max_concurrent) if cfg.max_concurrent else fits


def trial_threads(resources: Mapping[str, float]) -> int:
    """Torch threads of a trial: the CPUs Ray gives it (``trial_resources``), at least 1."""
    return max(1, int(resources["cpu"]))
