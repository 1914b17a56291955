"""Selection benchmark: does the picked LR hold on models it was not designed on?

On the 18 tasks of `benchmarks/suite.py` (9 families), it measures:

1. ``oracle``: a dense 1cycle max-LR grid, 1e-5..10 at 4 points per decade,
   2 training seeds, min_lr = max_lr / 25; the best grid mean is the target.
2. ``curves``: range tests as the public API runs them at its defaults (one
   test, seeds 0, 1, 2) and as the pipeline runs them (median of 3).
3. ``baselines``: what users pick instead of an LR finder: Prodigy, D-Adaptation
   and schedule-free, each on its authors' recipe, 2 seeds.
4. ``verify``: autolr's API picks trained (2 seeds each) with their own max and min LR.
   ``confirm``: each API pick confirmed by training (`autolr.confirm_lr` at its
   defaults: the pick times 9 scales, one run each, and one past an edge), as a
   user's own training code would run it, with one training seed per curve.
5. ``pipeline``: ``python -m autolr.pipeline --task benchmarks.suite:<task>`` at its
   defaults (range test x3, a FIFO search over LR scale, weight decay and BN
   momentum, final 1cycle run) at 2 seeds, and the earlier defaults at one
   (`PIPELINE_SEEDS`).
6. ``pipeline_lr``: the max LR each pipeline run chose, trained on the oracle's
   protocol (its 2 seeds, default weight decay), so that the LR choice is scored
   without the final run's seed noise.
7. ``report``: every rule's pick on every curve, scored by interpolating the
   oracle grid in log10 LR; autolr's constants chosen leave-one-family-out.

Each stage appends to a JSONL cache under ``benchmarks/results/selection/`` as
results arrive, and skips what is cached, so a change to the rule reruns only
the picks (``--stage report``), and a change to the range test only
``--stage curves verify report``.

    python benchmarks/selection.py                # everything, ~45 min on 2 cores
    python benchmarks/selection.py --stage report # re-score cached curves
    python benchmarks/selection.py --quick        # 3 tasks, coarse grid, to /tmp
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import suite  # noqa: E402

GRID = (-5.0, 1.0, 4)  # log10 LR from, to, points per decade
SEEDS = (0, 1)
# Two more training seeds where the best max_lr is decided: the grid points within
# NEAR_BEST decades of the 2-seed best, and the pipeline's chosen max LRs. On 2 seeds
# the best grid mean is optimistic by up to the seed gap, which was 3-6 pp on the
# attention tasks and 29 % on the Friedman regression, as large as the gaps the
# targets ask about.
NEAR_BEST_SEEDS = (2, 3)
NEAR_BEST = 1.0
RT_SEEDS = (0, 1, 2)
WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-2}  # torch's AdamW default; the usual SGD one
STAGES = (
    "oracle",
    "curves",
    "baselines",
    "verify",
    "confirm",
    "pipeline",
    "pipeline_lr",
    "report",
)
CONFIRM_SEED = 200  # + the range test's seed: apart from the grid's and verify's seeds


# ---------------------------------------------------------------- the cache


class Cache:
    """Append-only JSONL: one ``{"key": [...], ...}`` record per finished job."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[tuple(record["key"])] = record

    def missing(self, keys: Iterable[tuple]) -> list[tuple]:
        return [k for k in keys if k not in self.records]

    def add(self, record: dict) -> None:
        self.records[tuple(record["key"])] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def run_jobs(fn, keys: list[tuple], cache: Cache, workers: int, label: str) -> None:
    """Run ``fn(key)`` for each key not cached, in ``workers`` processes."""
    todo = cache.missing(keys)
    print(f"[{label}] {len(keys) - len(todo)} cached, {len(todo)} to run", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, record in enumerate(pool.map(fn, todo, chunksize=1), 1):
            cache.add(record)
            if i % 10 == 0 or i == len(todo):
                elapsed = time.perf_counter() - started
                print(f"[{label}] {i}/{len(todo)} in {elapsed:.0f} s", flush=True)


# ---------------------------------------------------------------- jobs (worker processes)


def _setup() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def train_job(key: tuple) -> dict:
    """(stage, task, max_lr, min_lr, seed) -> the trained val metric, on the oracle's protocol."""
    _setup()
    _, name, max_lr, min_lr, seed = key
    started = time.perf_counter()
    value = trained(name, max_lr, min_lr, seed)
    return {
        "key": list(key),
        "value": value if math.isfinite(value) else None,
        "seconds": time.perf_counter() - started,
    }


def trained(name: str, max_lr: float, min_lr: float, seed: int) -> float:
    """The val metric of one 1cycle run on the oracle's protocol; NaN if it diverged."""
    from autolr.training import train

    task = suite.build(name)
    try:
        result = train(
            task,
            max_lr=max_lr,
            min_lr=min_lr,
            epochs=task.epochs,
            seed=seed,
            weight_decay=WEIGHT_DECAY[suite.SPECS[name].optimizer],
            progress=False,
        )
    except (ValueError, RuntimeError):  # diverged: scored as a failure by the report
        return math.nan
    return float(result.val_metric)


def curve_job(key: tuple) -> dict:
    """("api"|"pipeline", task, seed) -> the range-test curve, as the API or pipeline runs it."""
    _setup()
    from autolr.config import RangeTestConfig
    from autolr.range_test import range_test_task

    variant, name, seed = key
    spec, task = suite.SPECS[name], suite.build(name)
    repeats = 1 if variant == "api" else 3
    # seeds far apart, so that no two curves share a repeat's seed
    cfg = RangeTestConfig(seed=1000 * seed, repeats=repeats)
    started = time.perf_counter()
    result = range_test_task(task, cfg, weight_decay=WEIGHT_DECAY[spec.optimizer], progress=False)
    return {"key": list(key), "curve": result.to_dict(), "seconds": time.perf_counter() - started}


def confirm_job(key: tuple) -> dict:
    """("confirm", task, seed, max_lr, min_lr) -> `autolr.confirm_lr` on the API's pick
    from that seed's curve, each run on the oracle's protocol (its weight decay)."""
    _setup()
    from autolr import LRChoice, confirm_lr

    _, name, seed, max_lr, min_lr = key
    choice = LRChoice(max_lr, min_lr, confidence=1.0, method="changepoint", reason="the API's")

    def fit(max_lr: float, min_lr: float) -> float:  # NaN: a failed run to confirm_lr
        return trained(name, max_lr, min_lr, CONFIRM_SEED + seed)

    started = time.perf_counter()
    higher = suite.SPECS[name].kind == "accuracy"
    confirmed = confirm_lr(choice, fit, higher_is_better=higher, progress=False)
    return {
        "key": list(key),
        "value": confirmed.metric,
        "max_lr": confirmed.max_lr,
        "min_lr": confirmed.min_lr,
        "trials": [
            [t.scale, t.max_lr, t.metric if math.isfinite(t.metric) else None]
            for t in confirmed.trials
        ],
        "seconds": time.perf_counter() - started,
    }


def baseline_job(key: tuple) -> dict:
    """(recipe, task, seed) -> the val metric of a learning-rate-free optimizer's run."""
    _setup()
    import torch

    from autolr.training import evaluate, make_loaders, param_groups

    recipe, name, seed = key
    spec, task = suite.SPECS[name], suite.build(name)
    torch.manual_seed(seed)
    model = task.model_fn()
    train_loader, val_loader = make_loaders(task, seed)
    steps = task.epochs * len(train_loader)
    groups = param_groups(model, WEIGHT_DECAY[spec.optimizer])
    optimizer, scheduler = lr_free_optimizer(recipe, spec.optimizer, groups, steps)
    started = time.perf_counter()
    value = math.nan
    try:
        for epoch in range(task.epochs):
            train_loader.generator.manual_seed(seed + epoch)
            model.train()
            if hasattr(optimizer, "train"):
                optimizer.train()
            for x, y in train_loader:
                loss = task.loss_fn(model(x), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
        if hasattr(optimizer, "eval"):  # schedule-free: evaluate at the averaged weights
            optimizer.eval()
            recompute_bn(model, train_loader)
        value = evaluate(model, val_loader, task, "cpu")[1]
    except FloatingPointError:
        pass
    return {
        "key": list(key),
        "value": value if math.isfinite(value) else None,
        "seconds": time.perf_counter() - started,
    }


RECIPES = {
    # Prodigy's README: lr=1, decoupled weight decay, cosine annealing over the run.
    "prodigy": "Prodigy(lr=1, weight_decay=wd) + CosineAnnealingLR(T_max=steps)",
    # D-Adaptation's README: lr=1; DAdaptAdam (decoupled) for Adam tasks, DAdaptSGD for SGD.
    "dadapt": "DAdaptAdam(lr=1, decouple=True) / DAdaptSGD(lr=1, momentum=0.9) + cosine",
    # schedule-free's README: its default lr, a warm-up (5% of steps), no schedule,
    # optimizer.eval() and BatchNorm statistics recomputed before evaluation.
    "schedulefree": "AdamWScheduleFree(lr=2.5e-3) / SGDScheduleFree(lr=1, momentum=0.9), "
    "warmup 5%, BN stats recomputed",
}


def lr_free_optimizer(recipe: str, family: str, groups, steps: int):
    import torch

    if recipe == "prodigy":
        from prodigyopt import Prodigy

        opt = Prodigy(groups, lr=1.0)
    elif recipe == "dadapt":
        import dadaptation

        opt = (
            dadaptation.DAdaptSGD(groups, lr=1.0, momentum=0.9)
            if family == "sgd"
            else dadaptation.DAdaptAdam(groups, lr=1.0, decouple=True)
        )
    else:
        import schedulefree

        warmup = max(1, steps // 20)
        return (
            schedulefree.SGDScheduleFree(groups, lr=1.0, momentum=0.9, warmup_steps=warmup)
            if family == "sgd"
            else schedulefree.AdamWScheduleFree(groups, warmup_steps=warmup)
        ), None
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def recompute_bn(model, loader, batches: int = 20) -> None:
    """schedule-free's recipe: BatchNorm statistics of the averaged weights, from train data."""
    import torch

    from autolr.training import batchnorm_layers

    layers = batchnorm_layers(model)
    if not layers:
        return
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            model(x)
    model.eval()


# ---------------------------------------------------------------- stages


def grid_lrs(quick: bool) -> np.ndarray:
    lo, hi, per = (-4.0, 1.0, 2) if quick else GRID
    return np.round(np.arange(lo, hi + 1e-9, 1.0 / per), 4)


def stage_oracle(args) -> None:
    cache = Cache(args.out / "oracle.jsonl")
    grid = grid_lrs(args.quick)
    keys = [
        ("oracle", t, float(10**g), float(10**g / 25), s)
        for t in args.tasks
        for g in grid
        for s in SEEDS
    ]
    run_jobs(train_job, keys, cache, args.workers, "oracle")
    near = []
    for t in args.tasks:
        best = _two_seed_best(cache, t, grid)
        near += [
            ("oracle", t, float(10**g), float(10**g / 25), s)
            for g in grid
            if abs(g - best) <= NEAR_BEST + 1e-9
            for s in NEAR_BEST_SEEDS
        ]
    run_jobs(train_job, near, cache, args.workers, "oracle, more seeds near the best")


def _two_seed_best(cache: Cache, task: str, grid: np.ndarray) -> float:
    """log10 of the grid's best max_lr on the first two seeds (a failed run scores worst)."""
    higher = suite.SPECS[task].kind == "accuracy"
    fail = -math.inf if higher else math.inf
    means = []
    for g in grid:
        values = [
            cache.records[("oracle", task, float(10**g), float(10**g / 25), s)]["value"]
            for s in SEEDS
        ]
        means.append(np.mean([fail if v is None else v for v in values]))
    return float(grid[int(np.argmax(means) if higher else np.argmin(means))])


def stage_curves(args) -> None:
    keys = [(v, t, s) for v in ("api", "pipeline") for t in args.tasks for s in RT_SEEDS]
    run_jobs(curve_job, keys, Cache(args.out / "curves.jsonl"), args.workers, "curves")


def stage_baselines(args) -> None:
    keys = [(r, t, s) for r in RECIPES for t in args.tasks for s in SEEDS]
    run_jobs(baseline_job, keys, Cache(args.out / "baselines.jsonl"), args.workers, "baselines")


def _api_pick(args, task: str, seed: int) -> tuple[float, float]:
    """(max_lr, min_lr) that `select_lr` picks at its defaults from a cached API curve."""
    from autolr.selection import select_lr

    record = Cache(args.out / "curves.jsonl").records[("api", task, seed)]
    choice = select_lr(suite.curve_result(record["curve"], task))
    return choice.max_lr, choice.min_lr


def stage_verify(args) -> None:
    keys = [
        ("verify", t, *_api_pick(args, t, s), 100 + ts)
        for t in args.tasks
        for s in RT_SEEDS
        for ts in SEEDS
    ]
    run_jobs(train_job, keys, Cache(args.out / "verify.jsonl"), args.workers, "verify")


def stage_confirm(args) -> None:
    keys = [("confirm", t, s, *_api_pick(args, t, s)) for t in args.tasks for s in RT_SEEDS]
    run_jobs(confirm_job, keys, Cache(args.out / "confirm.jsonl"), args.workers, "confirm")


def pipeline_job(key: tuple) -> dict:
    """(variant, task, seed) -> final val metric, max_lr and cost of a run.

    The variants (`PIPELINE_SEEDS`) differ in the search's scheduler (ASHA for
    "pipeline", else FIFO: every trial trains its full budget) and its LR scales.
    """
    import os
    import subprocess
    import tempfile

    variant, name, seed = key
    task = suite.build(name)
    steps_per_epoch = math.ceil(len(task.train_set) / task.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [
            sys.executable,
            "-m",
            "autolr.pipeline",
            "--task",
            f"benchmarks.suite:{name}",
            "--set",
            f"train.seed={seed}",
            "--set",
            f"range_test.seed={1000 * seed}",
            "--set",
            f"search.scheduler={'asha' if variant == 'pipeline' else 'fifo'}",
            *PIPELINE_SETS[variant],
            "--output",
            str(out),
            "--no-progress",
            "--tracking-uri",
            f"sqlite:///{tmp}/m.db",
        ]
        repo = Path(__file__).resolve().parents[1]
        env = os.environ | {"PYTHONPATH": str(repo)}
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            return {
                "key": list(key),
                "value": None,
                "max_lr": None,
                "cost_epochs": math.nan,
                "seconds": seconds,
                "error": proc.stderr[-2000:],
            }
        summary = json.loads(out.read_text())
    trial_epochs = sum(t["epochs_run"] for t in summary["trials"])
    rt_steps = summary["range_test"].get("steps", 0)
    return {
        "key": list(key),
        "value": summary["val_metric"],
        "max_lr": summary["max_lr"],
        "min_lr": summary["min_lr"],
        "curve_max_lr": summary.get("curve_pick", {}).get("max_lr"),
        # the best trial's hyperparameters and its own val metric, which the final
        # run (same budget and seed) should reproduce
        "best": summary["best"],
        "trial_results": [
            [t["lr_scale"], t["weight_decay"], t["val_metric"]] for t in summary["trials"]
        ],
        # the final run trains only when it does not reuse the best trial's checkpoint
        "cost_epochs": rt_steps / steps_per_epoch
        + trial_epochs
        + (0 if summary.get("final_model", {}).get("reused_trial") else summary["epochs"]),
        "final_model": summary.get("final_model"),
        "seconds": seconds,
        "trials": len(summary["trials"]),
    }


# The pipeline's variants: ASHA over 8 trials drawing from 3 LR scales (the default
# until 927c862), FIFO the same (until 1e66a54), FIFO over 10 trials taking 5 scales
# in turn (until the 9 scales of `LR_SCALES`), and the default since. The old rows are
# kept as measured then (code at 8696151, before the final model reused the best
# trial's checkpoint); rerunning them now would take the scales in turn too.
# "pipeline-bn" adds the BN momentum floor (`bn_momentum_floor`), run on the BatchNorm
# tasks (it changes nothing for a model without BatchNorm); "pipeline-edge", the
# default, adds the trial past an edge LR scale (`autolr.search.edge`), run with seeds
# 0 and 1 on the tasks where a run's best first 9 trials lay on an edge (it changes
# nothing else), and with seed 2 on every task.
PIPELINE_SEEDS = {
    "pipeline": (0,),
    "pipeline-fifo": (0,),
    "pipeline-default": (0, 1),
    "pipeline-9": (0, 1),
    "pipeline-bn": (0, 1),
    "pipeline-edge": (0, 1, 2),
}
PIPELINE_SETS = {
    "pipeline": ("--set", "search.lr_scales=[0.3, 1, 3]", "--set", "search.num_samples=8"),
    "pipeline-fifo": ("--set", "search.lr_scales=[0.3, 1, 3]", "--set", "search.num_samples=8"),
    "pipeline-default": ("--set", "search.lr_scales=[0.2, 0.45, 1, 2.2, 5]"),
    "pipeline-9": (),
    "pipeline-bn": ("--set", "search.extend_at_edge=false"),
    "pipeline-edge": (),
}
# the variants whose chosen max LRs are also trained with NEAR_BEST_SEEDS
NEAR_BEST_VARIANTS = ("pipeline-default", "pipeline-9", "pipeline-bn", "pipeline-edge", "confirm")


def stage_pipeline(args) -> None:
    # one at a time: each run starts its own Ray over both cores
    for variant, seeds in PIPELINE_SEEDS.items():
        keys = [(variant, t, s) for s in seeds for t in args.tasks]
        run_jobs(pipeline_job, keys, Cache(args.out / f"{variant}.jsonl"), 1, variant)


def stage_pipeline_lr(args) -> None:
    """The max LR each pipeline run (and each `confirm_lr` run) chose, trained on
    the oracle's own protocol (its seeds, default weight decay, min_lr = max_lr /
    25): the LR choice scored without its best run's seed noise or weight decay."""
    keys = []
    for variant in (*PIPELINE_SEEDS, "confirm"):
        for k, r in Cache(args.out / f"{variant}.jsonl").records.items():
            if k[1] in args.tasks and r.get("max_lr"):
                lr = r["max_lr"]
                seeds = SEEDS + NEAR_BEST_SEEDS if variant in NEAR_BEST_VARIANTS else SEEDS
                keys += [(f"{variant}-lr", k[1], lr, lr / 25, s) for s in seeds]
    run_jobs(
        train_job,
        sorted(set(keys)),
        Cache(args.out / "pipeline-lr.jsonl"),
        args.workers,
        "pipeline-lr",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument(
        "--tasks", nargs="+", choices=sorted(suite.SPECS), default=list(suite.SPECS)
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="3 tasks, a coarse grid, to /tmp")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = ["tabular_tanh_sgd", "friedman_mlp_adamw", "digits_plain_mlp_adamw"]
    args.out = args.out or (
        Path("/tmp/autolr-selection-quick")
        if args.quick
        else Path(__file__).parent / "results" / "selection"
    )
    for stage in STAGES:
        if stage in args.stage:
            if stage == "report":
                from benchmarks import selection_report

                selection_report.report(args)
            else:
                globals()[f"stage_{stage}"](args)


if __name__ == "__main__":
    main()
