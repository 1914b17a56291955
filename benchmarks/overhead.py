"""Overhead and scaling benchmark: what autolr costs on top of the training it does.

1. Range-test step vs training step: `autolr.range_test` against autolr's own
   training loop (`train_epoch`, 1cycle) on the same model, data and batches,
   interleaved and repeated; the per-step time is the slope over two lengths,
   so the range test's one-off snapshot/restore is reported on its own.
2. The default pipeline (`python -m autolr.pipeline`, as a user runs it), wall
   time by stage.
3. Trial throughput with 1 and 2 concurrent trials (FIFO, every trial to the end).
4. The fixed per-trial cost of Ray and MLflow: searches of 1 and of N trials
   at one trial at a time, against the same training run bare in this process.
5. On a GPU, when there is one: 1 (range-test step overhead and host syncs
   per step) and 3 with 1, 2 and 4 trials sharing the GPU. The CIFAR-10
   ResNet-56 step is timed on synthetic data (random tensors: nothing can be
   downloaded) on whatever device there is.

Writes ``<out>/overhead.md``, ``.json`` and ``.png``.

    python benchmarks/overhead.py            # the committed results (~8 min on 2 cores)
    python benchmarks/overhead.py --quick    # a smoke run into /tmp
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from _common import ROOT, common_parser, header, provenance, pyplot, write_report

STEP_GOAL = 1.05  # range-test step / training step


# --- 1. range-test step vs training step -------------------------------------------------


def _tasks(quick: bool) -> dict[str, Any]:
    """name -> Task: the two built-ins, and ResNet-56 on random tensors of CIFAR's shape."""
    import torch
    from torch.utils.data import TensorDataset

    from autolr.tasks import Task, build_task, resolve
    from autolr.tasks.cifar10 import resnet

    g = torch.Generator().manual_seed(0)
    n = 64 if quick else 256
    fake = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,)))
    cifar = Task(
        functools.partial(resnet, 56), fake, fake, batch_size=32, name="cifar10-resnet56-synthetic"
    )
    return {
        "mnist1d": build_task(resolve("mnist1d")),
        "digits": build_task(resolve("digits")),
        cifar.name: cifar,
    }


def _fresh(task, device, seed: int = 0):
    """The model, optimizer and train loader as the range test and training build them."""
    from autolr.training import fresh

    start = fresh(task, seed=seed, lr=1e-4, weight_decay=5e-4, bn_momentum=None, device=device)
    return start.model, start.optimizer, start.train_loader


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(task, device, passes: int) -> tuple[float, int]:
    """Seconds for ``passes`` passes of autolr's training loop; and its steps."""
    from autolr.schedules import make_scheduler
    from autolr.training import train_epoch

    model, optimizer, loader = _fresh(task, device)
    steps = passes * len(loader)
    scheduler = make_scheduler("onecycle", optimizer, max_lr=1e-3, min_lr=1e-4, total_steps=steps)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(passes):
        train_epoch(model, loader, optimizer, scheduler, task, device)
    _sync(device)
    return time.perf_counter() - t0, steps


def time_range_test(task, device, passes: int) -> tuple[float, int]:
    """Seconds for a range test of ``passes`` passes over the same loader; and its steps."""
    from autolr.range_test import range_test

    model, optimizer, loader = _fresh(task, device)
    steps = passes * len(loader)
    _sync(device)
    t0 = time.perf_counter()
    # LRs far below divergence, so the test runs every step; amp off, as in autolr's pipeline
    result = range_test(
        model,
        optimizer,
        task.loss_fn,
        loader,
        start_lr=1e-5,
        end_lr=1e-4,
        num_iter=steps,
        amp=False,
        device=device,
        progress=False,
    )
    _sync(device)
    seconds = time.perf_counter() - t0
    if result.stop_reason != "completed":
        raise RuntimeError(f"the timed range test stopped early ({result.stop_reason})")
    return seconds, steps


