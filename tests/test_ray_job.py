"""The pipeline as a Ray job on a real (one-node) cluster, submitted as the README says.

The head is ``ray start --head --block``, a child process leading its own
process group, with a private temp dir, so it cannot meet other Ray instances
on the machine, and is stopped by that group only. Token authentication is on;
the token is a fresh one in ``RAY_AUTH_TOKEN``, which takes precedence over
``~/.ray/auth_token``, so the user's own token is neither read nor written.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from services import answers, clean_env, free_port, start_group, stop_group, tail, wait_until

from autolr.tracking import PARENT_TAG

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")  # the CLI of this environment's Ray
HEAD_START_S = 120  # about 7 s on an idle 2-core machine
JOB_S = 300  # the smoke pipeline takes 20-60 s
UPLOAD_MAX_BYTES = 5 * 2**20  # the repository without .git, .venv and what .gitignore names

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Cluster:
    dashboard: str  # http://127.0.0.1:<port>: the job server
    env: dict[str, str]  # for the ray CLI: token auth on, with this cluster's token
    temp_dir: Path

    def get(self, path: str):
        headers = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        request = urllib.request.Request(f"{self.dashboard}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Short: Ray's Unix socket paths under it must stay below ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="autolr-ray-", dir="/tmp"))
    bin_dir = str(Path(sys.executable).parent)  # the job's `python` is this one
    env = clean_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PATH=f"{bin_dir}:{clean_env()['PATH']}",
    )
    dashboard_port = free_port()
    command = [
        *(str(RAY), "start", "--head", "--block", "--disable-usage-stats"),
        *("--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp_dir)),
        *("--include-dashboard", "true", "--dashboard-host", "127.0.0.1"),
        *("--dashboard-port", str(dashboard_port), "--port", str(free_port())),
        # Their defaults are fixed ports (10001, 52365) that another Ray may hold.
        *("--ray-client-server-port", str(free_port())),
        *("--dashboard-agent-listen-port", str(free_port())),
    ]
    log = temp_dir / "head.log"
    head = start_group(command, log, cwd=temp_dir, env=env)
    running = Cluster(f"http://127.0.0.1:{dashboard_port}", env, temp_dir)
    headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    try:
        wait_until(
            lambda: answers(f"{running.dashboard}/api/version", headers), head, log, HEAD_START_S
        )
        yield running
    finally:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster: Cluster, tracking_uri: str, log: Path) -> subprocess.CompletedProcess:
    """The README's ``ray job submit``, from the repository root; waits for the job."""
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
    command = [
        *(str(RAY), "job", "submit", "--address", cluster.dashboard, "--working-dir", "."),
        *("--runtime-env-json", runtime_env, "--"),
        *("python", "-m", "autolr.pipeline", "--config", "pipelines/smoke.yaml", "--no-progress"),
    ]
    proc = start_group(command, log, cwd=ROOT, env=cluster.env)
    try:
        proc.wait(timeout=JOB_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not finish in {JOB_S} s:\n{tail(log)}")
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(command, proc.returncode, log.read_text())


def test_the_pipeline_runs_as_a_ray_job_and_logs_to_the_store_its_env_names(cluster, tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"  # absolute: the job runs in a copy of the working dir
    log = tmp_path / "submit.log"
    done = submit(cluster, uri, log)

    assert done.returncode == 0, tail(log)
    submission_id = re.search(r"Job '(raysubmit_\w+)' succeeded", done.stdout)
    assert submission_id, tail(log)
    job = cluster.get(f"/api/jobs/{submission_id[1]}")
    assert job["status"] == "SUCCEEDED"
    assert "num_cpus" not in done.stdout, tail(log)

    # The pipeline attached to this cluster (no private Ray): its trials ran here, in the job.
    actors = cluster.get("/api/v0/actors?limit=10000")["data"]["result"]["result"]
    trials = [a for a in actors if a["class_name"] == "ImplicitFunc"]
    assert len(trials) >= 2 and {a["job_id"] for a in trials} == {job["job_id"]}

    # The runs are in the store that MLFLOW_TRACKING_URI named.
    assert f"in {uri}" in done.stdout
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("autolr").experiment_id])
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert {"max_lr", "min_lr", "best_weight_decay"} <= parent.data.params.keys()
    assert len(children) == 2 == len(runs) - 1
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)  # none RUNNING

    # The upload was the code, not .git, .venv, mlruns or ray_results.
    packages = cluster.temp_dir / "session_latest/runtime_resources/working_dir_files"
    (copy,) = [p for p in packages.glob("_ray_pkg_*") if p.is_dir()]
    names = {p.name for p in copy.iterdir()}
    assert {"autolr", "pipelines", "pyproject.toml"} <= names
    assert not {".git", ".venv"} & names
    uploaded = [
        p for p in copy.rglob("*") if p.is_file() and "ray_results" not in p.relative_to(copy).parts
    ]
    assert sum(p.stat().st_size for p in uploaded) < UPLOAD_MAX_BYTES
    assert [p.name for p in (copy / "mlruns").iterdir()] == [".gitkeep"]
