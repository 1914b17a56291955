import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is in the dev extra")
def test_dockerfile_passes_hadolint():
    proc = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_the_package_with_its_ray_extra_and_copies_its_code():
    text = (ROOT / "Dockerfile").read_text()
    assert 'pip install ".[search]"' in text
    for folder in ("autolr", "pipelines"):
        assert f"COPY {folder} ./{folder}" in text


def test_the_pipeline_extra_brings_ray_with_its_job_server():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("ray[default") for dep in extras["pipeline"])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the dev extra")
def test_the_code_passes_ruff():
    proc = subprocess.run(
        ["ruff", "check", "autolr", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
