"""Search-cost benchmark: ASHA against a full grid over weight decay x BN momentum.

For each task and seed, one range test picks the LR range; then autolr's own
search (`autolr.search.search`, real Ray, real MLflow store) runs these arms
over Smith's grid, weight decay in {1e-3, 1e-4, 1e-5, 1e-6, 0} x BN momentum
in {0.01, 0.05, 0.1, 0.3}, every trial at the same budget of ``--epochs``:

- ``grid``: all 20 points trained to the end (FIFO);
- ``asha-grid``: all 20 points under ASHA, which stops the weak ones early;
- ``asha-8``: 8 points drawn from the grid (autolr's default trial count) under ASHA;
- ``asha-8-default-space``: autolr's default search (log-uniform weight decay
  with a chance of 0, log-uniform BN momentum; 8 trials, ASHA): not the grid's
  space, shown for what a user gets without configuring anything.

Training is deterministic per seed, so a grid point trained to the end by ASHA
scores exactly what the grid gave it: the gap of an ASHA arm to the grid is the
grid's best minus the grid's score of the point ASHA picked. Trial-epochs are
the epochs all trials trained, summed.

Writes ``<out>/search_cost.md``, ``.json`` and ``.png``.

    python benchmarks/search_cost.py            # the committed results
    python benchmarks/search_cost.py --quick    # a smoke run into /tmp
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, common_parser, header, mean_sd, provenance, pyplot, write_report

TASKS = {
    "mnist1d": ROOT / "pipelines" / "default.yaml",
    "digits": ROOT / "pipelines" / "digits.yaml",
}
WEIGHT_DECAYS = (1e-3, 1e-4, 1e-5, 1e-6, 0.0)  # Smith's grid
BN_MOMENTA = (0.01, 0.05, 0.1, 0.3)  # torch convention: weight of the new batch statistic
GRID = {"weight_decay_values": WEIGHT_DECAYS, "bn_momentum_values": BN_MOMENTA}
ARMS: dict[str, dict[str, Any]] = {
    "grid": {**GRID, "grid": True, "scheduler": "fifo", "num_samples": 1},
    "asha-grid": {**GRID, "grid": True, "scheduler": "asha", "num_samples": 1},
    "asha-8": {**GRID, "scheduler": "asha", "num_samples": 8},
    "asha-8-default-space": {"scheduler": "asha", "num_samples": 8},
}
GOAL_GAP_PP, GOAL_COST = 0.3, 0.30  # within 0.3 pp of the grid's best at <= 30% of its epochs


def run_seed(task_name: str, seed: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """The range test once, then every arm's search from the same LR range."""
    from autolr.config import SearchConfig, load_config
    from autolr.pipeline import run_range_test, run_selection
    from autolr.search import SearchSite, TrialPlan, search
    from autolr.tasks import build_task, resolve
    from autolr.tracking import Tracker

    cfg = load_config(
        TASKS[task_name],
        [f"range_test.seed={seed}", "progress=false", *args.range_test_overrides],
    )
    task = build_task(resolve(cfg.task), **cfg.task_params)
    choice = run_selection(run_range_test(task, cfg), cfg)
    tracker = Tracker(f"sqlite:///{tmp / 'mlflow.db'}", "search-cost")
    out = []
    for arm, settings in ARMS.items():
        if arm not in args.arms:
            continue
        name = f"{task_name}-{arm}-seed{seed}"
        parent = tracker.start_run(name)
        t0 = time.perf_counter()
        found = search(
            task,
            choice,
            SearchConfig(seed=seed, **settings),
            SearchSite(
                tracking_uri=tracker.tracking_uri,
                experiment_id=tracker.experiment_id,
                parent_run_id=parent,
                storage_path=str(tmp / "ray"),
                name=name,
            ),
            TrialPlan(epochs=args.epochs),
            progress=False,
        )
        tracker.end_run(parent)
        trials = [
            {
                "weight_decay": t.weight_decay,
                "bn_momentum": t.bn_momentum,
                "val_metric": t.val_metric,
                "epochs_run": t.epochs_run,
                "status": t.status,
            }
            for t in found.trials
        ]
        r = {
            "task": task_name,
            "seed": seed,
            "arm": arm,
            "max_lr": choice.max_lr,
            "min_lr": choice.min_lr,
            "best": {
                "weight_decay": found.weight_decay,
                "bn_momentum": found.bn_momentum,
                "val_metric": found.val_metric,
            },
            "trials": trials,
            "trial_epochs": sum(t["epochs_run"] for t in trials),
            "seconds": time.perf_counter() - t0,
        }
        out.append(r)
        print(
            f"{task_name} seed {seed} {arm:22s}: best {100 * found.val_metric:.2f}% "
            f"(wd {found.weight_decay:.0e}, bn {found.bn_momentum}) "
            f"{r['trial_epochs']} trial-epochs, {r['seconds']:.0f} s",
            flush=True,
        )
    return out


