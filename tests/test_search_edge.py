"""The LR scales' step past the edge (autolr.search.edge), on a real local Ray.

The trials are a plain function that reports a score of its ``lr_scale``, so
Tune's scheduling and the generator's draws are real and each trial takes
about a second, with no model trained.
"""

from __future__ import annotations

import math
import sys
import time
from types import SimpleNamespace

import pytest
import ray.cloudpickle
from ray import tune
from ray.tune.search import BasicVariantGenerator

from autolr.config import SearchConfig
from autolr.confirm import beyond_edge, edge_step
from autolr.search.driver import _past_edge
from autolr.search.edge import ExtendAtEdge
from autolr.search.space import extends_at_edge, param_space, scale_points

# Ray workers cannot import this file (tests/ is not on their path): ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SCALES = (0.5, 1.0, 2.0)


def scored(config: dict) -> None:
    """A trial whose score is ``shape`` of its scale; the highest scale runs longest, so a
    trial not held back would start before it ends."""
    started = time.time()
    time.sleep(1.5 if config["lr_scale"] == 2.0 else 0.2)
    scale, shape = config["lr_scale"], config["shape"]
    score = {"rising": scale, "falling": -scale, "peaked": -(math.log(scale) ** 2)}[shape]
    tune.report({"val_accuracy": score, "epoch": 1, "started": started, "ended": time.time()})


def run(generator_type, shape: str, tmp_path) -> list[dict]:
    cfg = SearchConfig(num_samples=4, lr_scales=SCALES)
    options = {"points_to_evaluate": scale_points(cfg), "random_state": 0, "max_concurrent": 2}
    if generator_type is ExtendAtEdge:
        options |= {
            "scales": list(SCALES),
            "metric": "val_accuracy",
            "higher_is_better": True,
            "max_t": 1,
        }
    grid = tune.Tuner(
        scored,
        param_space={**param_space(cfg, bn_searched=True), "shape": shape},
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", search_alg=generator_type(**options)
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    ).fit()
    rows = [{**r.config, **r.metrics} for r in grid]
    return sorted(rows, key=lambda row: row["trial_id"])


def test_beyond_edge_steps_by_the_scales_own_spacing_and_only_at_an_edge():
    scales = [0.2, 0.3, 0.45, 0.67, 1.0, 1.5, 2.2, 3.3, 5.0]
    assert beyond_edge(scales, 5.0) == 7.6  # 5 * 5 / 3.3
    assert beyond_edge(scales, 0.2) == 0.13  # 0.2 * 0.2 / 0.3
    assert beyond_edge(scales, 1.0) is None


def test_the_step_follows_the_best_full_budget_trial_and_ignores_failed_ones():
    nan = math.nan
    # (scale, metric, ran the full budget)
    assert (
        edge_step(list(SCALES), [(0.5, 0.7, True), (1.0, 0.8, True), (2.0, 0.9, True)], True) == 4.0
    )
    assert (
        edge_step(list(SCALES), [(0.5, 0.7, True), (1.0, 0.8, True), (2.0, 0.9, True)], False)
        == 0.25
    )
    # stopped early (ASHA), the best is not trusted; failed (NaN), it does not count
    assert (
        edge_step(list(SCALES), [(0.5, 0.7, True), (1.0, 0.8, True), (2.0, 0.9, False)], True)
        is None
    )
    assert (
        edge_step(list(SCALES), [(0.5, 0.7, True), (1.0, 0.8, True), (2.0, nan, True)], True)
        is None
    )
    assert (
        edge_step(list(SCALES), [(0.5, 0.9, False), (1.0, nan, True)], True) == 0.25
    )  # all stopped
    assert edge_step(list(SCALES), [(0.5, nan, True), (2.0, nan, True)], True) is None


def test_past_edge_notes_only_a_scale_outside_the_list_and_reads_configs_without_one():
    grid = [SimpleNamespace(config=c) for c in ({"lr_scale": 1.0}, {"lr_scale": 7.6}, None)]
    assert _past_edge(grid, SearchConfig()) == [
        "the best of the first 9 trials trained at an edge LR scale, so one trial tried "
        "lr_scale=7.6, past it"
    ]
    plain = [SimpleNamespace(config={"weight_decay": 0.0}), SimpleNamespace(config=None)]
    assert _past_edge(plain, SearchConfig(lr_scales=None)) == []  # no LR dimension at all
    assert _past_edge(grid, SearchConfig(extend_at_edge=False)) == []


def test_the_edge_trial_is_asked_for_only_where_a_trial_is_left_after_each_scale():
    assert extends_at_edge(SearchConfig())  # 10 trials over 9 scales
    assert not extends_at_edge(SearchConfig(num_samples=9))
    assert not extends_at_edge(SearchConfig(extend_at_edge=False))
    assert not extends_at_edge(SearchConfig(lr_scales=None))
    assert extends_at_edge(SearchConfig(lr_scales=SCALES, num_samples=4))
    assert not extends_at_edge(SearchConfig(lr_scales=SCALES, num_samples=4, grid=True))


@pytest.mark.slow
def test_the_trial_after_each_scale_waits_for_them_and_steps_past_the_best_edge(
    ray_cluster, tmp_path
):
    plain = run(BasicVariantGenerator, "rising", tmp_path / "plain")
    rising = run(ExtendAtEdge, "rising", tmp_path / "rising")
    falling = run(ExtendAtEdge, "falling", tmp_path / "falling")
    peaked = run(ExtendAtEdge, "peaked", tmp_path / "peaked")

    assert [row["lr_scale"] for row in plain] == [1.0, 0.5, 2.0, 1.0]
    assert [row["lr_scale"] for row in rising] == [1.0, 0.5, 2.0, 4.0]  # 2 * 2 / 1
    assert [row["lr_scale"] for row in falling] == [1.0, 0.5, 2.0, 0.25]  # 0.5 * 0.5 / 1
    assert [row["lr_scale"] for row in peaked] == [1.0, 0.5, 2.0, 1.0]  # best inside: as before
    # every trial keeps the draws a plain generator gives it, the moved one included
    for rows in (rising, falling, peaked):
        assert [(r["weight_decay"], r["bn_momentum"]) for r in rows] == [
            (r["weight_decay"], r["bn_momentum"]) for r in plain
        ]
    # the 4th trial started only once the first 3 had ended (the 3rd runs 1.5 s, so a
    # trial that did not wait would start in a slot the 1st or 2nd freed, before it ended)
    for rows in (rising, falling, peaked):
        assert rows[3]["started"] >= max(r["ended"] for r in rows[:3])
