"""Which trial's LR factor should the search keep? "Best trial" against smoothed choices.

The pipeline's FIFO search trains the curve's pick times each of the 9 factors of
`autolr.config.LR_SCALES` (factor 1 twice, 10 trials) and keeps the best trial. Next
to a cliff (an LR above which some seeds blow up) the single best trial is a
risk-seeking choice. This study scores rules that choose the factor from the same
10 trials' (lr_scale, val_metric), with no extra training:

- ``best``: the best trial (today's rule).
- ``neighbour mean``: each factor scored by the mean of its value and its
  neighbours' in the sorted factor list (one each side; at the ends only the one).
- ``kernel h``: a Gaussian kernel (Nadaraya-Watson) smoother of the trials' values
  over log10(factor), bandwidth ``h`` decades, read at the tried factors;
  ``h`` chosen leave-one-family-out from `BANDWIDTHS`.
- ``worse of self, upper``: a factor scored by the worse of its value and its upper
  neighbour's (the top factor by its own): guards against the cliff above.
- ``worst of window``: a factor scored by the worst of itself and both neighbours.

A factor's value is the mean of its trials (factor 1 has two in the pipeline); the
kernel pools the trials. A diverged trial (NaN, inf, missing) counts as the task's
worst: accuracy 0, or the worst finite loss (the grid's, or the run's own trials'
when replaying). Ties go to the lower factor (``best`` in the replay: the
earlier trial, as the pipeline does). The chosen factor's best trial is the
chosen trial.

Two evaluations, in goal units (`selection_report.goal_units`):

(a) ``simulated``: on the oracle grid, like `selection_report.scale_sets`: the
    held-out rule's pick on each of the pipeline's 3 median curves, times each
    factor, the values read off one grid seed (0 or 1, the seeds run at every
    point), the chosen LR scored on the mean of the other seeds at each grid
    point (1 to 3 of them: seeds 2 and 3 ran within a decade of the best).
(b) ``replayed``: each recorded ``pipeline-9`` run's trial_results, its chosen max
    LR (curve_max_lr x factor) trained on the grid's protocol (`selection.train_job`,
    4 seeds, default weight decay, min_lr = max_lr / 25); LRs already in
    ``pipeline-lr.jsonl`` are reused, the others trained into ``choice-lr.jsonl``
    (``--train``). Also the end-to-end view: the chosen trial's own val metric
    against the grid's best (optimistic: it was chosen on that validation set).

    python benchmarks/choice_study.py --train   # trains what the rules need (~20 min)
    python benchmarks/choice_study.py           # tables from the caches
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autolr.config import LR_SCALES  # noqa: E402
from benchmarks import selection_report as sr  # noqa: E402
from benchmarks import suite  # noqa: E402
from benchmarks.selection import NEAR_BEST_SEEDS, SEEDS, Cache, run_jobs, train_job  # noqa: E402

BANDWIDTHS = (0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4)  # decades
REPLAY_SEEDS = SEEDS + NEAR_BEST_SEEDS
# The two tasks whose pick sits just below a cliff: every factor of both runs trained
# with CLIFF_SEEDS (``--cliff``), so that a 1-in-4 blow-up is not read as the rule's doing.
CLIFF_TASKS = ("mnist1d_plain_cnn_sgd", "friedman_mlp_adamw")
CLIFF_SEEDS = tuple(range(8))
VARIANT = "pipeline-9"


# ---------------------------------------------------------------- the rules


def _per_factor(points):
    """(sorted factors, mean goodness per factor) of (factor, goodness) points."""
    by = defaultdict(list)
    for f, g in points:
        by[f].append(g)
    fs = sorted(by)
    return fs, np.array([np.mean(by[f]) for f in fs])


def _argmax_low(scores) -> int:
    """The index of the highest score; ties to the lowest index (the lower factor)."""
    return int(np.argmax(scores))


def rule_best(points):
    """The factor of the best single trial; ties to the first of ``points`` (the
    pipeline's trial order, as its search picks; the simulation lists factors upward)."""
    best = max(g for _, g in points)
    return next(f for f, g in points if g == best)


def rule_neighbour_mean(points):
    fs, v = _per_factor(points)
    scores = [np.mean(v[max(0, i - 1) : i + 2]) for i in range(len(fs))]
    return fs[_argmax_low(scores)]


def rule_worse_upper(points):
    fs, v = _per_factor(points)
    scores = [min(v[i], v[i + 1]) if i + 1 < len(fs) else v[i] for i in range(len(fs))]
    return fs[_argmax_low(scores)]


def rule_worst_window(points):
    fs, v = _per_factor(points)
    scores = [np.min(v[max(0, i - 1) : i + 2]) for i in range(len(fs))]
    return fs[_argmax_low(scores)]


def rule_kernel(points, h: float):
    fs = sorted({f for f, _ in points})
    x = np.log10([f for f, _ in points])
    g = np.array([g for _, g in points])
    scores = []
    for f in fs:
        w = np.exp(-0.5 * ((x - math.log10(f)) / h) ** 2)
        scores.append(float(w @ g / w.sum()))
    return fs[_argmax_low(scores)]


FIXED_RULES = {
    "best": rule_best,
    "neighbour mean": rule_neighbour_mean,
    "worse of self, upper": rule_worse_upper,
    "worst of window": rule_worst_window,
}


def all_rules():
    """name -> rule(points): the fixed ones and the kernel at each bandwidth."""
    rules = dict(FIXED_RULES)
    for h in BANDWIDTHS:
        rules[f"kernel {h:g}"] = lambda p, h=h: rule_kernel(p, h)
    return rules


def goodness(kind: str, value, fail: float) -> float:
    """Higher is better: accuracy, or minus the loss; a diverged value counts as ``fail``."""
    if value is None or not math.isfinite(value):
        value = fail
    return value if kind == "accuracy" else -value


# ---------------------------------------------------------------- (a) simulated on the grid


class Grid:
    """A task's grid per seed, with failures scored as `selection_report.Oracle` does."""

    def __init__(self, name: str, records: list[dict]):
        self.kind = suite.SPECS[name].kind
        finite = [r["value"] for r in records if r["value"] is not None]
        self.fail = 0.0 if self.kind == "accuracy" else max(finite)
        by_lr = defaultdict(dict)
        for r in records:
            v = r["value"]
            by_lr[round(math.log10(r["key"][2]), 4)][r["key"][4]] = self.fail if v is None else v
        self.grid = np.array(sorted(by_lr))
        self.by_lr = [by_lr[g] for g in self.grid]
        self.full_seeds = sorted(set.intersection(*(set(d) for d in self.by_lr)))

    def seed_values(self, seed: int) -> np.ndarray:
        return np.array([d.get(seed, np.nan) for d in self.by_lr])

    def others_mean(self, seed: int) -> np.ndarray:
        return np.array([np.mean([v for s, v in d.items() if s != seed]) for d in self.by_lr])

    def read(self, values: np.ndarray, lr: float) -> float:
        return float(np.interp(math.log10(lr), self.grid, values))


def simulate(oracle, grids, picks, rules, tasks) -> dict:
    """{rule: {task: mean goal units}} and the per-choice-seed split, over each curve
    pick and each choice seed (0, 1): chosen on that seed, scored on the others' mean.
    Also the same scored on the other full seed only (`selection_report.validated_gap`),
    and chosen on every seed whose grid covers the 9 candidates (``all_seeds``)."""
    units = {name: {} for name in rules}
    by_seed = {name: defaultdict(dict) for name in rules}
    one_seed = {name: {} for name in rules}
    all_seeds = {name: {} for name in rules}
    factors = {name: {} for name in rules}
    for t in tasks:
        o, gr = oracle[t], grids[t]
        acc = defaultdict(list)
        acc1 = defaultdict(list)
        per_seed = defaultdict(lambda: defaultdict(list))
        chosen = defaultdict(list)
        every = defaultdict(list)
        for pick in picks[t]:
            for c in gr.full_seeds:
                mine, others = gr.seed_values(c), gr.others_mean(c)
                other1 = gr.seed_values([s for s in gr.full_seeds if s != c][0])
                points = [
                    (f, goodness(gr.kind, gr.read(mine, pick * f), gr.fail)) for f in LR_SCALES
                ]
                for name, rule in rules.items():
                    f = rule(points)
                    u = sr.goal_units(o.gap(gr.read(others, pick * f)), t)
                    acc[name].append(u)
                    per_seed[name][c].append(u)
                    acc1[name].append(sr.goal_units(o.gap(gr.read(other1, pick * f)), t))
                    chosen[name].append(f)
            # every seed whose grid covers all 9 candidates chooses (seeds 2, 3 only
            # where the candidates lie within a decade of the best)
            for c in sorted({s for d in gr.by_lr for s in d}):
                mine, others = gr.seed_values(c), gr.others_mean(c)
                reads = [gr.read(mine, pick * f) for f in LR_SCALES]
                if not all(math.isfinite(v) for v in reads):
                    continue
                points = [
                    (f, goodness(gr.kind, v, gr.fail))
                    for f, v in zip(LR_SCALES, reads, strict=True)
                ]
                for name, rule in rules.items():
                    f = rule(points)
                    every[name].append(sr.goal_units(o.gap(gr.read(others, pick * f)), t))
        for name in rules:
            units[name][t] = float(np.mean(acc[name]))
            one_seed[name][t] = float(np.mean(acc1[name]))
            all_seeds[name][t] = float(np.mean(every[name]))
            factors[name][t] = chosen[name]
            for c, us in per_seed[name].items():
                by_seed[name][c][t] = float(np.mean(us))
    return {
        "units": units,
        "by_seed": by_seed,
        "one_seed": one_seed,
        "all_seeds": all_seeds,
        "factors": factors,
    }


def held_out_bandwidth(units: dict, tasks: list[str]) -> tuple[dict, float, dict]:
    """The kernel's h chosen leave-one-family-out on ``units`` ({rule: {task: units}}):
    ({family: h}, h chosen on all tasks, {task: held-out units})."""
    names = {h: f"kernel {h:g}" for h in BANDWIDTHS}

    def mean(h, ts):
        return float(np.mean([units[names[h]][t] for t in ts]))

    chosen, held = {}, {}
    for fam in suite.FAMILIES:
        others = [t for t in tasks if suite.SPECS[t].family != fam]
        chosen[fam] = min(BANDWIDTHS, key=lambda h: (mean(h, others), h))
        held |= {t: units[names[chosen[fam]]][t] for t in tasks if suite.SPECS[t].family == fam}
    in_sample = min(BANDWIDTHS, key=lambda h: (mean(h, tasks), h))
    return chosen, in_sample, held


def curve_picks(data: dict, oracle: dict, tasks: list[str]) -> dict:
    """The held-out shared rule's pick on each of the pipeline's median curves, as
    `selection_report.scale_sets` takes them."""
    curves = data["curves"]
    marks = {
        v: {
            t: [sr.curve_marks(curves[(v, t, s)])[0] for s in sr.RT_SEEDS if (v, t, s) in curves]
            for t in tasks
        }
        for v in ("api", "pipeline")
    }
    held = {
        fam: sr.tune(
            marks["api"], [t for t in tasks if suite.SPECS[t].family != fam], oracle, False
        )
        for fam in suite.FAMILIES
    }
    return {
        t: [
            sr.rule_lr(m, *held[suite.SPECS[t].family])
            for m in marks["pipeline"][t]
            if m is not None
        ]
        for t in tasks
    }


# ---------------------------------------------------------------- (b) replayed on pipeline-9


def lr_key(lr: float) -> str:
    return f"{lr:.12g}"


def trained_index(out: Path) -> dict:
    """(task, lr, seed) -> value of every run trained on the grid's protocol (any label)."""
    index = {}
    for name in ("pipeline-lr.jsonl", "choice-lr.jsonl"):
        for k, r in Cache(out / name).records.items():
            if math.isclose(k[3], k[2] / 25, rel_tol=1e-9):
                index[(k[1], lr_key(k[2]), k[4])] = r["value"]
    return index


def replay_points(run: dict, kind: str):
    """(factor, goodness) of a run's trials, and the fail value used."""
    finite = [v for _, _, v in run["trial_results"] if v is not None and math.isfinite(v)]
    fail = 0.0 if kind == "accuracy" else max(finite)
    points = [(f, goodness(kind, v, fail)) for f, _, v in run["trial_results"]]
    for f in LR_SCALES:  # a factor with no trial (it crashed) counts as failed
        if all(p[0] != f for p in points):
            points.append((f, goodness(kind, None, fail)))
    return points, fail


def replay_choices(runs: dict, rules: dict) -> dict:
    """{rule: {(task, seed): (factor, lr, chosen trial's value)}}."""
    out = {name: {} for name in rules}
    for key, run in runs.items():
        t = key[1]
        kind = suite.SPECS[t].kind
        points, _ = replay_points(run, kind)
        for name, rule in rules.items():
            f = rule(points)
            trials = [v for g, _, v in run["trial_results"] if g == f]
            finite = [v for v in trials if v is not None and math.isfinite(v)]
            value = (max(finite) if kind == "accuracy" else min(finite)) if finite else None
            out[name][(t, key[2])] = (f, run["curve_max_lr"] * f, value)
    return out


def replay_jobs(choices: dict, index: dict) -> list[tuple]:
    keys = set()
    for per_run in choices.values():
        for (t, _), (_, lr, _) in per_run.items():
            for s in REPLAY_SEEDS:
                if (t, lr_key(lr), s) not in index:
                    keys.add((f"{VARIANT}-lr", t, lr, lr / 25, s))
    return sorted(keys)


def cliff_jobs(runs: dict, index: dict) -> list[tuple]:
    keys = set()
    for key, run in runs.items():
        if key[1] in CLIFF_TASKS:
            for f in LR_SCALES:
                lr = run["curve_max_lr"] * f
                keys |= {
                    (f"{VARIANT}-lr", key[1], lr, lr / 25, s)
                    for s in CLIFF_SEEDS
                    if (key[1], lr_key(lr), s) not in index
                }
    return sorted(keys)


def cliff_table(runs: dict, choices: dict, index: dict, oracle: dict, grids: dict) -> dict:
    """Per cliff task and run: each factor's trial value and its LR's value over
    `CLIFF_SEEDS` (mean, standard error, blow-ups), and each rule's units at 8 seeds."""
    out = {}
    for key, run in sorted(runs.items()):
        t = key[1]
        if t not in CLIFF_TASKS:
            continue
        o, gr = oracle[t], grids[t]
        rows = {}
        for f in LR_SCALES:
            lr = run["curve_max_lr"] * f
            vals = [index.get((t, lr_key(lr), s), "missing") for s in CLIFF_SEEDS]
            if "missing" in vals:
                continue
            vals = [gr.fail if v is None else v for v in vals]
            units = [sr.goal_units(o.gap(v), t) for v in vals]
            blown = sum(u >= sr.CAP for u in units)  # diverged or collapsed seeds
            trials = [v for g, _, v in run["trial_results"] if g == f]
            rows[f] = {
                "lr": lr,
                "trials": trials,
                "mean": float(np.mean(vals)),
                "units": sr.goal_units(o.gap(float(np.mean(vals))), t),
                "se_units": float(np.std(units, ddof=1) / math.sqrt(len(units))),
                "blown": blown,
                "values": vals,
            }
        out[f"{t}/{key[2]}"] = {
            "factors": rows,
            "rules": {n: c[(t, key[2])][0] for n, c in choices.items()},
        }
    return out


def replay_score(choices: dict, index: dict, oracle: dict, grids: dict, tasks) -> dict:
    """{rule: {"retrained": {task: units}, "end_to_end": {task: units}, "runs": {...}}}."""
    out = {}
    for name, per_run in choices.items():
        retrained, e2e, runs = defaultdict(list), defaultdict(list), {}
        for (t, seed), (f, lr, value) in per_run.items():
            o, gr = oracle[t], grids[t]
            vals = [index.get((t, lr_key(lr), s), "missing") for s in REPLAY_SEEDS]
            if "missing" in vals:
                continue
            vals = [gr.fail if v is None else v for v in vals]
            u = sr.goal_units(o.gap(float(np.mean(vals))), t)
            ue = sr.goal_units(o.gap(gr.fail if value is None else value), t)
            retrained[t].append(u)
            e2e[t].append(ue)
            runs[f"{t}/{seed}"] = {
                "factor": f,
                "lr": lr,
                "seed_values": vals,
                "units": u,
                "trial_units": ue,
            }
        out[name] = {
            "retrained": {t: float(np.mean(v)) for t, v in retrained.items()},
            "end_to_end": {t: float(np.mean(v)) for t, v in e2e.items()},
            "runs": runs,
        }
    return out


# ---------------------------------------------------------------- report


def stats(per_task: dict, tasks) -> dict:
    v = {t: per_task[t] for t in tasks if t in per_task}
    worst = max(v, key=v.get)
    return {
        "mean": float(np.mean(list(v.values()))),
        "worst": v[worst],
        "worst_task": worst,
        "tasks": len(v),
    }


def paired(a: dict, b: dict, tasks, boots: int = 10000) -> dict:
    """Mean of a - b over tasks, with a task bootstrap 90 % interval, and wins/losses."""
    d = np.array([a[t] - b[t] for t in tasks if t in a and t in b])
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, len(d), (boots, len(d)))].mean(axis=1)
    return {
        "mean": float(d.mean()),
        "lo": float(np.quantile(means, 0.05)),
        "hi": float(np.quantile(means, 0.95)),
        "better": int((d < -1e-9).sum()),
        "worse": int((d > 1e-9).sum()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "selection")
    parser.add_argument("--report", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--train", action="store_true", help="train the replay's missing LRs")
    parser.add_argument(
        "--cliff",
        action="store_true",
        help="train every factor of the cliff tasks' runs at 8 seeds",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rules", nargs="*", default=None, help="train only these rules' LRs")
    args = parser.parse_args(argv)

    data = sr.load(args.out)
    oracle = data["oracle"]
    tasks = [t for t in suite.SPECS if t in oracle]
    records = defaultdict(list)
    for key, r in Cache(args.out / "oracle.jsonl").records.items():
        records[key[1]].append(r)
    grids = {t: Grid(t, records[t]) for t in tasks}
    rules = all_rules()

    # (a)
    picks = curve_picks(data, oracle, tasks)
    sim = simulate(oracle, grids, picks, rules, tasks)
    h_fold, h_in, h_held = held_out_bandwidth(sim["units"], tasks)
    h_fold1, h_in1, h_held1 = held_out_bandwidth(sim["one_seed"], tasks)

    # (b)
    runs = {k: r for k, r in data[VARIANT].items() if r.get("curve_max_lr")}
    choices = replay_choices(runs, rules)
    index = trained_index(args.out)
    todo = replay_jobs({n: choices[n] for n in (args.rules or rules)}, index)
    print(f"replay: {len(todo)} runs to train", flush=True)
    if args.train and todo:
        run_jobs(train_job, todo, Cache(args.out / "choice-lr.jsonl"), args.workers, "choice-lr")
        index = trained_index(args.out)
    cliff_todo = cliff_jobs(runs, index)
    print(f"cliff: {len(cliff_todo)} runs to train", flush=True)
    if args.cliff and cliff_todo:
        run_jobs(train_job, cliff_todo, Cache(args.out / "choice-lr.jsonl"), args.workers, "cliff")
        index = trained_index(args.out)
    rep = replay_score(choices, index, oracle, grids, tasks)
    cliff = cliff_table(runs, choices, index, oracle, grids)
    # the kernel in the replay at the simulation's held-out bandwidths (per family)
    held_kernel = {"retrained": {}, "end_to_end": {}}
    for t in tasks:
        name = f"kernel {h_fold[suite.SPECS[t].family]:g}"
        for view in held_kernel:
            if t in rep[name][view]:
                held_kernel[view][t] = rep[name][view][t]

    result = {
        "tasks": tasks,
        "picks": picks,
        "simulated": {
            "units": sim["units"],
            "one_seed": sim["one_seed"],
            "by_seed": {n: dict(v) for n, v in sim["by_seed"].items()},
            "factors": sim["factors"],
            "bandwidth_by_fold": h_fold,
            "bandwidth_in_sample": h_in,
            "kernel_held_out": h_held,
            "bandwidth_by_fold_one_seed": h_fold1,
            "bandwidth_in_sample_one_seed": h_in1,
            "kernel_held_out_one_seed": h_held1,
            "all_seeds": sim["all_seeds"],
            "kernel_held_out_all_seeds": {
                t: sim["all_seeds"][f"kernel {h_fold[suite.SPECS[t].family]:g}"][t] for t in tasks
            },
        },
        "replay": rep,
        "replay_kernel_held_out": held_kernel,
        "replay_missing_runs": len(replay_jobs(choices, index)),
        "cliff": cliff,
    }
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "choice_study.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result, oracle, grids)
    (args.report / "choice_study.md").write_text(md)
    print(md)


def markdown(res: dict, oracle, grids) -> str:
    tasks, sim, rep = res["tasks"], res["simulated"], res["replay"]
    fixed = list(FIXED_RULES)
    kern = [f"kernel {h:g}" for h in BANDWIDTHS]
    L = [
        "# Choosing the LR factor from the search's trials",
        "",
        "`python benchmarks/choice_study.py` (`--train`, `--cliff` to train what is not in",
        "`results/selection/pipeline-lr.jsonl` or `choice-lr.jsonl`). Rules: see the script's",
        "docstring. Goal units as in selection.md (lower is better; 50 = a failed pick).",
        "",
    ]
    L += [
        "## (a) Simulated on the grid",
        "",
        "Chosen on grid seed 0 or 1 at the held-out curve picks x 9 factors, scored on the",
        "mean of the other seeds (1-3). Goal units, mean over the 3 curve picks x 2 choice",
        "seeds per task, then over the 18 tasks. `seed 0 / seed 1`: the mean when choosing on",
        "that seed only (the split shows the noise). `one seed`: scored on the other of",
        "seeds 0/1 only, as `selection_report.validated_gap`. `every seed chooses`: seeds 2",
        "and 3 choose too where their grid covers the 9 candidates (near the best).",
        "",
        "| rule | constant | held-out mean / worst | in-sample mean / worst | worst task "
        "| choose on seed 0 / seed 1 | one-seed scoring mean / worst | every seed chooses "
        "mean / worst | vs best: mean diff "
        "[90 % task bootstrap] (better/worse tasks) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    u = sim["units"]

    def row(name, const, held, ins, one, every):
        s, si, so, se = (stats(x, tasks) for x in (held, ins, one, every))
        bs = sim["by_seed"].get(name, {})
        split = (
            " / ".join(f"{np.mean(list(bs[c].values())):.2f}" for c in sorted(bs)) if bs else "-"
        )
        p = paired(held, u["best"], tasks)
        return (
            f"| {name} | {const} | {s['mean']:.2f} / {s['worst']:.2f} | "
            f"{si['mean']:.2f} / {si['worst']:.2f} | {s['worst_task']} | {split} | "
            f"{so['mean']:.2f} / {so['worst']:.2f} | {se['mean']:.2f} / {se['worst']:.2f} | "
            f"{p['mean']:+.2f} "
            f"[{p['lo']:+.2f}, {p['hi']:+.2f}] ({p['better']}/{p['worse']}) |"
        )

    for name in fixed:
        L.append(row(name, "-", u[name], u[name], sim["one_seed"][name], sim["all_seeds"][name]))
    hf = sim["bandwidth_by_fold"]
    L.append(
        row(
            "kernel (h held out)",
            "h by fold: " + ", ".join(f"{h:g}" for h in hf.values()),
            sim["kernel_held_out"],
            u[f"kernel {sim['bandwidth_in_sample']:g}"],
            sim["kernel_held_out_one_seed"],
            sim["kernel_held_out_all_seeds"],
        )
    )
    for name in kern:
        L.append(
            row(name, "fixed", u[name], u[name], sim["one_seed"][name], sim["all_seeds"][name])
        )
    L += [
        "",
        f"Kernel bandwidth in sample: {sim['bandwidth_in_sample']:g}; by held-out family: "
        + ", ".join(f"{k} {v:g}" for k, v in hf.items()),
        f"(one-seed scoring: in sample {sim['bandwidth_in_sample_one_seed']:g}; by fold "
        + ", ".join(f"{v:g}" for v in sim["bandwidth_by_fold_one_seed"].values())
        + ").",
        "",
    ]

    L += [
        "## (b) Replayed on the recorded pipeline-9 runs (36 = 18 tasks x 2 seeds)",
        "",
        "`retrained`: the rule's chosen max LR (curve pick x factor) trained on the grid's",
        "protocol, mean of 4 seeds; `end to end`: the chosen trial's own val metric (chosen",
        "on that same validation set: optimistic). Goal units per task = mean of its 2 runs.",
        "`run 0 / run 1`: the retrained mean over tasks of each pipeline seed's run alone.",
        "",
        "| rule | constant | retrained mean / worst | worst task | run 0 / run 1 | "
        "vs best: mean diff [90 %] (better/worse) | end to end mean / worst |",
        "|---|---|---|---|---|---|---|",
    ]

    def rrow(name, const, retr, e2e, runs=None):
        if len(retr) < len(tasks):
            return f"| {name} | {const} | ({len(retr)} tasks trained) | | | | |"
        s, se = stats(retr, tasks), stats(e2e, tasks)
        split = "-"
        if runs:
            per = defaultdict(dict)
            for k, v in runs.items():
                t, sd = k.split("/")
                per[sd][t] = v["units"]
            split = " / ".join(f"{np.mean(list(per[sd].values())):.2f}" for sd in sorted(per))
        p = paired(retr, rep["best"]["retrained"], tasks)
        return (
            f"| {name} | {const} | {s['mean']:.2f} / {s['worst']:.2f} | {s['worst_task']} | "
            f"{split} | {p['mean']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}] "
            f"({p['better']}/{p['worse']}) | {se['mean']:.2f} / {se['worst']:.2f} |"
        )

    for name in fixed:
        L.append(
            rrow(name, "-", rep[name]["retrained"], rep[name]["end_to_end"], rep[name]["runs"])
        )
    hk = res["replay_kernel_held_out"]
    L.append(rrow("kernel (h held out, from (a))", "by fold", hk["retrained"], hk["end_to_end"]))
    for name in kern:
        L.append(
            rrow(name, "fixed", rep[name]["retrained"], rep[name]["end_to_end"], rep[name]["runs"])
        )
    L += ["", f"Runs still to train for every rule: {res['replay_missing_runs']}.", ""]

    cl = res["cliff"]
    if cl:
        L += [
            "## (c) The two cliff tasks, every factor at 8 seeds",
            "",
            "Each run's factors: its trial value(s) (the search's own, varied weight decay",
            "and BN momentum), and the LR trained on the grid's protocol over seeds 0-7: goal",
            "units of the 8-seed mean +- the standard error of the per-seed units, and the",
            "seeds out of 8 that blew up (diverged, or a gap at the 50-unit cap: chance",
            "accuracy, >= 500 % MSE). Then each rule's choice read at 8 seeds.",
            "",
        ]
        for run, d in cl.items():
            L += [
                f"{run}:",
                "",
                "| factor | lr | trial value(s) | 8-seed units +- se | blown up |",
                "|---|---|---|---|---|",
            ]
            for f, r in d["factors"].items():
                tv = ", ".join(f"{v:.4g}" if v is not None else "nan" for v in r["trials"])
                L.append(
                    f"| {f:g} | {r['lr']:.4g} | {tv} | {r['units']:.2f} +- "
                    f"{r['se_units']:.2f} | {r['blown']} |"
                )
            L.append("")
        L += ["| rule | " + " | ".join(cl) + " | mean |", "|---" * (len(cl) + 2) + "|"]
        for n in list(FIXED_RULES) + [f"kernel {h:g}" for h in BANDWIDTHS]:
            cells, us = [], []
            for d in cl.values():
                f = d["rules"][n]
                r = d["factors"].get(f)
                if r is None:
                    cells.append(f"{f:g}: -")
                    continue
                us.append(r["units"])
                cells.append(f"{f:g}: {r['units']:.2f}")
            mean = f"{np.mean(us):.2f}" if len(us) == len(cl) else "-"
            L.append(f"| {n} | " + " | ".join(cells) + f" | {mean} |")
        L += [
            "",
            "The replay's retrained figure with these two tasks read at 8 seeds instead of 4:",
            "",
            "| rule | retrained mean / worst (worst task) | vs best: mean diff [90 %] "
            "(better/worse) |",
            "|---|---|---|",
        ]
        mixed = {}
        for n in list(FIXED_RULES) + [f"kernel {h:g}" for h in BANDWIDTHS]:
            per = dict(rep[n]["retrained"])
            for t in CLIFF_TASKS:
                us = [
                    d["factors"][d["rules"][n]]["units"]
                    for run, d in cl.items()
                    if run.startswith(t + "/")
                ]
                per[t] = float(np.mean(us))
            mixed[n] = per
        for n, per in mixed.items():
            st, p = stats(per, tasks), paired(per, mixed["best"], tasks)
            L.append(
                f"| {n} | {st['mean']:.2f} / {st['worst']:.2f} ({st['worst_task']}) | "
                f"{p['mean']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}] "
                f"({p['better']}/{p['worse']}) |"
            )
        L.append("")

    # per task, the worst tasks of "best" (retrained) and of the simulated
    L += [
        "## Per task",
        "",
        "Goal units. sim: simulated held-out; retr: replay retrained "
        "(factors chosen by run 0, run 1).",
        "",
    ]
    show = fixed + ["kernel (h held out)"]
    L.append(
        "| task | seed gap (units) | "
        + " | ".join(f"{n}: sim / retr (factors)" for n in show)
        + " |"
    )
    L.append("|---" * (2 + len(show)) + "|")
    for t in tasks:
        o = oracle[t]
        cells = []
        for n in show:
            if n == "kernel (h held out)":
                simv = sim["kernel_held_out"][t]
                kname = f"kernel {sim['bandwidth_by_fold'][suite.SPECS[t].family]:g}"
            else:
                simv, kname = u[n][t], n
            rr = rep[kname]
            retr = rr["retrained"].get(t)
            fs = ", ".join(
                f"{rr['runs'][f'{t}/{s}']['factor']:g}" for s in (0, 1) if f"{t}/{s}" in rr["runs"]
            )
            cells.append(f"{simv:.2f} / {'-' if retr is None else f'{retr:.2f}'} ({fs})")
        L.append(f"| {t} | {sr.goal_units(o.seed_gap, t):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