def host_syncs_per_step(task, device, which: str) -> float | None:
    """Synchronising CUDA calls per step, counted by torch's sync debug mode; None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    timer = time_range_test if which == "range_test" else time_training
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, steps = timer(task, device, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs) / steps


def step_overhead(task, device, repeats: int, passes: int) -> dict:
    """Per-step seconds of each, from the slope between ``passes`` and ``2 * passes`` passes."""
    time_training(task, device, 1)  # warm-up: first-call allocations, kernels
    time_range_test(task, device, 1)
    samples: dict[str, list[float]] = {"train": [], "range_test": [], "range_fixed": []}
    for i in range(repeats):
        # alternate the order, so drift in the machine's load hits both alike
        order = ("train", "range_test") if i % 2 == 0 else ("range_test", "train")
        for which in order:
            timer = time_training if which == "train" else time_range_test
            (t1, n1), (t2, n2) = timer(task, device, passes), timer(task, device, 2 * passes)
            per_step = (t2 - t1) / (n2 - n1)
            samples[which].append(per_step)
            if which == "range_test":
                samples["range_fixed"].append(t1 - per_step * n1)  # snapshot + restore
    train, rt = statistics.median(samples["train"]), statistics.median(samples["range_test"])
    return {
        "device": str(device),
        "steps_per_pass": n1 // passes,
        "train_step_ms": 1e3 * train,
        "range_test_step_ms": 1e3 * rt,
        "ratio": rt / train,
        "ratios": [r / t for r, t in zip(samples["range_test"], samples["train"], strict=True)],
        "range_test_fixed_ms": 1e3 * statistics.median(samples["range_fixed"]),
        "syncs_per_step": {
            "train": host_syncs_per_step(task, device, "train"),
            "range_test": host_syncs_per_step(task, device, "range_test"),
        },
    }


# --- 2. the default pipeline, stage by stage ----------------------------------------------


def default_pipeline(runs: int, tmp: Path, quick: bool) -> list[dict]:
    """``python -m autolr.pipeline`` in a fresh process, as a user runs it."""
    out = []
    for i in range(runs):
        summary_path = tmp / f"summary-{i}.json"
        cmd = [
            sys.executable,
            "-m",
            "autolr.pipeline",
            "--no-progress",
            "--output",
            str(summary_path),
            "--tracking-uri",
            f"sqlite:///{tmp / 'pipeline.db'}",
            "--set",
            f"search.storage_path={tmp / 'ray'}",
        ]
        if quick:
            cmd += ["--config", str(ROOT / "pipelines" / "smoke.yaml")]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        process = time.perf_counter() - t0
        summary = json.loads(summary_path.read_text())
        stages = summary["stage_seconds"]
        out.append(
            {
                "process_seconds": process,
                "wall_seconds": summary["wall_seconds"],
                "stages": stages,
                # MLflow setup and logging, the task's data, plots: what the stages leave out
                "other_seconds": summary["wall_seconds"] - sum(stages.values()),
                "startup_seconds": process - summary["wall_seconds"],  # imports, config
                "val_metric": summary["val_metric"],
                "trials": len(summary["trials"]),
                "trial_epochs": sum(t["epochs_run"] for t in summary["trials"]),
            }
        )
        print(f"default pipeline run {i}: {process:.1f} s, stages {stages}", flush=True)
    return out


# --- 3 and 4. trials: throughput and fixed cost ---------------------------------------------


def run_search(
    task_name: str,
    tmp: Path,
    *,
    num_samples: int,
    epochs: int,
    concurrent: int,
    gpus_per_trial: float | None = None,
) -> dict:
    """One pipeline run whose search is FIFO: every trial trains ``epochs`` epochs."""
    from autolr.config import load_config
    from autolr.pipeline import run

    overrides = [
        f"task={task_name}",
        "range_test.repeats=1",
        "train.epochs=1",  # the final run is not what is measured here
        "search.scheduler=fifo",
        f"search.num_samples={num_samples}",
        f"search.epochs={epochs}",
        f"search.max_concurrent={concurrent}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'trials.db'}",
        f"search.storage_path={tmp / 'ray'}",
        "progress=false",
    ]
    if gpus_per_trial is not None:
        overrides.append(f"search.gpus_per_trial={gpus_per_trial}")
    result = run(load_config(None, overrides))
    seconds = result.stage_seconds["search"]
    trial_epochs = sum(t.epochs_run for t in result.trials)
    return {
        "num_samples": num_samples,
        "epochs": epochs,
        "concurrent": concurrent,
        "gpus_per_trial": gpus_per_trial,
        "search_seconds": seconds,
        "trial_epochs": trial_epochs,
        "trial_epochs_per_min": 60 * trial_epochs / seconds,
        # Tune's time_total_s: the trial function's own wall time, MLflow and checkpoints in
        "trial_seconds": statistics.mean(t.seconds for t in result.trials),
        "max_lr": result.max_lr,
        "min_lr": result.min_lr,
    }


def bare_trial_seconds(task_name: str, epochs: int, max_lr: float, min_lr: float) -> float:
    """One trial's training, with nothing around it, in this process on 1 thread."""
    from autolr.tasks import build_task, resolve
    from autolr.training import train

    task = build_task(resolve(task_name))
    t0 = time.perf_counter()
    train(task, max_lr=max_lr, min_lr=min_lr, epochs=epochs, weight_decay=1e-4, progress=False)
    return time.perf_counter() - t0


