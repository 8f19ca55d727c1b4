"""SearchConfig and CLI flag parsing: defaults, types, checks, unknown keys."""

import pytest

from widthsearch.app.cli import _search_settings, build_parser
from widthsearch.app.config import SearchConfig, load_config
from widthsearch.errors import ConfigError


def test_defaults_are_the_demo():
    cfg = SearchConfig()
    assert (cfg.model, cfg.data, cfg.searcher, cfg.budget) == ("small_cnn", "digits", "optuna", 0.5)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: cifar_resnet20\nbudget: 0.3\nnum_samples: 5\nsearcher_options: {startup_trials: 3}\n")
    cfg = load_config(path, {"num_samples": 7, "seed": None})
    assert (cfg.model, cfg.budget, cfg.num_samples, cfg.searcher_options) == ("cifar_resnet20", 0.3, 7,
                                                                               {"startup_trials": 3})


@pytest.mark.parametrize("values, text", [
    ({"budgett": 0.5}, "unknown config key 'budgett'"),
    ({"budget": 0}, "config key 'budget' must be a number in (0, 1], got 0"),
    ({"budget": 1.5}, "got 1.5"),
    ({"num_samples": 0}, "config key 'num_samples' must be an integer >= 1, got 0"),
    ({"num_samples": "many"}, "'num_samples' must be an integer >= 1, got 'many'"),
    ({"concurrency": 1.5}, "'concurrency' must be an integer >= 1, got 1.5"),
    ({"pareto": "yes"}, "'pareto' must be true or false, got 'yes'"),
    ({"frozen": [1]}, "'frozen' must be a list of strings, got [1]"),
    ({"searcher": "nope"}, "config key 'searcher' must be one of: aofp, global, gradient, metapruning, optuna, "
                           "random, uniform, got 'nope'"),
    ({"searcher_options": {"pointz": 3}, "searcher": "uniform"}, "unknown option 'pointz' for searcher 'uniform'"),
    ({"model": None}, None),
])
def test_bad_values_name_the_key(values, text):
    if text is None:  # None means "not given": the default stays
        assert load_config(None, values).model == "small_cnn"
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, values)
    assert text in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_cli_flags_are_typed_like_yaml():
    args = build_parser().parse_args(["search", "--budget", "0.25", "--num-samples", "3", "--pareto",
                                      "--option", "startup_trials=2", "--frozen", "a.b,c", "--name", "007",
                                      "--fill-budget"])
    over = _search_settings(args)
    assert over["budget"] == 0.25 and over["num_samples"] == 3 and over["pareto"] is True
    assert over["fill_budget"] is True and SearchConfig().fill_budget is False
    assert over["searcher_options"] == {"startup_trials": 2} and over["frozen"] == ["a.b", "c"]
    assert over["name"] == "007"  # strings stay strings
    assert load_config(None, over).budget == 0.25


def test_resolved_fills_name_and_absolute_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SearchConfig(storage="runs").resolved()
    assert cfg.storage == str(tmp_path / "runs") and cfg.name.startswith("small_cnn-optuna-")
    with pytest.raises(ConfigError, match="plain folder name"):
        SearchConfig(name="a/b")
