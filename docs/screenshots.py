"""Screenshots of the MLflow UI for the README, in one command.

    python docs/screenshots.py            # writes docs/img/mlflow-*.png

Runs the smoke pipeline (digits, 4 trials) into a fresh sqlite store in a
temporary folder, serves it with ``mlflow server`` on 127.0.0.1, drives a
headless Chromium through the pages and stops the server by its process
group. Needs playwright (``pip install playwright``) and a Chromium: the
system's (``apt-get install chromium``) or playwright's own
(``playwright install chromium``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_S = 120  # `mlflow server` took ~16 s to answer on 2 busy cores
# The MLflow 3 UI opens an experiment in its GenAI view; this parameter opens the
# "Model training" one, where the runs are.
TRAINING_VIEW = "workflowType=machine_learning"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the PNGs go")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="autolr-shots-") as tmp:
        tmp = Path(tmp)
        summary = run_pipeline(tmp)
        port = free_port()
        server = start_server(tmp, port)
        try:
            shoot(f"http://127.0.0.1:{port}", summary, out)
        finally:
            stop(server)
    for png in sorted(out.glob("mlflow-*.png")):
        print(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)


def run_pipeline(tmp: Path) -> dict:
    """The smoke config with 4 trials, into ``tmp``; its summary."""
    command = [
        *(sys.executable, "-m", "autolr.pipeline", "--config", str(ROOT / "pipelines/smoke.yaml")),
        *("--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--no-progress"),
        *("--set", f"search.storage_path={tmp / 'ray'}", "--set", "search.num_samples=4"),
        *("--output", str(tmp / "summary.json")),
    ]
    # a sample every 2 s instead of 10 s: a system-metrics chart with points on a ~1 min run
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"}
    subprocess.run(command, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((tmp / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(tmp: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on the store, leading its own process group."""
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 (the server's lifetime)
    server = subprocess.Popen(
        command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + SERVER_START_S
    while not answers(f"http://127.0.0.1:{port}/health"):
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            sys.exit(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    return server


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's group (gunicorn and its worker), SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def shoot(url: str, summary: dict, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    parent = summary["mlflow"]["run_id"]
    best = next(t for t in summary["trials"] if t["trial_id"] == summary["best"]["trial_id"])
    runs = f"{url}/#/experiments/1/runs"  # the fresh store's first experiment: autolr
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"),  # None: playwright's own
            args=["--no-sandbox"],  # as root
        )
        page = browser.new_page(viewport={"width": 1600, "height": 640})

        def show(path: str, ready: str) -> None:
            page.goto(f"{runs}{path}?{TRAINING_VIEW}")
            page.wait_for_selector(ready, timeout=60_000)
            page.wait_for_timeout(1000)  # the assistant's panel opens on some pages
            for close in page.get_by_label("Close").all():
                if close.is_visible():
                    close.click()
            page.wait_for_timeout(2000)  # charts animate in

        # the pipeline's run with its trials nested under it, and the columns that matter
        show("", "text=autolr-digits")
        page.get_by_text("Columns", exact=True).click()
        for column in (
            *("Dataset", "Source", "Models"),  # shown: hide them
            *("val_accuracy", "test_accuracy", "weight_decay", "max_lr", "lr_scale"),
        ):
            page.get_by_placeholder("Search columns").fill(column)  # the list is virtual
            title = page.locator(
                ".du-bois-light-tree-title", has_text=re.compile(f"^{re.escape(column)}$")
            )
            node = page.locator(".du-bois-light-tree-treenode", has=title)
            node.locator(".du-bois-light-tree-checkbox").first.click()
        page.keyboard.press("Escape")
        page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
        page.wait_for_selector(f"text={best['trial_id']}", timeout=20_000)
        page.screenshot(path=out / "mlflow-runs.png")

        page.set_viewport_size({"width": 1600, "height": 1000})
        # the best trial's page: its params, its metrics, its parent
        show(f"/{best['run_id']}", "text=weight_decay")
        page.screenshot(path=out / "mlflow-trial.png")
        # the parent's charts: the range test's curve as metric series, the final run's epochs
        show(f"/{parent}/model-metrics", "text=range_test_loss")
        page.screenshot(path=out / "mlflow-metrics.png")
        # the range test's plot with the change points and the picks, an artifact
        show(f"/{parent}/artifacts/range_test/range_test.png", "img[src^='blob:']")
        page.screenshot(path=out / "mlflow-range-test.png")
        # MLflow's system metrics of the machine while the pipeline ran
        show(f"/{parent}/system-metrics", "text=cpu_utilization_percentage")
        page.screenshot(path=out / "mlflow-system-metrics.png")
        browser.close()


if __name__ == "__main__":
    main()
