"""What `pip install autolr` without extras gives: the core never imports the pipeline's parts."""

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the core must run without: the `pipeline` extra and the integrations' frameworks.
EXTRAS = ("mlflow", "ray", "mnist1d", "sklearn", "lightning", "transformers")

# Runs in a fresh interpreter: a meta-path finder makes importing any of EXTRAS fail, as
# in a core install, and records each attempt, so that a caught ImportError still shows.
CORE_SESSION = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys

    BLOCKED = set(sys.argv[1].split(","))
    tried = []

    class Blocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # Fails at import, not at lookup: torch probes optional modules with find_spec.
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                return importlib.util.spec_from_loader(name, self)
            return None

        def create_module(self, spec):
            tried.append(spec.name)
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Blocker())

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import autolr
    import autolr.integrations
    import autolr.tasks
    from autolr import range_test, select_lr
    from autolr.schedules import one_cycle

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    curve = range_test(
        model, optimizer, torch.nn.CrossEntropyLoss(), loader,
        start_lr=1e-4, end_lr=10.0, num_iter=60, progress=False,
    )
    choice = select_lr(curve)
    scheduler = one_cycle(optimizer, max_lr=choice.max_lr, min_lr=choice.min_lr, total_steps=10)
    ax = curve.plot(choice)
    tried_at_core = list(tried)

    missing = {}  # what each part without its extra says
    for module in ("autolr.integrations.lightning", "autolr.tracking:Tracker", "autolr.search"):
        name, _, attr = module.partition(":")
        try:
            imported = __import__(name, fromlist=["_"])
            if attr:
                getattr(imported, attr)(sys.argv[2], "x")
        except ImportError as exc:
            missing[module] = str(exc)
    for task in ("mnist1d", "digits"):
        try:
            autolr.tasks.build_task(autolr.tasks.resolve(task))
        except autolr.TaskError as exc:
            missing[task] = str(exc)
    print(json.dumps({
        "max_lr": choice.max_lr, "min_lr": choice.min_lr, "axes": type(ax).__name__,
        "tried_before_extras": tried_at_core, "missing": missing,
        "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED),
    }))
    """
)


def test_the_core_runs_range_test_select_lr_schedules_and_plot_without_any_extra(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-c", CORE_SESSION, ",".join(EXTRAS), store],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < report["min_lr"] < report["max_lr"]
    assert report["axes"] == "Axes"
    # the core never even tried to import an extra, and none got loaded
    assert report["tried_before_extras"] == [] and report["loaded"] == []
    # each part that needs an extra names the one to install
    missing = report["missing"]
    assert 'pip install "autolr[lightning]"' in missing["autolr.integrations.lightning"]
    assert 'pip install "autolr[pipeline]"' in missing["autolr.tracking:Tracker"]
    assert 'pip install "autolr[pipeline]"' in missing["autolr.search"]
    assert "with mnist1d, which is not installed" in missing["mnist1d"]
    assert "with scikit-learn, which is not installed" in missing["digits"]
    assert all('pip install "autolr[pipeline]"' in missing[task] for task in ("mnist1d", "digits"))


def test_the_pipeline_extra_brings_mlflow_ray_and_the_tasks_data_and_search_is_its_alias():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(extras["dependencies"])
    assert not any(name in core for name in ("mlflow", "ray", "mnist1d", "scikit-learn"))
    pipeline = extras["optional-dependencies"]["pipeline"]
    names = {dep.split("[")[0].split(">")[0].split("=")[0] for dep in pipeline}
    assert names == {"mlflow", "ray", "mnist1d", "scikit-learn"}
    (ray,) = [dep for dep in pipeline if dep.startswith("ray")]
    assert "==" not in ray and "<3" in ray  # a compatible range, not a pin
    assert extras["optional-dependencies"]["search"] == ["autolr[pipeline]"]
