"""Selection benchmark: how good are the picked 1cycle LRs, ours vs the peers'?

For each task:
1. the oracle: a dense 1cycle max-LR grid (``--per-decade`` points per decade,
   ``--grid-seeds`` training seeds each, min_lr = max_lr / 25);
2. ``--rt-seeds`` range tests, and on each curve every method's pick;
3. each pick trained (``--train-seeds`` seeds) with its own max and min LR;
4. regret = best grid mean accuracy - the pick's mean accuracy (percentage
   points), and spread = std over range-test seeds of log10(max_lr).

Writes ``<out>/selection.md``, ``selection.json`` and ``selection.png``.

    python benchmarks/selection.py                 # the committed results
    python benchmarks/selection.py --quick         # a minute-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np

# (task, params, epochs for each training run, LR grid bounds in log10)
TASKS = {
    "mnist1d": ({}, 12, (-3.0, 1.0)),
    "digits": ({}, 12, (-4.0, 0.0)),
    "mnist1d_mlp": ({}, 12, (-4.5, -0.5)),
}


def _build(name: str):
    from autolr.tasks import build_task, resolve

    return build_task(resolve(name), **TASKS[name][0])


def _train_job(args: tuple) -> tuple:
    """Train one 1cycle run; returns (key, val_metric). Runs in a worker process."""
    import torch

    from autolr.training import train

    torch.set_num_threads(1)
    key, name, max_lr, min_lr, seed, epochs = args
    task = _build(name)
    try:
        result = train(
            task,
            max_lr=max_lr,
            min_lr=min_lr,
            epochs=epochs,
            weight_decay=5e-4,
            seed=seed,
            progress=False,
        )
        return key, float(result.val_metric)
    except (ValueError, RuntimeError):  # a diverged run scores as a failure, not a crash
        return key, 0.0


def _range_test_job(args: tuple) -> tuple:
    """One range test, then every method's pick on the same curve."""
    import torch

    from autolr.config import RangeTestConfig
    from autolr.errors import CurveError
    from autolr.range_test import range_test_task
    from autolr.selection import METHODS, select_lr

    torch.set_num_threads(1)
    name, seed = args
    # the pipeline's range test: default sweep and repeats, the training's param groups;
    # seeds far apart, so that no two picks share a repeat's seed
    curve = range_test_task(
        _build(name), RangeTestConfig(seed=1000 * seed), weight_decay=5e-4, progress=False
    )
    picks = {}
    for method in METHODS:
        try:
            choice = select_lr(curve, method=method)
            picks[method] = (choice.max_lr, choice.min_lr, choice.confidence)
        except CurveError as exc:
            picks[method] = (None, None, str(exc))
    return name, seed, picks, curve.to_dict()


def run(args: argparse.Namespace) -> dict:
    out: dict = {"tasks": {}}
    tasks = args.tasks
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        # range tests and picks
        rt_jobs = [(t, s) for t in tasks for s in range(args.rt_seeds)]
        picks = {t: {} for t in tasks}
        curves = {t: {} for t in tasks}
        for name, seed, p, curve in pool.map(_range_test_job, rt_jobs):
            picks[name][seed] = p
            curves[name][seed] = curve
        # oracle grid + every pick, trained
        jobs = []
        for t in tasks:
            epochs = args.epochs or TASKS[t][1]
            lo, hi = TASKS[t][2]
            grid = np.round(np.arange(lo, hi + 1e-9, 1.0 / args.per_decade), 4)
            for g in grid:
                for s in range(args.grid_seeds):
                    jobs.append((("grid", t, float(g), s), t, 10**g, 10**g / 25, s, epochs))
            for rs, p in picks[t].items():
                for method, (mx, mn, _) in p.items():
                    if mx is None:
                        continue
                    for s in range(args.train_seeds):
                        jobs.append((("pick", t, method, rs, s), t, mx, mn, 100 + s, epochs))
        scores = dict(pool.map(_train_job, jobs, chunksize=1))
    for t in tasks:
        grid_acc: dict[float, list[float]] = {}
        for key, acc in scores.items():
            if key[0] == "grid" and key[1] == t:
                grid_acc.setdefault(key[2], []).append(acc)
        grid_mean = {g: float(np.mean(v)) for g, v in sorted(grid_acc.items())}
        best_g = max(grid_mean, key=grid_mean.get)
        oracle = grid_mean[best_g]
        methods = {}
        for method in next(iter(picks[t].values())):
            accs, logs, fails = [], [], 0
            for rs, p in picks[t].items():
                mx = p[method][0]
                if mx is None:
                    fails += 1
                    accs.append(0.0)
                    continue
                logs.append(np.log10(mx))
                accs.append(
                    float(
                        np.mean(
                            [scores[("pick", t, method, rs, s)] for s in range(args.train_seeds)]
                        )
                    )
                )
            methods[method] = {
                "mean_acc": float(np.mean(accs)),
                "regret_pp": 100 * (oracle - float(np.mean(accs))),
                "spread_decades": float(np.std(logs)) if logs else float("nan"),
                "mean_log10_max_lr": float(np.mean(logs)) if logs else float("nan"),
                "failures": fails,
                "picks": {str(rs): p[method] for rs, p in picks[t].items()},
            }
        out["tasks"][t] = {
            "oracle_acc": oracle,
            "oracle_log10_max_lr": best_g,
            "grid": grid_mean,
            "methods": methods,
            "curves": curves[t],
        }
    return out


