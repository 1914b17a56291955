"""WD-aware benchmark: does a range test per search trial beat one shared range test?

For each task and each pipeline seed (``range_test.seed``, ``search.seed`` and
``train.seed`` set together), the whole pipeline (range test -> selection ->
ASHA search of weight decay / BN momentum -> final 1cycle training) runs twice,
identical except for ``search.wd_aware``:

- ``shared``: every trial trains with the one LR range picked before the search;
- ``wd_aware``: every trial re-runs the range test at its own weight decay and
  BN momentum and trains with its own pick; the final training uses the best
  trial's range.

The two modes of a seed run back to back (their order alternates over seeds,
so a drift in machine load hits both), in this process, with a private MLflow
sqlite store and Ray storage under a temporary folder.

Writes ``<out>/wd_aware.md``, ``wd_aware.json`` and ``wd_aware.png``.

    python benchmarks/wd_aware.py            # the committed results
    python benchmarks/wd_aware.py --quick    # a smoke run into /tmp
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, code_version, mean_sd, pyplot, write_report

TASKS = {  # task -> its pipeline config
    "mnist1d": ROOT / "pipelines" / "default.yaml",
    "digits": ROOT / "pipelines" / "digits.yaml",
}
MODES = ("shared", "wd_aware")


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides that size every run; empty keys keep the config's value."""
    sizes = {
        "search.num_samples": args.num_samples,
        "search.epochs": args.search_epochs,
        "train.epochs": args.epochs,
        "range_test.num_iter": args.num_iter,
    }
    return [f"{key}={value}" for key, value in sizes.items() if value is not None]


# each trial's fields the report keeps, in its order
TRIAL_FIELDS = (
    "weight_decay",
    "bn_momentum",
    "max_lr",
    "min_lr",
    "status",
    "val_metric",
    "epochs_run",
)