def _key(wd: float, bn: float | None) -> tuple[float, float | None]:
    return (float(wd), None if bn is None else round(float(bn), 6))


def aggregate(runs: list[dict], task: str) -> dict[str, Any]:
    """Per arm: best metric, its gap to the grid's best, and trial-epochs against the grid's."""
    mine = [r for r in runs if r["task"] == task]
    seeds = sorted({r["seed"] for r in mine})
    grids = {r["seed"]: r for r in mine if r["arm"] == "grid"}
    arms = {}
    for arm in dict.fromkeys(r["arm"] for r in mine):
        rows = []
        for seed in seeds:
            r = next((x for x in mine if x["seed"] == seed and x["arm"] == arm), None)
            grid = grids.get(seed)
            if r is None or grid is None:
                continue
            scores = {
                _key(t["weight_decay"], t["bn_momentum"]): t["val_metric"] for t in grid["trials"]
            }
            picked = _key(r["best"]["weight_decay"], r["best"]["bn_momentum"])
            # the grid's score of the point this arm picked (None: not a grid point)
            true = scores.get(picked)
            rows.append(
                {
                    "seed": seed,
                    "best": r["best"]["val_metric"],
                    "grid_best": grid["best"]["val_metric"],
                    "picked_grid_score": true,
                    "gap_pp": 100 * (grid["best"]["val_metric"] - true)
                    if true is not None
                    else None,
                    "reported_gap_pp": 100 * (grid["best"]["val_metric"] - r["best"]["val_metric"]),
                    "cost": r["trial_epochs"] / grid["trial_epochs"],
                    "trial_epochs": r["trial_epochs"],
                    "seconds": r["seconds"],
                    "stopped": sum(t["status"] == "STOPPED" for t in r["trials"]),
                    "trials": len(r["trials"]),
                }
            )
        gaps = [x["gap_pp"] for x in rows if x["gap_pp"] is not None]
        arms[arm] = {
            "rows": rows,
            "best": mean_sd([x["best"] for x in rows]),
            "gap_pp": mean_sd(gaps) if gaps else (math.nan, math.nan),
            "max_gap_pp": max(gaps or [x["reported_gap_pp"] for x in rows], default=math.nan),
            "reported_gap_pp": mean_sd([x["reported_gap_pp"] for x in rows]),
            "cost": mean_sd([x["cost"] for x in rows]),
            "trial_epochs": mean_sd([x["trial_epochs"] for x in rows]),
            "seconds": mean_sd([x["seconds"] for x in rows]),
        }
    # how much the grid's own best stands above its median point: the stake of the search
    spread = [
        100 * (g["best"]["val_metric"] - float(np.median([t["val_metric"] for t in g["trials"]])))
        for g in grids.values()
    ]
    return {"arms": arms, "grid_best_over_median_pp": mean_sd(spread)}


def verdict(task: str, agg: dict) -> list[str]:
    lines = []
    for arm, a in agg["arms"].items():
        if arm == "grid":
            continue
        gap, cost = a["gap_pp"][0], a["cost"][0]
        if math.isnan(gap):  # not grid points: compare what each reported
            gap = a["reported_gap_pp"][0]
            what = "reported best vs the grid's best"
        else:
            what = "the grid's own score of the point it picked vs the grid's best"
        ok = gap <= GOAL_GAP_PP and cost <= GOAL_COST
        lines.append(
            f"{task}, {arm}: {gap:+.2f} pp ({what}; worst seed {a['max_gap_pp']:+.2f}) at "
            f"{100 * cost:.0f}% of the grid's trial-epochs: goal "
            f"(≤ {GOAL_GAP_PP} pp at ≤ {100 * GOAL_COST:.0f}%) **{'met' if ok else 'missed'}**."
        )
    return lines


