"""Multi-node benchmark: the pipeline as a Ray job on a two-node cluster that loses a node.

Everything runs on this one machine, each service a child process that leads
its own process group and is stopped by that group only (also on failure):
moto's S3 server with one versioned bucket (every object version kept, so the
bytes written can be counted after Tune deleted old checkpoints), an
``mlflow server`` that keeps its artifacts in that bucket, a Ray head
(``ray start --head``) and a second node (``ray start --address``, its own
``--temp-dir``). Jobs go in through Ray's job server, as the README says.

1. Node failure. Head 1 CPU + second node 1 CPU, so that the two trials that
   run at once take one node each. Once a trial on the second node has a
   checkpoint in S3, every process of the second node gets SIGKILL (its
   process group, and Ray's workers, which lead their own, by pid). Checked
   afterwards: the job succeeded and wrote its summary; the MLflow server holds
   one run per trial, none RUNNING, none duplicated; every lost trial was
   restarted from its checkpoint (its ``result.json`` in S3: the first report
   of the retry is the epoch after the last one before the kill, from a
   process on the head).
2. Trial throughput of the same search on 1 node with 2 CPUs and on 2 nodes
   with 1 CPU each (S3 storage in both).
3. The cost of S3 checkpointing: the same search on 1 node with local storage
   and with ``s3://`` storage: wall time per trial, bytes and requests per trial.

Writes ``<out>/multinode.md``, ``.json`` and ``.png``.

    python benchmarks/multinode.py            # the committed results (~15 min on 2 cores)
    python benchmarks/multinode.py --quick    # a smoke run into /tmp (~5 min)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import ROOT, common_parser, header, mean_sd, provenance, pyplot, write_report

sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers for real services
from services import (  # noqa: E402
    answers,
    clean_env,
    free_port,
    moto_server,
    start_group,
    stop_group,
    wait_until,
)

RAY = Path(sys.executable).with_name("ray")  # the CLI of this environment's Ray
BUCKET = "autolr-multinode"
CREDENTIALS = {  # moto takes any; real ones come from the environment the same way
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_S = 180  # a head takes ~7 s, a second node ~8 s, an mlflow server ~16 s on idle 2 cores
JOB_S = 1200  # a search of these sizes takes 1-3 min on a loaded 2-core machine
TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})_")  # in Tune's trial folder names


# --- the services -------------------------------------------------------------------------


@dataclass
class Node:
    """One ``ray start --block`` process group and its own temp dir."""

    proc: subprocess.Popen
    temp_dir: Path
    log: Path

    def trial_folders(self) -> dict[str, str]:
        """trial id -> trial folder name, for every trial that ran on this node.

        Tune gives each trial a working directory under the session of the node
        its process runs on (``<temp>/session_*/artifacts/*/<experiment>/working_dirs``).
        """
        found = {}
        for folder in self.temp_dir.glob("session_*/artifacts/*/*/working_dirs/*"):
            if match := TRIAL_ID.search(folder.name):
                found[match[1]] = folder.name
        return found


@dataclass
class Cluster:
    """A Ray head and the nodes added to it, all on this machine, with token auth on.

    The token is a fresh one in ``RAY_AUTH_TOKEN``, which takes precedence over
    ``~/.ray/auth_token``: the user's own token is neither read nor written.
    """

    root: Path
    env: dict[str, str]
    gcs_address: str
    dashboard: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}

    def get(self, path: str):
        request = urllib.request.Request(f"{self.dashboard}{path}", headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def alive_nodes(self) -> int:
        nodes = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return sum(node["state"] == "ALIVE" for node in nodes)

    def add_node(self, cpus: int, **env: str) -> Node:
        """A second (third, ...) node: ``ray start --address`` with its own temp dir and ports.

        ``env``: more environment for its processes (the trials that run there).
        """
        temp_dir = self.root / f"n{len(self.nodes)}"
        temp_dir.mkdir()
        command = [
            *(str(RAY), "start", "--address", self.gcs_address, "--block"),
            *("--disable-usage-stats", "--num-cpus", str(cpus), "--num-gpus", "0"),
            *("--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1"),
            # Its default is a fixed port (52365) that the head (or another Ray) holds.
            *("--dashboard-agent-listen-port", str(free_port())),
        ]
        log = temp_dir / "node.log"
        node = Node(start_group(command, log, cwd=temp_dir, env={**self.env, **env}), temp_dir, log)
        self.nodes.append(node)
        expected = len(self.nodes)
        wait_until(lambda: self.alive_nodes() >= expected, node.proc, log, START_S)
        return node

    def kill(self, node: Node) -> dict[str, list[int]]:
        """SIGKILL every process of ``node`` at once, as a lost machine goes.

        That is its process group and, by pid, the raylet's worker processes:
        Ray starts each in a session of its own, outside the group, and an
        orphaned trial process was still alive a second after its raylet died.
        Returns the pids outside the group, and any that outlived the kill.
        """
        pids = descendants(node.proc.pid)
        outside = [pid for pid in pids if pgid(pid) not in (None, node.proc.pid)]
        os.killpg(node.proc.pid, signal.SIGKILL)
        for pid in outside:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.proc.wait()
        time.sleep(1.0)  # the kernel reaps the rest; init adopts the orphans
        left = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not zombie(pid)]
        return {"outside_the_group": outside, "left_after_kill": left}

    def stop(self) -> None:
        """Stop the nodes, then the head (the first node), each by its group."""
        for node in reversed(self.nodes):
            stop_group(node.proc)

    def submit(self, entrypoint: Sequence[str], env_vars: dict[str, str]) -> str:
        """The pipeline as a Ray job, its working dir this repository; the job's id."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard, headers=self.headers)
        return client.submit_job(
            entrypoint=" ".join(entrypoint),
            runtime_env={"working_dir": str(ROOT), "env_vars": env_vars},
        )

    def job(self, job_id: str) -> dict:
        return self.get(f"/api/jobs/{job_id}")

    def wait_job(self, job_id: str, timeout_s: float = JOB_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while (job := self.job(job_id))["status"] in ("PENDING", "RUNNING"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(1.0)
        return job

    def job_logs(self, job_id: str) -> str:
        return self.get(f"/api/jobs/{job_id}/logs")["logs"]


@contextlib.contextmanager
def ray_cluster(root: Path, head_cpus: int) -> Iterator[Cluster]:
    """A head with ``head_cpus`` CPUs and a dashboard on 127.0.0.1; stopped with its nodes."""
    root.mkdir(parents=True, exist_ok=True)
    temp_dir = root / "n0"
    temp_dir.mkdir()
    bin_dir = str(Path(sys.executable).parent)  # the job's `python` is this one
    env = clean_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PATH=f"{bin_dir}:{clean_env()['PATH']}",
    )
    dashboard_port, gcs_port = free_port(), free_port()
    command = [
        *(str(RAY), "start", "--head", "--block", "--disable-usage-stats"),
        *("--num-cpus", str(head_cpus), "--num-gpus", "0", "--temp-dir", str(temp_dir)),
        *("--node-ip-address", "127.0.0.1", "--port", str(gcs_port)),
        *("--include-dashboard", "true", "--dashboard-host", "127.0.0.1"),
        *("--dashboard-port", str(dashboard_port)),
        # Their defaults are fixed ports (10001, 52365) that another Ray may hold.
        *("--ray-client-server-port", str(free_port())),
        *("--dashboard-agent-listen-port", str(free_port())),
    ]
    log = temp_dir / "node.log"
    head = Node(start_group(command, log, cwd=temp_dir, env=env), temp_dir, log)
    cluster = Cluster(root, env, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")
    cluster.nodes.append(head)
    try:
        wait_until(
            lambda: answers(f"{cluster.dashboard}/api/version", cluster.headers),
            head.proc,
            log,
            START_S,
        )
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def s3_server(folder: Path) -> Iterator[str]:
    """moto's S3 on a free port of 127.0.0.1 with one versioned bucket; yields its URL."""
    import boto3

    with moto_server(folder, START_S) as url:
        s3 = boto3.client("s3", endpoint_url=url, **aws_keys())
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        yield url


@contextlib.contextmanager
def mlflow_server(folder: Path, s3_url: str) -> Iterator[str]:
    """The tests' ``mlflow server``, its artifacts in the bucket; yields its URL."""
    from test_mlflow_server import start_server

    proc, url = start_server(
        folder / "mlflow", f"s3://{BUCKET}/mlflow", MLFLOW_S3_ENDPOINT_URL=s3_url, **CREDENTIALS
    )
    try:
        yield url
    finally:
        stop_group(proc)


def aws_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def pgid(pid: int) -> int | None:
    with contextlib.suppress(ProcessLookupError):
        return os.getpgid(pid)
    return None


def zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


def load_1min() -> float:
    return os.getloadavg()[0]


# --- S3 accounting ------------------------------------------------------------------------


def s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, **aws_keys())


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def written(s3, prefix: str) -> dict[str, int]:
    """Objects (versions) written under ``prefix`` and their bytes, deleted ones included."""
    pages = s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=prefix)
    versions = [v for page in pages for v in page.get("Versions", [])]
    checkpoints = [v for v in versions if "/checkpoint_" in v["Key"]]
    return {
        "objects": len(versions),
        "bytes": sum(v["Size"] for v in versions),
        "checkpoint_objects": len(checkpoints),
        "checkpoint_bytes": sum(v["Size"] for v in checkpoints),
    }


REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP')


def requests_since(moto_log: Path, offset: int) -> dict[str, int]:
    """S3 requests by method in moto's log after ``offset``, the MLflow server's left out.

    ``checkpoint``: those whose key is in a trial's checkpoint folder (a listing names
    only a prefix, so it counts with the rest).
    """
    counts: dict[str, int] = {}
    with open(moto_log, "rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            if (match := REQUEST.search(line)) and "mlflow" not in match[2]:
                counts[match[1]] = counts.get(match[1], 0) + 1
                if "/checkpoint_" in match[2]:
                    counts["checkpoint"] = counts.get("checkpoint", 0) + 1
    return counts


def result_lines(s3, experiment_prefix: str, trial_folder: str) -> list[dict]:
    """The trial's ``result.json`` in S3: one dict per report."""
    key = f"{experiment_prefix}/{trial_folder}/result.json"
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


# --- one pipeline job ---------------------------------------------------------------------


@dataclass(frozen=True)
class Search:
    """The search every run makes: mnist1d, ``trials`` trials of ``epochs`` epochs (FIFO)."""

    trials: int
    epochs: int

    def argv(self, storage: str, tracking_uri: str, experiment: str, summary: Path) -> list[str]:
        return [
            *("python", "-m", "autolr.pipeline", "--task", "mnist1d", "--no-progress"),
            *("--tracking-uri", tracking_uri, "--output", str(summary)),
            *("--set", f"tracking.experiment={experiment}"),
            *("--set", "range_test.repeats=1", "--set", f"train.epochs={self.epochs}"),
            *("--set", f"search.num_samples={self.trials}"),
            *("--set", f"search.epochs={self.epochs}"),
            *("--set", f"search.storage_path={storage}"),
        ]


def job_env(s3_url: str) -> dict[str, str]:
    """The job's environment, on every node its processes run on: the S3 endpoint and keys."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_url}


def run_job(
    cluster: Cluster, search: Search, storage: str, label: str, services: dict, on_wait=None
) -> dict:
    """Submit the pipeline, wait for it (calling ``on_wait`` while it runs); what it measured."""
    folder = cluster.root / label
    folder.mkdir()
    summary_path = folder / "summary.json"
    moto_offset = services["moto_log"].stat().st_size
    started, load = time.monotonic(), load_1min()
    job_id = cluster.submit(
        search.argv(storage, services["mlflow"], f"multinode-{label}", summary_path),
        job_env(services["s3"]),
    )
    extra = on_wait(cluster, job_id) if on_wait else {}
    job = cluster.wait_job(job_id)
    seconds = time.monotonic() - started
    logs = cluster.job_logs(job_id)
    (folder / "job.log").write_text(logs)
    if job["status"] != "SUCCEEDED":
        raise RuntimeError(f"job {label} ended {job['status']}:\n{logs[-3000:]}")
    summary = json.loads(summary_path.read_text())
    search_s = summary["stage_seconds"]["search"]
    trial_epochs = sum(t["epochs_run"] for t in summary["trials"])
    return {
        "label": label,
        "nodes": len(cluster.nodes),
        "storage": storage.split("://")[0] if "://" in storage else "local",
        "load_1min_at_start": round(load, 2),
        "job_s": round(seconds, 1),
        "search_s": search_s,
        "trials": len(summary["trials"]),
        "trial_epochs": trial_epochs,
        "trials_per_min": round(60 * len(summary["trials"]) / search_s, 2),
        "trial_epochs_per_min": round(60 * trial_epochs / search_s, 1),
        "trial_s_mean": round(mean_sd([t["seconds"] for t in summary["trials"]])[0], 2),
        "s3_requests": requests_since(services["moto_log"], moto_offset),
        "summary": summary,
        "logs": logs,
        **extra,
    }


# --- 1. the node failure ------------------------------------------------------------------


def kill_when_checkpointed(node: Node, s3_url: str, prefix: str, timeout_s: float = JOB_S):
    """``on_wait``: SIGKILL ``node`` once a trial on it has a checkpoint in S3, before it ends."""
    s3 = s3_client(s3_url)

    def on_wait(cluster: Cluster, job_id: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            if cluster.job(job_id)["status"] not in ("PENDING", "RUNNING"):
                raise RuntimeError("the job ended before a trial on the second node checkpointed")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no checkpoint from the second node in {timeout_s} s")
            stored = keys(s3, prefix)
            on_node = node.trial_folders()
            checkpointed = {
                trial_id: sorted({k.split("/")[-2] for k in stored if f"/{name}/checkpoint_" in k})
                for trial_id, name in on_node.items()
            }
            if any(checkpointed.values()):
                break
            time.sleep(0.2)
        alive_before = cluster.alive_nodes()
        killed_at = time.monotonic()
        pids = cluster.kill(node)
        dead_after_s = None
        while time.monotonic() - killed_at < 120:
            if cluster.alive_nodes() < alive_before:
                dead_after_s = round(time.monotonic() - killed_at, 1)
                break
            time.sleep(0.5)
        return {
            "killed": {
                "trials_on_node": on_node,
                "checkpoints_at_kill": checkpointed,
                "processes_outside_its_group": pids["outside_the_group"],
                "processes_left_after_kill": pids["left_after_kill"],
                "node_seen_dead_after_s": dead_after_s,
            }
        }

    return on_wait


def restarts(lines: list[dict]) -> list[dict]:
    """Each restart of a trial, from its reports (``result.json``): where it resumed, and how.

    A report carries the trial's epoch and the pid of the process that trained
    it; a new pid is a new attempt, and an attempt restored from the checkpoint
    of the last reported epoch reports that epoch + 1 first.
    """
    found = []
    for before, after in zip(lines, lines[1:], strict=False):
        if after["pid"] != before["pid"]:
            found.append(
                {
                    "last_epoch_before": before["epoch"],
                    "first_epoch_after": after["epoch"],
                    "iterations_since_restore": after["iterations_since_restore"],
                    "pid_before": before["pid"],
                    "pid_after": after["pid"],
                }
            )
    return found


def check_failure(run: dict, search: Search, services: dict, head: Node) -> dict:
    """Every trial accounted for in MLflow, none RUNNING or duplicated; lost ones resumed."""
    import mlflow

    from autolr.search import TRIAL_TAG
    from autolr.tracking import PARENT_TAG

    summary = run["summary"]
    s3 = s3_client(services["s3"])
    client = mlflow.MlflowClient(services["mlflow"])
    experiment = client.get_experiment_by_name(f"multinode-{run['label']}")
    runs = client.search_runs([experiment.experiment_id])
    parent_id = summary["mlflow"]["run_id"]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent_id]
    trial_ids = sorted(r.data.tags.get(TRIAL_TAG, "") for r in children)
    expected = sorted(t["trial_id"] for t in summary["trials"])

    prefix = summary["search"]["experiment_path"].removeprefix(f"s3://{BUCKET}/")
    killed = run["killed"]
    on_head = head.trial_folders()
    lost = {}  # the trials that ran on the killed node and then on the head
    for trial_id, folder in killed["trials_on_node"].items():
        if trial_id not in on_head:
            continue  # it had ended on the second node before the kill
        lines = result_lines(s3, prefix, folder)
        lost[trial_id] = {
            "restarts": restarts(lines),
            "checkpoints_at_kill": killed["checkpoints_at_kill"].get(trial_id, []),
            "first_epoch": lines[0]["epoch"],
            "mlflow_epochs": sorted(
                m.step
                for r in children
                if r.data.tags.get(TRIAL_TAG) == trial_id
                for m in client.get_metric_history(r.info.run_id, "train_loss")
            ),
        }
    # From its checkpoint: the retry's first epoch follows the last one reported; a trial
    # killed before its first report has nothing to resume from and starts at epoch 1.
    resumed = [
        all(r["first_epoch_after"] == r["last_epoch_before"] + 1 for r in t["restarts"])
        if t["restarts"]
        else t["first_epoch"] == 1 and not t["checkpoints_at_kill"]
        for t in lost.values()
    ]
    checks = {
        "summary written, every trial in it": len(expected) == search.trials,
        "every trial ran the full budget": all(
            t["status"] == "TERMINATED" and t["epochs_run"] == search.epochs
            for t in summary["trials"]
        ),
        "one MLflow run per trial": trial_ids == expected,
        "no MLflow trial run duplicated": len(set(trial_ids)) == len(trial_ids),
        "no MLflow run RUNNING": all(r.info.status != "RUNNING" for r in runs),
        "pipeline run FINISHED": client.get_run(parent_id).info.status == "FINISHED",
        "a trial with a checkpoint was lost with the node": any(
            t["restarts"] for t in lost.values()
        ),
        "every lost trial resumed on the head from its last checkpoint": all(resumed),
        "each lost trial's epochs logged once each": all(
            t["mlflow_epochs"] == list(range(1, search.epochs + 1)) for t in lost.values()
        ),
        "no process of the killed node outlived it": not killed["processes_left_after_kill"],
    }
    return {
        "search": {"trials": search.trials, "epochs": search.epochs},
        "checks": checks,
        "passed": all(checks.values()),
        "mlflow_runs": {
            "trials": len(children),
            "statuses": sorted(r.info.status for r in children),
        },
        "lost_trials": lost,
        "tune_trial_failures_logged": sum(
            "Trial task failed for trial" in line for line in run["logs"].splitlines()
        ),
        **{k: v for k, v in run.items() if k not in ("summary", "logs", "label")},
    }


# --- 2. and 3. throughput and the cost of S3 ----------------------------------------------


def measure(root: Path, search: Search, reps: int, services: dict) -> list[dict]:
    """The same search on 1 node x 2 CPUs (local and S3 storage) and 2 nodes x 1 CPU (S3).

    Fresh clusters for each rep, and the order flips between reps, so that a
    trend in the machine's load does not favour one layout.
    """
    runs = []
    for rep in range(reps):
        for nodes in (1, 2) if rep % 2 == 0 else (2, 1):
            with ray_cluster(root / f"r{rep}n{nodes}", head_cpus=3 - nodes) as cluster:
                if nodes == 2:
                    cluster.add_node(1)
                for storage in ("local", "s3") if nodes == 1 else ("s3",):
                    label = f"r{rep}-{nodes}node-{storage}"
                    uri = (
                        f"s3://{BUCKET}/runs/{label}"
                        if storage == "s3"
                        else str(cluster.root / label / "ray_results")
                    )
                    run = run_job(cluster, search, uri, label, services)
                    run["rep"] = rep
                    if storage == "s3":
                        run["s3_written"] = written(s3_client(services["s3"]), f"runs/{label}/")
                    else:
                        run["local_kept_bytes"] = sum(
                            p.stat().st_size
                            for p in (cluster.root / label / "ray_results").rglob("*")
                            if p.is_file()
                        )
                    del run["logs"]
                    runs.append(run)
                    print(f"{label}: {run['trials_per_min']} trials/min", flush=True)
    return runs


def compact(run: dict) -> dict:
    """A run as the json keeps it: its numbers, and of its summary the stages and trials."""
    summary = run.pop("summary")
    run.pop("logs", None)
    run["stage_seconds"] = summary["stage_seconds"]
    run["trial_status"] = sorted({t["status"] for t in summary["trials"]})
    return run


# --- the report ---------------------------------------------------------------------------


def report(res: dict) -> list[str]:
    failure, runs = res["failure"], res["runs"]
    fs = failure["search"]
    lines = [
        *header("Multi-node: a Ray cluster that loses a node, throughput, and S3's cost", res),
        f"- 1-minute load average at the start: {res['load_1min_at_start']:.2f} "
        "(a 2-core machine shared with 3 other people at the time: the timings are noisy; "
        "each run's own load is in its row)",
        "",
        "Everything ran on this one machine: moto's S3 server (a versioned bucket, so that "
        "deleted checkpoints still count as written), an `mlflow server` with its artifacts "
        "in that bucket, a Ray head and a second Ray node (`ray start --address`, its own "
        "`--temp-dir`), each a process group of its own. The pipeline went in as a Ray job "
        "(the README's recipe) on MNIST-1D.",
        "",
        "## 1. A node killed mid-search",
        "",
        f"Head 1 CPU + second node 1 CPU; {fs['trials']} trials of {fs['epochs']} epochs, "
        "1 CPU each, checkpoints in S3, `max_failures` 2 (the default). When a trial on the "
        "second node had a checkpoint in S3, every process of the second node got SIGKILL. "
        f"The node was seen dead by the head {failure['killed']['node_seen_dead_after_s']} s "
        f"later; the job took {failure['job_s']:.0f} s in all.",
        "",
        "| check | result |",
        "|---|---|",
        *(f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in failure["checks"].items()),
        "",
        "| lost trial | checkpoints in S3 at the kill "
        "| restarts (last epoch before -> first after) | epochs logged in MLflow |",
        "|---|---|---|---|",
    ]
    for trial_id, lost in failure["lost_trials"].items():
        at_kill = failure["killed"]["checkpoints_at_kill"].get(trial_id, [])
        moves = ", ".join(
            f"{r['last_epoch_before']} -> {r['first_epoch_after']}" for r in lost["restarts"]
        )
        lines.append(
            f"| {trial_id} | {len(at_kill)} | {moves or 'none (it had ended)'} "
            f"| {','.join(map(str, lost['mlflow_epochs']))} |"
        )
    lines += [
        "",
        f"Tune logged {failure['tune_trial_failures_logged']} trial failure(s) "
        "(`Trial task failed for trial ...`) in the job's log. Ray's worker processes lead "
        "sessions of their own, outside the node's process group "
        f"({len(failure['killed']['processes_outside_its_group'])} of them here): they got "
        "SIGKILL by pid with the group, as a lost machine loses them (in a trial run that "
        "killed the group alone, the trial's process was still alive a second later).",
        "",
        "## 2. Trial throughput: 1 node x 2 CPUs against 2 nodes x 1 CPU",
        "",
        f"The same search each time: {res['search']['trials']} trials of "
        f"{res['search']['epochs']} epochs (FIFO, 1 CPU per trial, 2 at a time), checkpoints "
        "in S3; a fresh cluster per run, the order of the layouts flipped between reps. "
        "trials/min is over the search stage (Ray attach, the trials, Tune's bookkeeping).",
        "",
        "| rep | layout | load at start | search s | trials / min | trial-epochs / min "
        "| mean trial s |",
        "|---|---|---|---|---|---|---|",
    ]
    s3_runs = [r for r in runs if r["storage"] == "s3"]
    for r in s3_runs:
        layout = "1 node x 2 CPUs" if r["nodes"] == 1 else "2 nodes x 1 CPU"
        lines.append(
            f"| {r['rep']} | {layout} | {r['load_1min_at_start']:.2f} | {r['search_s']:.1f} "
            f"| {r['trials_per_min']:.1f} | {r['trial_epochs_per_min']:.0f} "
            f"| {r['trial_s_mean']:.1f} |"
        )
    one = [r["trials_per_min"] for r in s3_runs if r["nodes"] == 1]
    two = [r["trials_per_min"] for r in s3_runs if r["nodes"] == 2]
    lines += [
        "",
        f"Mean: {mean_sd(one)[0]:.1f} trials/min on 1 node, {mean_sd(two)[0]:.1f} on 2 nodes "
        f"({mean_sd(two)[0] / mean_sd(one)[0]:.2f}x). Both layouts have the same 2 cores "
        "of one machine, so this measures what the second raylet and Ray's cross-node "
        "scheduling cost, not what a second machine gains.",
        "",
        "## 3. The cost of S3 checkpointing",
        "",
        "The same search on 1 node x 2 CPUs with `search.storage_path` a local folder and "
        "an `s3://` URI. Each trial checkpoints every epoch (Tune keeps the last 2). "
        "Written: every object version under the run's prefix (deleted ones included), in "
        "brackets those in the trials' checkpoint folders, the rest being Tune's experiment "
        "state and the trials' result files, which it syncs again and again; requests: "
        "moto's log, the MLflow server's artifact traffic left out.",
        "",
        "| rep | storage | load at start | search s | search s / trial | mean trial s "
        "| objects written / trial | KiB written / trial | S3 requests / trial |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    one_node = [r for r in runs if r["nodes"] == 1]
    for r in one_node:
        n = r["trials"]
        if r["storage"] == "s3":
            w, asked = r["s3_written"], dict(r["s3_requests"])
            on_checkpoints = asked.pop("checkpoint", None)
            objects, kib = f"{w['objects'] / n:.1f}", f"{w['bytes'] / n / 1024:.0f}"
            if "checkpoint_objects" in w:  # counted since the second committed run
                objects += f" ({w['checkpoint_objects'] / n:.1f})"
                kib += f" ({w['checkpoint_bytes'] / n / 1024:.0f})"
            reqs = ", ".join(f"{k} {v / n:.0f}" for k, v in sorted(asked.items()))
            if on_checkpoints is not None:
                reqs += f" ({on_checkpoints / n:.0f} on checkpoints)"
        else:
            objects = "-"
            kib = f"({r['local_kept_bytes'] / n / 1024:.0f} kept)"
            reqs = "-"
        lines.append(
            f"| {r['rep']} | {r['storage']} | {r['load_1min_at_start']:.2f} | {r['search_s']:.1f} "
            f"| {r['search_s'] / n:.2f} | {r['trial_s_mean']:.2f} | {objects} | {kib} | {reqs} |"
        )
    local = [r["search_s"] / r["trials"] for r in one_node if r["storage"] == "local"]
    s3 = [r["search_s"] / r["trials"] for r in one_node if r["storage"] == "s3"]
    lines += [
        "",
        f"Mean search seconds per trial: {mean_sd(local)[0]:.2f} local, {mean_sd(s3)[0]:.2f} "
        f"on S3 ({mean_sd(s3)[0] - mean_sd(local)[0]:+.2f} s per trial, "
        f"{res['search']['epochs']} checkpoints each). moto answers on loopback; a real "
        "bucket adds its round trips to every request above.",
        "",
    ]
    return lines


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    runs = res["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for nodes, x in ((1, 0), (2, 1)):
        ys = [r["trials_per_min"] for r in runs if r["storage"] == "s3" and r["nodes"] == nodes]
        left.scatter([x] * len(ys), ys, color="C0")
    left.set_xticks([0, 1], ["1 node x 2 CPUs", "2 nodes x 1 CPU"])
    left.set_ylabel("trials / min (search stage)")
    left.set_xlim(-0.5, 1.5)
    left.set_ylim(bottom=0)
    for storage, x in (("local", 0), ("s3", 1)):
        ys = [
            r["search_s"] / r["trials"] for r in runs if r["nodes"] == 1 and r["storage"] == storage
        ]
        right.scatter([x] * len(ys), ys, color="C1")
    right.set_xticks([0, 1], ["local folder", "s3:// (moto)"])
    right.set_ylabel("search s / trial (1 node)")
    right.set_xlim(-0.5, 1.5)
    right.set_ylim(bottom=0)
    fig.suptitle("each point one run; 2 shared cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = common_parser(__doc__).parse_args(argv)
    out = Path("/tmp/autolr-multinode-quick" if args.quick else args.out)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        write_report("multinode", res, report(res), plot, out)
        return 0
    failure_search = Search(trials=4, epochs=6) if args.quick else Search(trials=6, epochs=10)
    bench_search = Search(trials=4, epochs=3) if args.quick else Search(trials=8, epochs=5)
    reps = 1 if args.quick else 2

    res = provenance("multinode.py", argv)
    res["load_1min_at_start"] = load_1min()
    res["search"] = {"trials": bench_search.trials, "epochs": bench_search.epochs}
    started = time.monotonic()
    # Short: Ray's Unix socket paths under it must stay below ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="autolr-mn-", dir="/tmp"))
    ok = False
    try:
        with s3_server(root) as s3_url, mlflow_server(root, s3_url) as mlflow_url:
            services = {"s3": s3_url, "mlflow": mlflow_url, "moto_log": root / "moto.log"}
            with ray_cluster(root / "failure", head_cpus=1) as cluster:
                node = cluster.add_node(1)
                on_wait = kill_when_checkpointed(node, s3_url, "failure/")
                run = run_job(
                    cluster, failure_search, f"s3://{BUCKET}/failure", "failure", services, on_wait
                )
                res["failure"] = check_failure(run, failure_search, services, cluster.nodes[0])
                res["failure"]["summary_stage_seconds"] = run["summary"]["stage_seconds"]
            print(json.dumps(res["failure"]["checks"], indent=1), flush=True)
            res["runs"] = [compact(r) for r in measure(root, bench_search, reps, services)]
        ok = True
    finally:
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root} for its logs", file=sys.stderr)
    res["seconds"] = time.monotonic() - started
    write_report("multinode", res, report(res), plot, out)
    return 0 if res["failure"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
