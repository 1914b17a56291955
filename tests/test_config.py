from pathlib import Path

import pytest

from autolr.config import Config, SearchConfig, load_config
from autolr.errors import ConfigError


def test_no_file_and_no_overrides_gives_the_defaults():
    assert load_config() == Config()


def test_yaml_file_and_set_overrides_are_merged_with_overrides_winning(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: digits\ntrain:\n  epochs: 3\n  weight_decay: 1e-4\n")
    cfg = load_config(path, ["train.epochs=7", "task_params={seed: 3}"])
    assert cfg.task == "digits"
    assert cfg.train.epochs == 7
    assert cfg.train.weight_decay == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.task_params == {"seed": 3}


def test_integers_are_accepted_where_floats_are_expected():
    assert load_config(None, ["range_test.end_lr=1"]).range_test.end_lr == 1.0


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epoch=5", "unknown config key 'train.epoch'"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("train.epochs=many", "train.epochs must be an int or null, but got 'many'"),
        ("train.epochs=0", "epochs >= 1"),
        ("range_test.start_lr=20", "0 < start_lr < end_lr"),
        ("range_test.mode=log", "mode 'exp' or 'linear'"),
        ("train.bn_momentum=2", "bn_momentum in (0, 1]"),
        ("search.weight_decay_min=0", "0 < weight_decay_min < weight_decay_max"),
        ("train=3", "train must be a mapping"),
        ("search.scheduler=hyperband", "search: expected scheduler in ('asha', 'fifo')"),
        ("search.weight_decay_values=[1e-3, -1e-4]", "weight_decay_values a non-empty list of"),
        ("search.weight_decay_values=[.inf]", "list of finite values >= 0, or null"),
        ("search.weight_decay_values=[]", "but got []"),
        ("search.weight_decay_values=1e-3", "must be a list of floats or null, but got '1e-3'"),
        ("search.weight_decay_values=[1e-3, x]", "must be a list of floats or null"),
        ("search.bn_momentum_values=[0, 0.1]", "bn_momentum_values a non-empty list of values in"),
        ("search.bn_momentum_values=[0.1, 1.5]", "values in (0, 1], or null, but got [0.1, 1.5]"),
        ("search.lr_scales=[0.3, 0]", "lr_scales a non-empty list of finite factors > 0"),
        ("search.lr_scales=[1, .inf]", "finite factors > 0, or null, but got [1.0, inf]"),
        ("search.lr_scales=[.nan]", "lr_scales a non-empty list of finite factors > 0"),
        ("search.lr_scales=[]", "lr_scales a non-empty list of finite factors > 0"),
        ("search.lr_scales=3", "lr_scales must be a list of floats or null, but got 3"),
        ("no_equals_sign", "--set takes key=value"),
    ],
)
def test_bad_keys_and_values_name_what_was_expected_and_what_came(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert words in str(info.value)


def test_search_value_lists_load_from_yaml_and_set_as_tuples_of_floats(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "search:\n"
        "  weight_decay_values: [1e-3, 1e-4, 1e-5, 1e-6, 0]\n"  # YAML 1.1: '1e-4' is a string
        "  bn_momentum_values: [0.01, 0.05, 0.1, 0.3]\n"
        "  grid: true\n"
        "  scheduler: fifo\n"
    )
    cfg = load_config(path).search
    assert cfg.weight_decay_values == (1e-3, 1e-4, 1e-5, 1e-6, 0.0)
    assert all(type(v) is float for v in cfg.weight_decay_values)
    assert cfg.bn_momentum_values == (0.01, 0.05, 0.1, 0.3)
    assert (cfg.grid, cfg.scheduler) == (True, "fifo")

    cfg = load_config(path, ["search.weight_decay_values=[1e-4, 0]", "search.grid=false"]).search
    assert cfg.weight_decay_values == (1e-4, 0.0) and not cfg.grid
    assert load_config(None, ["search.bn_momentum_values=[1]"]).search.bn_momentum_values == (1.0,)
    assert load_config(path, ["search.bn_momentum_values=null"]).search.bn_momentum_values is None


def test_lr_scales_default_to_the_named_constant_and_a_grid_needs_a_list_of_2_plus():
    from autolr.config import LR_SCALES

    assert SearchConfig().lr_scales == LR_SCALES
    assert load_config(None, ["search.lr_scales=[1, 3]"]).search.lr_scales == (1.0, 3.0)
    assert load_config(None, ["search.lr_scales=null"]).search.lr_scales is None
    assert load_config(None, ["search.grid=true"]).search.grid  # a grid over the scales
    for scales in ("null", "[2]"):
        with pytest.raises(ConfigError) as info:
            load_config(None, ["search.grid=true", f"search.lr_scales={scales}"])
        assert str(info.value) == (
            "search: expected weight_decay_values, bn_momentum_values or 2+ lr_scales "
            "with grid: true, but got none of them."
        )


def test_search_config_takes_lists_from_python_and_keeps_it_hashable():
    cfg = SearchConfig(weight_decay_values=[0, 1e-3], bn_momentum_values=[0.1], grid=True)
    assert cfg.weight_decay_values == (0.0, 1e-3) and cfg.bn_momentum_values == (0.1,)
    assert hash(cfg) == hash(
        SearchConfig(weight_decay_values=(0.0, 1e-3), bn_momentum_values=(0.1,), grid=True)
    )
    with pytest.raises(ConfigError, match="weight_decay_values a non-empty list"):
        SearchConfig(weight_decay_values=["1e-3"])


def test_missing_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_every_committed_pipeline_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "pipelines").glob("*.yaml"))
    assert configs, "pipelines/ holds no YAML config"
    for path in configs:
        load_config(path)


SMOKE = Path(__file__).resolve().parent.parent / "pipelines" / "smoke.yaml"


def narrow_builder(width: int = 4):
    """A user's builder that takes no epochs; it stops the CLI once built."""
    raise RuntimeError(f"built with width={width}")


def test_a_configs_task_params_belong_to_its_task_and_another_task_starts_from_none():
    assert load_config(SMOKE).task_params == {"epochs": 2}  # digits' own
    assert load_config(SMOKE, ["task=digits"]).task_params == {"epochs": 2}  # the same task
    for overrides in (
        ["task=mytasks:build", "task_params.width=8"],
        ["task_params.width=8", "task=mytasks:build"],  # the order the CLI appends --task in
    ):
        assert load_config(SMOKE, overrides).task_params == {"width": 8}
    assert load_config(SMOKE, ["task=mytasks:build"]).task_params == {}


def test_the_readme_example_of_a_config_with_another_task_reaches_the_users_builder(
    tmp_path, monkeypatch, capsys
):
    from autolr.pipeline import main

    monkeypatch.chdir(tmp_path)
    argv = ["--config", str(SMOKE), "--task", "tests.test_config:narrow_builder"]
    code = main([*argv, "--set", "task_params.width=3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "rejected params" not in err  # smoke.yaml's epochs stay with digits
    assert "RuntimeError: built with width=3" in err