def report(res: dict) -> list[str]:
    """The markdown report's lines, from the saved numbers."""
    lines = header("Search cost: ASHA vs a full grid over weight decay x BN momentum", res)
    lines += [
        f"- grid: weight decay {list(WEIGHT_DECAYS)} x BN momentum {list(BN_MOMENTA)} "
        f"(torch convention), {len(WEIGHT_DECAYS) * len(BN_MOMENTA)} points; every trial "
        f"trains 1cycle for {res['epochs']} epochs unless ASHA stops it (grace period 1 "
        "epoch, reduction factor 3)",
        f"- seeds: {res['seeds']}; each seed: one range test (its LR range shared by every arm), "
        "then each arm's search with that seed; 2 trials at a time, 1 CPU each",
        "- gap: grid's best minus the grid's score of the point the arm picked (training is "
        "deterministic, so that is the arm's final score had it trained the point to the end); "
        "for the default space, whose points are not on the grid, the arm's own best instead",
        "",
    ]
    for task, agg in res["aggregate"].items():
        lines += [
            f"## {task}",
            "",
            "| arm | best val accuracy (%) | gap to grid's best (pp, mean ± sd; worst) | "
            "trial-epochs | of the grid's | trials stopped early | search s |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, a in agg["arms"].items():
            gap = a["gap_pp"] if not math.isnan(a["gap_pp"][0]) else a["reported_gap_pp"]
            stopped = sum(x["stopped"] for x in a["rows"])
            total = sum(x["trials"] for x in a["rows"])
            lines.append(
                f"| {arm} | {100 * a['best'][0]:.2f} ± {100 * a['best'][1]:.2f} | "
                + (
                    "—"
                    if arm == "grid"
                    else f"{gap[0]:+.2f} ± {gap[1]:.2f}; {a['max_gap_pp']:+.2f}"
                )
                + f" | {a['trial_epochs'][0]:.0f} | {100 * a['cost'][0]:.0f}% | "
                f"{stopped}/{total} | {a['seconds'][0]:.0f} |"
            )
        spread = agg["grid_best_over_median_pp"]
        lines += [
            "",
            f"The grid's best stands {spread[0]:.2f} pp above its median point: what a search "
            "can win here.",
            "",
        ]
        lines += [f"- {v}" for v in verdict(task, agg)]
        lines += [""]
    lines += [
        "## WD-aware mode vs the shared range test",
        "",
        "Measured by `python benchmarks/wd_aware.py`: see [wd_aware.md](wd_aware.md).",
        "",
    ]
    return lines


def plot(res: dict, path: Path) -> None:
    """Per task: each arm's gap to the grid's best against its share of the grid's epochs."""
    plt = pyplot()
    tasks = list(res["aggregate"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, (arm, a) in enumerate(res["aggregate"][task]["arms"].items()):
            for x in a["rows"]:
                gap = x["gap_pp"] if x["gap_pp"] is not None else x["reported_gap_pp"]
                ax.scatter(100 * x["cost"], gap, color=f"C{i}", s=40, alpha=0.8, label=arm)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
        ax.axhline(GOAL_GAP_PP, color="C3", ls="--", lw=1)
        ax.axvline(100 * GOAL_COST, color="C3", ls="--", lw=1)
        ax.fill_between([0, 100 * GOAL_COST], -1, GOAL_GAP_PP, color="C2", alpha=0.08)
        ax.set_xlim(0, 105)
        ax.set_xlabel("trial-epochs, % of the full grid's")
        ax.set_ylabel("gap to the grid's best (pp; lower is better)")
        ax.set_title(f"{task}: each dot a seed (shaded: the goal)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="every trial's budget")
    args = parser.parse_args(argv)
    args.range_test_overrides = []
    if args.quick:
        args.seeds, args.epochs, args.out = 1, 2, "/tmp/autolr-search-cost-quick"
        args.range_test_overrides = ["range_test.repeats=1"]
    logging.basicConfig(level=logging.WARNING)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        import torch

        torch.set_num_threads(1)
        res = provenance("search_cost.py", argv)
        started = time.perf_counter()
        res["runs"] = []
        with tempfile.TemporaryDirectory(prefix="autolr-search-cost-") as tmp:
            for task in args.tasks:
                for seed in range(args.seeds):
                    res["runs"] += run_seed(task, seed, args, Path(tmp))
        res["seconds"] = time.perf_counter() - started
        res["seeds"], res["epochs"] = args.seeds, args.epochs
    res["aggregate"] = {
        task: aggregate(res["runs"], task) for task in dict.fromkeys(r["task"] for r in res["runs"])
    }
    write_report("search_cost", res, report(res), plot, Path(args.out))


if __name__ == "__main__":
    main()