def run_one(task: str, seed: int, mode: str, args: argparse.Namespace, tmp: Path) -> dict:
    """One pipeline run; the fields of its summary this benchmark reports."""
    from autolr.config import load_config
    from autolr.errors import AutoLRError
    from autolr.pipeline import run

    overrides = [
        f"range_test.seed={seed}",
        f"search.seed={seed}",
        f"train.seed={seed}",
        f"search.wd_aware={str(mode == 'wd_aware').lower()}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.run_name=wd-{task}-{mode}-seed{seed}",
        f"search.storage_path={tmp / 'ray'}",
        "progress=false",
        *budget_overrides(args),
    ]
    started = time.perf_counter()
    try:
        result = run(load_config(TASKS[task], overrides))
    except (AutoLRError, ValueError) as exc:  # one failed run must not sink the benchmark
        return {"task": task, "seed": seed, "mode": mode, "error": str(exc)[:500]}
    trials = result.trials
    sources = _lr_sources(result.tracking_uri, [t.run_id for t in trials])
    best = next(t for t in trials if t.trial_id == result.best.trial_id)
    return {
        "task": task,
        "seed": seed,
        "mode": mode,
        "metric": result.metric,
        "val_metric": result.val_metric,
        "best_trial_val_metric": result.best.val_metric,
        "best_weight_decay": result.best.weight_decay,
        "best_bn_momentum": result.best.bn_momentum,
        "shared_max_lr": result.max_lr,
        "shared_min_lr": result.min_lr,
        "final_max_lr": best.max_lr,  # what the final training used
        "final_min_lr": best.min_lr,
        "trials": [
            {k: getattr(t, k) for k in TRIAL_FIELDS} | {"lr_source": src}
            for t, src in zip(trials, sources, strict=True)
        ],
        "stage_seconds": result.stage_seconds,
        "wall_seconds": result.wall_seconds,
        "outer_seconds": round(time.perf_counter() - started, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def _lr_sources(tracking_uri: str, run_ids: list[str | None]) -> list[str | None]:
    """Each trial's ``lr_source`` param: "shared", "wd_aware" or "shared (... no pick ...)"."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return [client.get_run(i).data.params.get("lr_source") if i else None for i in run_ids]


def _warm_up(tmp: Path) -> None:
    """Pay the one-off costs (importing ray, creating the MLflow tables) before any timed run.

    Otherwise the first run of the benchmark, always a ``shared`` one, carries them.
    """
    import autolr.search  # noqa: F401  (imports ray)
    from autolr.tracking import Tracker

    Tracker(f"sqlite:///{tmp / 'mlflow.db'}", "autolr")


def run_all(args: argparse.Namespace) -> list[dict]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="autolr-wd-aware-") as tmp:
        _warm_up(Path(tmp))
        for task in args.tasks:
            for seed in range(args.seeds):
                modes = MODES if seed % 2 == 0 else MODES[::-1]
                for mode in modes:
                    r = run_one(task, seed, mode, args, Path(tmp))
                    runs.append(r)
                    if "error" in r:
                        print(f"{task} seed {seed} {mode}: FAILED {r['error']}", flush=True)
                    else:
                        print(
                            f"{task} seed {seed} {mode:8s}: val_{r['metric']}="
                            f"{r['val_metric']:.4f} best trial {r['best_trial_val_metric']:.4f} "
                            f"search {r['stage_seconds'].get('search', 0):.0f} s, "
                            f"run {r['wall_seconds']:.0f} s, load {r['load_after']}",
                            flush=True,
                        )
    return runs


def _spearman(runs: list[dict], key: str) -> tuple[float, float]:
    """Spearman's (rho, p) between the trials' max_lr and ``key``, pooled over seeds."""
    from scipy.stats import spearmanr

    pairs = [(t[key], t["max_lr"]) for r in runs for t in r["trials"] if t[key] is not None]
    if len(pairs) < 3 or len({lr for _, lr in pairs}) < 2:
        return math.nan, math.nan  # constant max_lr (shared mode): no correlation to speak of
    rho, p = spearmanr(*zip(*pairs, strict=True))
    return float(rho), float(p)


def _same_choice(by_seed: dict, seeds: list[int]) -> list[dict]:
    """Seeds whose two modes trained the final model with the same wd, BN momentum and max_lr.

    Their min_lr may still differ a little (each range test picks its own); the gap
    in their final metric is then a measure of the noise floor of one run.
    """
    same = []
    for s in seeds:
        a, b = by_seed.get((s, "shared")), by_seed.get((s, "wd_aware"))
        if a is None or b is None:
            continue
        keys = ("best_weight_decay", "best_bn_momentum", "final_max_lr")
        if all(a[k] == b[k] or math.isclose(a[k], b[k], rel_tol=1e-9) for k in keys):
            same.append(
                {
                    "seed": s,
                    "min_lr_rel_diff": abs(b["final_min_lr"] / a["final_min_lr"] - 1),
                    "metric_diff": b["val_metric"] - a["val_metric"],
                }
            )
    return same


def aggregate(runs: list[dict], tasks: list[str]) -> dict[str, Any]:
    """Per task and mode: means over seeds, the LRs used; per task: the paired comparison."""
    out: dict[str, Any] = {}
    for task in tasks:
        ok = [r for r in runs if r["task"] == task and "error" not in r]
        modes: dict[str, Any] = {}
        for mode in MODES:
            rs = [r for r in ok if r["mode"] == mode]
            trial_lrs = [t["max_lr"] for r in rs for t in r["trials"]]
            # a wd-aware trial whose own curve gave no pick falls back to the shared range
            fallbacks = sum(
                (t["lr_source"] or "").startswith("shared") for r in rs for t in r["trials"]
            )
            same_as_shared = sum(
                math.isclose(t["max_lr"], r["shared_max_lr"], rel_tol=1e-9)
                for r in rs
                for t in r["trials"]
            )
            modes[mode] = {
                "runs": len(rs),
                "failed": sum(1 for r in runs if r["task"] == task and r["mode"] == mode) - len(rs),
                "final": mean_sd([r["val_metric"] for r in rs]),
                "best_trial": mean_sd([r["best_trial_val_metric"] for r in rs]),
                "search_seconds": mean_sd([r["stage_seconds"].get("search", 0.0) for r in rs]),
                "wall_seconds": mean_sd([r["wall_seconds"] for r in rs]),
                "trial_max_lr_range": (min(trial_lrs), max(trial_lrs)) if trial_lrs else None,
                "trial_max_lr_sd_decades": float(np.std(np.log10(trial_lrs)))
                if trial_lrs
                else math.nan,
                "trials": len(trial_lrs),
                "fallbacks": fallbacks if mode == "wd_aware" else None,
                "same_as_shared": same_as_shared,
                "final_max_lr": [r["final_max_lr"] for r in rs],
                # does a trial's own pick follow its weight decay / BN momentum at all?
                "spearman_max_lr_vs_wd": _spearman(rs, "weight_decay"),
                "spearman_max_lr_vs_bn": _spearman(rs, "bn_momentum"),
            }
        # paired by seed: the two modes share the seed and everything else
        by_seed = {(r["seed"], r["mode"]): r for r in ok}
        seeds = sorted({s for s, _ in by_seed})
        diffs = [
            by_seed[(s, "wd_aware")]["val_metric"] - by_seed[(s, "shared")]["val_metric"]
            for s in seeds
            if (s, "wd_aware") in by_seed and (s, "shared") in by_seed
        ]
        out[task] = {
            "metric": ok[0]["metric"] if ok else "metric",
            "same_choice": _same_choice(by_seed, seeds),
            "modes": modes,
            "paired_diffs": diffs,
            "cost_ratio_search": modes["wd_aware"]["search_seconds"][0]
            / modes["shared"]["search_seconds"][0],
            "cost_ratio_wall": modes["wd_aware"]["wall_seconds"][0]
            / modes["shared"]["wall_seconds"][0],
        }
    return out


def verdict(task: str, agg: dict) -> str:
    """One line from the numbers: who wins on the final metric, by how much, at what cost."""
    diffs = agg["paired_diffs"]
    if not diffs:
        return f"{task}: no seed finished in both modes; no verdict."
    mean, sd = mean_sd(diffs)
    se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    wins = sum(d > 0 for d in diffs)
    winner = "wd_aware" if mean > 0 else "shared" if mean < 0 else "neither"
    noise = (
        "one seed, so no noise estimate"
        if len(diffs) < 2
        else "within seed noise (under 2 standard errors of the paired difference)"
        if not abs(mean) > 2 * se
        else "beyond 2 standard errors of the paired difference"
    )
    m = agg["modes"]["wd_aware"]
    (rho_wd, p_wd), (rho_bn, p_bn) = m["spearman_max_lr_vs_wd"], m["spearman_max_lr_vs_bn"]
    same = agg["same_choice"]
    floor = (
        f" In {len(same)}/{len(diffs)} seeds both modes trained the final model with the same "
        f"weight decay, BN momentum and max_lr (min_lr within "
        f"{100 * max(x['min_lr_rel_diff'] for x in same):.2g}%), yet their final metrics differ "
        f"by up to {100 * max(abs(x['metric_diff']) for x in same):.2f} pp: one run's noise floor."
        if same
        else ""
    )
    return (
        f"{task}: **{winner}** wins on final val_{agg['metric']} by "
        f"{100 * abs(mean):.2f} pp on average (paired difference wd_aware - shared = "
        f"{100 * mean:+.2f} ± {100 * sd:.2f} pp over {len(diffs)} seeds; wd_aware ahead on "
        f"{wins}/{len(diffs)}; {noise}), at {agg['cost_ratio_search']:.2f}x the search time "
        f"and {agg['cost_ratio_wall']:.2f}x the pipeline's wall time. The wd-aware trials' "
        f"max_lr vs their weight decay: Spearman rho {rho_wd:+.2f} (p {p_wd:.2f}); "
        f"vs their BN momentum: rho {rho_bn:+.2f} (p {p_bn:.2f})." + floor
    )


def _pct(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"


def _lr_cell(mode: str, m: dict) -> str:
    lo, hi = m["trial_max_lr_range"] or (math.nan, math.nan)
    if mode == "shared":
        return f"one pick per seed: {lo:.3g}–{hi:.3g}"
    return (
        f"{m['trials']} trials: {lo:.3g}–{hi:.3g} "
        f"(sd {m['trial_max_lr_sd_decades']:.2f} dec; {m['same_as_shared']} equal to the "
        f"seed's shared pick, {m['fallbacks']} of them fallbacks for lack of a pick)"
    )


def report(res: dict) -> list[str]:
    """The markdown report's lines (the plot's link is added by `write_report`)."""
    loads = [r["load_after"] for r in res["runs"] if "load_after" in r]
    m = res["machine"]
    lines = [
        "# WD-aware search benchmark",
        "",
        f"- command: `{res['command']}`",
        f"- machine: {m['platform']}, {m['cores']} cores, torch {m['torch']} (CPU, "
        f"{m['torch_threads']} thread in the driver, 1 CPU per trial); date {res['date']}",
        f"- code: {res.get('code', 'unknown')}",
        f"- wall time: {res['seconds'] / 60:.1f} min for {len(res['runs'])} pipeline runs",
        f"- load: 1-min load average {min(loads, default=math.nan):.1f}–"
        f"{max(loads, default=math.nan):.1f} after the runs, on {m['cores']} cores (shared "
        f"machine: a load above {m['cores']} means other processes competed for the CPUs, "
        "inflating the seconds of both modes alike, since they alternate)",
        f"- budget: {res['seeds']} seeds x {len(MODES)} modes per task; overrides "
        f"`{' '.join(res['budget']) or 'none'}` on top of each task's config",
        "- final / best trial: validation metric of the final training / of the search's best "
        "trial (mean ± sd over seeds, in %); seconds: mean over seeds",
        "",
        "| task | mode | final val (%) | best trial val (%) | search s | pipeline s "
        "| max_lr the trials used | final max_lr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, agg in res["aggregate"].items():
        for mode, mm in agg["modes"].items():
            failed = f" ({mm['failed']} failed)" if mm["failed"] else ""
            lines.append(
                f"| {task} | {mode}{failed} | {_pct(mm['final'])} | {_pct(mm['best_trial'])} | "
                f"{mm['search_seconds'][0]:.0f} | {mm['wall_seconds'][0]:.0f} | "
                f"{_lr_cell(mode, mm)} | "
                + ", ".join(f"{lr:.3g}" for lr in mm["final_max_lr"])
                + " |"
            )
    lines += ["", "## Verdict", ""]
    lines += [f"- {v}" for v in res["verdicts"]]
    return [*lines, ""]


def plot(res: dict, path: Path) -> None:
    """Top: final metric per mode, seeds paired by lines. Bottom: each trial's max_lr vs wd."""
    plt = pyplot()
    tasks = list(res["aggregate"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7.5), dpi=110, squeeze=False)
    for col, task in enumerate(tasks):
        ok = [r for r in res["runs"] if r["task"] == task and "error" not in r]
        ax = axes[0, col]
        seeds = sorted({r["seed"] for r in ok})
        for seed in seeds:
            ys = {r["mode"]: 100 * r["val_metric"] for r in ok if r["seed"] == seed}
            xs = [i for i, mode in enumerate(MODES) if mode in ys]
            ax.plot(xs, [ys[MODES[i]] for i in xs], "o-", color=f"C{seed}", label=f"seed {seed}")
        for i, mode in enumerate(MODES):
            mean = res["aggregate"][task]["modes"][mode]["final"][0]
            ax.hlines(100 * mean, i - 0.2, i + 0.2, color="k", lw=2)
        ax.set_xticks(range(len(MODES)), MODES)
        ax.set_xlim(-0.5, len(MODES) - 0.5)
        ax.set_ylabel(f"final val {res['aggregate'][task]['metric']} (%)")
        ax.set_title(f"{task}: final training (bar: mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

        ax = axes[1, col]
        for r in ok:
            wds = [t["weight_decay"] for t in r["trials"]]
            lrs = [t["max_lr"] for t in r["trials"]]
            if r["mode"] == "wd_aware":
                ax.scatter(
                    wds, lrs, color=f"C{r['seed']}", s=25, label=f"wd_aware seed {r['seed']}"
                )
            else:
                ax.axhline(
                    r["shared_max_lr"],
                    color=f"C{r['seed']}",
                    ls="--",
                    lw=1,
                    label=f"shared pick seed {r['seed']}",
                )
        ax.set_xscale("symlog", linthresh=1e-6)  # weight decay 0 is a possible draw
        ax.set_yscale("log")
        ax.set_xlabel("trial weight decay")
        ax.set_ylabel("trial max_lr")
        ax.set_title(f"{task}: LR each trial trained with")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3, help="pipeline seeds per task")
    parser.add_argument("--num-samples", type=int, default=None, help="search trials per run")
    parser.add_argument("--search-epochs", type=int, default=None, help="epochs per trial")
    parser.add_argument("--epochs", type=int, default=None, help="final training epochs")
    parser.add_argument("--num-iter", type=int, default=None, help="range-test steps")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run into /tmp")
    parser.add_argument(
        "--from-json", help="rewrite the report from a saved wd_aware.json; runs nothing"
    )
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.quick:
        args.seeds, args.num_samples, args.search_epochs, args.epochs = 1, 2, 1, 1
        args.num_iter, args.out = 60, "/tmp/autolr-wd-aware-quick"
    logging.basicConfig(level=logging.WARNING)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        res["aggregate"] = aggregate(res["runs"], list(res["aggregate"]))
        res["verdicts"] = [verdict(task, a) for task, a in res["aggregate"].items()]
        write_report("wd_aware", res, report(res), plot, Path(args.out))
        return

    import torch

    torch.set_num_threads(1)  # the machine is shared; trials get 1 CPU each from Ray
    started = time.perf_counter()
    runs = run_all(args)
    agg = aggregate(runs, args.tasks)
    res = {
        "command": " ".join(["python benchmarks/wd_aware.py", *argv]),
        "date": str(date.today()),
        "code": code_version(),
        "machine": {
            "platform": f"{platform.system()} {platform.machine()}",
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "seconds": time.perf_counter() - started,
        "seeds": args.seeds,
        "budget": budget_overrides(args),
        "runs": runs,
        "aggregate": agg,
        "verdicts": [verdict(task, a) for task, a in agg.items()],
    }
    write_report("wd_aware", res, report(res), plot, Path(args.out))


if __name__ == "__main__":
    main()
