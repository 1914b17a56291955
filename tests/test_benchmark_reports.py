"""Each committed benchmark report is what its committed JSON renders to.

So a report cannot drift from its numbers: a hand edit of the markdown, or a change
to a report's code without re-rendering it, fails here. The selection report is
rendered from its stage caches instead, which takes ~25 s of change-point fits, so
it is left to `python benchmarks/selection.py --stage report`.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = BENCHMARKS / "results"


@pytest.mark.parametrize(
    "name", ["multinode", "overhead", "search_cost", "superconvergence", "wd_aware"]
)
def test_each_committed_report_is_what_its_json_renders(name: str, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their `_common`
    monkeypatch.setattr(sys, "argv", ["pytest"])
    module = importlib.import_module(name)
    common = importlib.import_module("_common")
    res = json.loads((RESULTS / f"{name}.json").read_text())
    rendered = common.report_text(name, module.report(res))
    assert rendered == (RESULTS / f"{name}.md").read_text()