def trials(task_name: str, tmp: Path, args: argparse.Namespace) -> dict:
    n, e = args.trials, args.trial_epochs
    throughput = []
    for concurrent in (1, 2):
        r = run_search(task_name, tmp, num_samples=n, epochs=e, concurrent=concurrent)
        throughput.append(r)
        print(f"{n} trials x {e} epochs, {concurrent} at a time: {r['search_seconds']:.1f} s")
    # The fixed cost per trial: the slope between searches of 1 and m one-epoch trials run
    # one at a time (median of repeats: Ray's start-up alone varies by seconds).
    m = args.overhead_trials
    ones, manys = [], []
    for _ in range(args.search_repeats):
        ones.append(run_search(task_name, tmp, num_samples=1, epochs=1, concurrent=1))
        manys.append(run_search(task_name, tmp, num_samples=m, epochs=1, concurrent=1))
    one = statistics.median(r["search_seconds"] for r in ones)
    many = statistics.median(r["search_seconds"] for r in manys)
    lr = ones[0]
    bare = statistics.median(
        bare_trial_seconds(task_name, 1, lr["max_lr"], lr["min_lr"]) for _ in range(3)
    )
    per_trial = (many - one) / (m - 1)
    in_trial = statistics.median(r["trial_seconds"] for r in manys)
    return {
        "throughput": throughput,
        "speedup_2": throughput[1]["trial_epochs_per_min"] / throughput[0]["trial_epochs_per_min"],
        "overhead_trials": m,
        "one_trial_searches": [r["search_seconds"] for r in ones],
        "many_trial_searches": [r["search_seconds"] for r in manys],
        "bare_trial_seconds": bare,
        "per_trial_seconds": per_trial,
        "per_trial_overhead_seconds": per_trial - bare,
        # inside the trial function (MLflow run and logging, a checkpoint, a report) ...
        "in_trial_overhead_seconds": in_trial - bare,
        # ... and around it (Tune placing the trial, actor reuse, the driver's bookkeeping)
        "between_trials_seconds": per_trial - in_trial,
        "fixed_search_seconds": one - per_trial,
    }


def gpu_trials(task_name: str, tmp: Path, args: argparse.Namespace) -> list[dict]:
    """1, 2 and 4 trials sharing one GPU through fractional GPU requests."""
    out = []
    for share in (1, 2, 4):
        r = run_search(
            task_name,
            tmp,
            num_samples=max(4, args.trials),
            epochs=args.trial_epochs,
            concurrent=share,
            gpus_per_trial=1 / share,
        )
        out.append({"trials_per_gpu": share, **r})
        print(f"{share} trials per GPU: {r['trial_epochs_per_min']:.1f} trial-epochs/min")
    return out


# --- report ------------------------------------------------------------------------------