def write_report(res: dict, args: argparse.Namespace, out_dir: Path, seconds: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "selection.json").write_text(json.dumps(res, indent=1))
    methods = list(next(iter(res["tasks"].values()))["methods"])
    lines = [
        "# Selection benchmark",
        "",
        f"- command: `{' '.join(['python benchmarks/selection.py', *args.argv])}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch CPU; date {date.today()}",
        f"- wall time: {seconds / 60:.1f} min",
        f"- oracle: 1cycle max-LR grid, {args.per_decade}/decade x {args.grid_seeds} seeds, "
        f"min_lr = max_lr/25; picks: {args.rt_seeds} range-test seeds x "
        f"{args.train_seeds} training seeds",
        "- regret: oracle best mean accuracy minus the pick's mean accuracy, in points; "
        "spread: std of log10(max_lr) over range-test seeds, in decades",
        "",
        "| task | oracle acc | oracle max_lr | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    mean_regret = {m: [] for m in methods}
    for t, r in res["tasks"].items():
        cells = []
        for m in methods:
            mr = r["methods"][m]
            mean_regret[m].append(mr["regret_pp"])
            fail = f", {mr['failures']} failed" if mr["failures"] else ""
            cells.append(f"{mr['regret_pp']:.2f} pp / {mr['spread_decades']:.2f} dec{fail}")
        lines.append(
            f"| {t} | {100 * r['oracle_acc']:.2f}% | {10 ** r['oracle_log10_max_lr']:.3g} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append(
        "| **mean regret** | | | "
        + " | ".join(f"**{np.mean(v):.2f} pp**" for v in mean_regret.values())
        + " |"
    )
    lines += [
        "",
        "Cells: regret / spread of the max-LR pick.",
        "",
        "![selection](selection.png)",
        "",
    ]
    (out_dir / "selection.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["tasks"]), figsize=(5 * len(res["tasks"]), 4), dpi=110)
    for ax, (t, r) in zip(np.atleast_1d(axes), res["tasks"].items(), strict=True):
        g = np.array([float(k) for k in r["grid"]])
        ax.plot(10**g, [100 * v for v in r["grid"].values()], "k.-", label="1cycle grid (oracle)")
        for i, (m, mr) in enumerate(r["methods"].items()):
            lrs = [p[0] for p in mr["picks"].values() if p[0] is not None]
            y = 100 * mr["mean_acc"]
            ax.scatter(
                lrs,
                [y] * len(lrs),
                color=f"C{i}",
                marker="x|+^vD"[i % 6],
                s=60,
                label=f"{m} ({mr['regret_pp']:.2f} pp)",
            )
        ax.set_xscale("log")
        ax.set_xlabel("max_lr")
        ax.set_ylabel("val accuracy (%)")
        top = 100 * r["oracle_acc"]
        ax.set_ylim(top - 15, top + 2)
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "selection.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--per-decade", type=int, default=4)
    parser.add_argument("--grid-seeds", type=int, default=2)
    parser.add_argument("--rt-seeds", type=int, default=5)
    parser.add_argument("--train-seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="override each task's epochs")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run into /tmp")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    if args.quick:
        args.per_decade, args.grid_seeds, args.rt_seeds, args.train_seeds = 1, 1, 2, 1
        args.epochs, args.out = 2, "/tmp/autolr-selection-quick"
    started = time.perf_counter()
    res = run(args)
    write_report(res, args, Path(args.out), time.perf_counter() - started)
    print((Path(args.out) / "selection.md").read_text())


if __name__ == "__main__":
    main()
