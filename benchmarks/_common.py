"""What every benchmark report states: the command, the machine, the date, the code."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def code_version() -> str:
    """The commit the package ran at, and whether its code had uncommitted changes."""

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "autolr", "pipelines")
    return commit + (" + uncommitted changes in autolr/ or pipelines/" if dirty else "")


def provenance(script: str, argv: list[str] | None) -> dict:
    """Command, date, code and machine, for the report's header."""
    import torch

    argv = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join([f"python benchmarks/{script}", *argv]),
        "date": str(date.today()),
        "code": code_version(),
        "machine": {
            "platform": f"{platform.system()} {platform.machine()}",
            "processor": _cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }


def header(title: str, res: dict) -> list[str]:
    """The markdown lines that open a report."""
    m = res["machine"]
    gpu = m.get("cuda") or "no GPU"
    return [
        f"# {title}",
        "",
        f"- command: `{res['command']}`",
        f"- machine: {m['platform']}, {m.get('processor') or 'CPU'}, {m['cores']} cores, "
        f"{gpu}, torch {m['torch']}; date {res['date']}",
        f"- code: {res['code']}",
        f"- wall time of the benchmark: {res['seconds'] / 60:.1f} min",
        *(f"- note: {note}" for note in res.get("notes", [])),
    ]


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def common_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: where to write, a smoke run, a rewrite from json."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="tiny smoke run into /tmp")
    p.add_argument("--from-json", help="rewrite the report from a saved json; runs nothing")
    return p


def report_text(name: str, lines: list[str]) -> str:
    """The markdown of a report: its ``lines``, then its plot."""
    return "\n".join([*lines, f"![{name}]({name}.png)", ""])


def write_report(name: str, res: dict, lines: list[str], plot, out_dir: Path) -> None:
    """``<name>.json`` (every number), ``<name>.md`` (``lines`` and the plot), ``<name>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(report_text(name, lines))
    plot(res, out_dir / f"{name}.png")
    print((out_dir / f"{name}.md").read_text())
