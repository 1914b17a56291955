"""Helpers for the integration tests that run real services (an MLflow server, a Ray head).

Every service is a child process that leads its own process group
(``start_new_session=True``), so a test stops exactly what it started and
nothing else on a machine that other people share.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_group(
    command: Sequence[str], log: Path, *, cwd: Path, env: Mapping[str, str]
) -> subprocess.Popen:
    """``command`` as the leader of a new process group, its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Ask the group's leader to stop (SIGTERM), then SIGKILL whatever is left of its group.

    Only the leader gets SIGTERM: ``ray start --block`` drains and stops its own
    processes in order, and hangs when they all get the signal at once.
    """
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # no process of the group is left
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout_s: float
) -> None:
    """Poll ``ready`` until it holds; fail with the log's tail if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{proc.args[:3]} not ready after {timeout_s} s:\n{tail(log)}")
        time.sleep(0.5)


def answers(url: str, headers: Mapping[str, str] | None = None) -> bool:
    """Whether ``url`` answers 200 within 2 s."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:  # refused, reset, timed out, or an HTTP error status
        return False


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else f"({log} is missing)"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without MLflow or Ray settings that would point a child elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    return {**env, **extra}


@contextlib.contextmanager
def moto_server(folder: Path, start_s: float) -> Iterator[str]:
    """moto's S3 API (``moto[server]``) on a free port of 127.0.0.1; yields its URL."""
    port, log = free_port(), folder / "moto.log"
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = start_group(command, log, cwd=folder, env=clean_env())
    try:
        wait_until(lambda: answers(f"{url}/moto-api/"), proc, log, start_s)
        yield url
    finally:
        stop_group(proc)