def report(res: dict) -> list[str]:
    """The markdown report's lines, from the saved numbers."""
    lines = header("Overhead and scaling", res)
    lines += [f"- torch threads in this process: {res['threads']}", ""]

    lines += [
        "## 1. Range-test step vs training step",
        "",
        f"Goal: a range-test step costs at most {STEP_GOAL:.2f}x a step of autolr's training "
        "loop on the same model, data and batches. Per-step times are slopes between runs of "
        f"one and two passes over the data, median of {res['repeats']} interleaved repeats.",
        "",
        "| model | device | training step (ms) | range-test step (ms) | ratio (median; range) "
        "| goal | range-test snapshot + restore (ms, once per test) | host syncs per step "
        "(train / range test) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in res["steps"].items():
        syncs = s["syncs_per_step"]
        sync_cell = (
            "n/a on CPU"
            if syncs["train"] is None
            else f"{syncs['train']:.2f} / {syncs['range_test']:.2f}"
        )
        lines.append(
            f"| {name} | {s['device']} | {s['train_step_ms']:.2f} | {s['range_test_step_ms']:.2f} "
            f"| {s['ratio']:.3f} ({min(s['ratios']):.2f}–{max(s['ratios']):.2f}) | "
            f"{'met' if s['ratio'] <= STEP_GOAL else 'missed'} | {s['range_test_fixed_ms']:.0f} "
            f"| {sync_cell} |"
        )

    p = res["pipeline"]
    stage_names = list(p[0]["stages"])
    lines += [
        "",
        "## 2. The default pipeline, by stage",
        "",
        "`python -m autolr.pipeline` in a fresh process (the default config: MNIST-1D, "
        "range test 3 x 100 steps, ASHA over 8 trials, final 1cycle run of 10 epochs).",
        "",
        "| run | process s | startup (imports, config) s | "
        + " | ".join(f"{k} s" for k in stage_names)
        + " | other (MLflow, data, plots) s | val accuracy | trials (trial-epochs) |",
        "|---" * (6 + len(stage_names)) + "|",
    ]
    for i, r in enumerate(p):
        lines.append(
            f"| {i} | {r['process_seconds']:.1f} | {r['startup_seconds']:.1f} | "
            + " | ".join(f"{r['stages'].get(k, 0):.1f}" for k in stage_names)
            + f" | {r['other_seconds']:.1f} | {100 * r['val_metric']:.2f}% | "
            f"{r['trials']} ({r['trial_epochs']}) |"
        )

    t = res["trials"]
    lines += [
        "",
        "## 3. Trial throughput, 1 and 2 concurrent trials",
        "",
        f"MNIST-1D, {t['throughput'][0]['num_samples']} trials of "
        f"{t['throughput'][0]['epochs']} epochs each, FIFO (no early stopping), "
        f"1 CPU per trial, on {res['machine']['cores']} cores.",
        "",
        "| concurrent trials | search s | trial-epochs | trial-epochs / min |",
        "|---|---|---|---|",
    ]
    for r in t["throughput"]:
        lines.append(
            f"| {r['concurrent']} | {r['search_seconds']:.1f} | {r['trial_epochs']} | "
            f"{r['trial_epochs_per_min']:.1f} |"
        )
    lines += [
        "",
        f"Two at a time run {t['speedup_2']:.2f}x the trial-epochs per minute of one at a time.",
        "",
        "## 4. Fixed cost of Ray and MLflow per trial",
        "",
        f"MNIST-1D trials of one epoch, one at a time; searches of 1 and "
        f"{t['overhead_trials']} trials, each {len(t['one_trial_searches'])} times "
        f"({', '.join(f'{x:.1f}' for x in t['one_trial_searches'])} s and "
        f"{', '.join(f'{x:.1f}' for x in t['many_trial_searches'])} s).",
        "",
        f"- one trial's training alone, in this process: {t['bare_trial_seconds']:.2f} s",
        f"- the same trial inside the search (the slope between the median searches): "
        f"{t['per_trial_seconds']:.2f} s",
        f"- inside the trial function, Ray + MLflow add **{t['in_trial_overhead_seconds']:.2f} s "
        "per trial** (Tune's `time_total_s` minus the bare run: the trial's MLflow run and "
        "per-epoch logging, a checkpoint and a report per epoch);",
        f"- the slope gives {t['per_trial_overhead_seconds']:+.2f} s per trial in all, "
        + (
            "less than the trial function's own time: the searches' wall time is not the sum "
            "of their trials here (the 1-trial search waits as long on Ray's start-up and "
            "shutdown as the 10-trial one), so the slope does not resolve the time around "
            "each trial and only the figure above is a measurement;"
            if t["between_trials_seconds"] < 0
            else f"of which {t['between_trials_seconds']:.2f} s around the trial function "
            "(Tune placing it on a reused actor, the driver's bookkeeping);"
        ),
        f"- **{t['fixed_search_seconds']:.1f} s per search** (starting and stopping Ray, "
        "closing the trials' runs in MLflow).",
        "",
        "## 5. GPU",
        "",
    ]
    if res.get("gpu_trials"):
        lines += [
            "| trials per GPU | gpus_per_trial | search s | trial-epochs / min |",
            "|---|---|---|---|",
        ]
        for r in res["gpu_trials"]:
            lines.append(
                f"| {r['trials_per_gpu']} | {r['gpus_per_trial']:.2f} | "
                f"{r['search_seconds']:.1f} | {r['trial_epochs_per_min']:.1f} |"
            )
    else:
        lines += [res["gpu_note"]]
    lines += [""]
    return lines


def plot(res: dict, path: Path) -> None:
    """Left: step-time ratio per model. Middle: pipeline wall time by stage. Right: throughput."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=110)

    ax = axes[0]
    names = list(res["steps"])
    for i, name in enumerate(names):
        ratios = res["steps"][name]["ratios"]
        ax.scatter([i] * len(ratios), ratios, color="C0", alpha=0.5, s=18)
        ax.hlines(res["steps"][name]["ratio"], i - 0.25, i + 0.25, color="k", lw=2)
    ax.axhline(STEP_GOAL, color="C3", ls="--", lw=1, label=f"goal {STEP_GOAL}x")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xticks(range(len(names)), [n.replace("-", "\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("range-test step / training step")
    ax.set_title("step time ratio (dots: repeats; bar: median)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1]
    runs = res["pipeline"]
    parts = ["startup_seconds", *runs[0]["stages"], "other_seconds"]
    left = [0.0] * len(runs)
    for j, part in enumerate(parts):
        widths = [r[part] if part.endswith("_seconds") else r["stages"][part] for r in runs]
        label = part.removesuffix("_seconds").replace("_", " ")
        ax.barh(range(len(runs)), widths, left=left, color=f"C{j}", label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(runs)), [f"run {i}" for i in range(len(runs))])
    ax.set_xlabel("seconds")
    ax.set_title("default pipeline, wall time by stage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")

    ax = axes[2]
    rows = res["trials"]["throughput"]
    ax.bar([str(r["concurrent"]) for r in rows], [r["trial_epochs_per_min"] for r in rows])
    if res.get("gpu_trials"):
        gpu = res["gpu_trials"]
        ax.bar(
            [f"GPU/{r['trials_per_gpu']}" for r in gpu],
            [r["trial_epochs_per_min"] for r in gpu],
            color="C2",
        )
    ax.set_xlabel("concurrent trials")
    ax.set_ylabel("trial-epochs per minute")
    ax.set_title("search throughput (MNIST-1D, FIFO)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="step-time repeats")
    parser.add_argument("--pipeline-runs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=6, help="trials per throughput search")
    parser.add_argument("--trial-epochs", type=int, default=3)
    parser.add_argument("--overhead-trials", type=int, default=10, help="trials per search")
    parser.add_argument("--search-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.pipeline_runs, args.trials, args.trial_epochs = 1, 1, 2, 1
        args.overhead_trials, args.search_repeats = 2, 1
        args.out = "/tmp/autolr-overhead-quick"
    logging.basicConfig(level=logging.WARNING)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        write_report("overhead", res, report(res), plot, Path(args.out))
        return

    import torch

    torch.set_num_threads(1)  # as a trial gets: 1 CPU; steadier timings on a shared machine
    res = provenance("overhead.py", argv)
    res["threads"], res["repeats"] = torch.get_num_threads(), args.repeats
    started = time.perf_counter()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    res["steps"] = {}
    for name, task in _tasks(args.quick).items():
        passes = 1 if "cifar" in name else 2
        for device in devices:
            key = name if device.type == "cpu" else f"{name} (cuda)"
            s = step_overhead(task, device, args.repeats, passes)
            res["steps"][key] = s
            print(f"{key}: range-test step / training step = {s['ratio']:.3f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="autolr-overhead-") as tmp:
        res["pipeline"] = default_pipeline(args.pipeline_runs, Path(tmp), args.quick)
        res["trials"] = trials("mnist1d", Path(tmp), args)
        if torch.cuda.is_available():
            res["gpu_trials"] = gpu_trials("mnist1d", Path(tmp), args)
    res["gpu_note"] = (
        "Measured above (rows marked cuda)."
        if torch.cuda.is_available()
        else "No GPU on this machine, so the GPU measurements (range-test overhead and host "
        "syncs on CUDA, 1/2/4 fractional trials per GPU) were not run; the script runs them "
        "wherever torch sees CUDA. The CUDA paths stay covered on CPU by the test suite: "
        "`tests/test_search.py` (a GPU request on a cluster without GPUs runs CPU-only "
        "trials) and `tests/test_range_test.py` (`amp=True` without CUDA is refused)."
    )
    res["seconds"] = time.perf_counter() - started
    res["load_after"] = os.getloadavg()[0]
    write_report("overhead", res, report(res), plot, Path(args.out))


if __name__ == "__main__":
    main()
