"""Width searchers: budgets, registry, options, checkpoints (suggest/on_trial_complete called directly)."""

import json
import pickle

import numpy as np
import pytest
import torch
import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher

from searchers import (
    SEARCHERS, Option, WidthSearcher, check_options, make_searcher, options, project_to_budget, searcher_class,
    searchers_help,
)
from widthsearch import CostModel, build_space, load_model
from widthsearch.budget import fill_budget
from widthsearch.errors import ConfigError, WidthSearchError

BUILTIN = ["uniform", "random", "global", "optuna", "aofp", "gradient", "metapruning"]


class _Fixed(WidthSearcher):
    """A plug-in for the registry test: proposes the full widths (over budget, so the base class must repair)."""

    name = "test_fixed"

    def _propose(self, trial_id):
        return self.space.widths, None


def _setup(source, shape):
    torch.manual_seed(0)
    model = load_model(source, 10, in_channels=shape[1])
    space = build_space(model, torch.randn(*shape))
    return model, space, CostModel(space)


@pytest.fixture(scope="module")
def small():
    return _setup("small_cnn", (1, 1, 8, 8))


@pytest.fixture(scope="module")
def resnet():
    return _setup("cifar_resnet20", (1, 3, 32, 32))


@pytest.fixture(params=["small", "resnet"])
def setup(request):
    return request.getfixturevalue(request.param)


def _ratio(space, cost, widths):
    return cost.flops(space.from_vector(widths)) / cost.base_flops  # from_vector validates the bounds


def _score(space, widths):
    return float(np.sum(np.asarray(widths) / space.widths))


def _run(searcher, space, n, start=0, feed=True):
    """Suggest up to n profiles (stopping at FINISHED), feeding back a synthetic score."""
    out = []
    for i in range(start, start + n):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            out.append(Searcher.FINISHED)
            break
        assert config is not None
        out.append(config)
        if feed:
            searcher.on_trial_complete(f"t{i}", {"score": _score(space, config["widths"])})
    return out


# -- budgets --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in BUILTIN if searcher_class(n).enforce_budget])
def test_every_suggestion_is_within_budget_and_bounds(setup, name):
    model, space, cost = setup
    searcher = make_searcher(name, space, cost, budget=0.5, model=model, seed=1)
    configs = _run(searcher, space, 20)
    profiles = [c for c in configs if c != Searcher.FINISHED]
    assert profiles
    for config in profiles:
        assert set(config) == {"widths", "payload"}
        assert len(config["widths"]) == len(space)
        assert all(isinstance(w, int) for w in config["widths"])
        assert _ratio(space, cost, config["widths"]) <= 0.5
        assert config["payload"] is None or isinstance(json.loads(json.dumps(dict(config["payload"]))), dict)
    if name in ("random", "optuna"):
        assert len(profiles) == 20  # never FINISHED on their own
    assert len(searcher.history) == len(profiles)


def test_optuna_keeps_proposing_feasible_profiles_after_feedback(resnet):
    model, space, cost = resnet
    searcher = make_searcher("optuna", space, cost, budget=0.5, seed=0, startup_trials=5, parameterization="group")
    _run(searcher, space, 15)
    done = [t for t in searcher.study.trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 15 and searcher.study.user_attrs["groups"] == space.names
    assert set(done[0].params) == {f"r{i}" for i in range(len(space))}
    for config in _run(searcher, space, 10, start=15):  # TPE phase
        assert _ratio(space, cost, config["widths"]) <= 0.5


def test_project_to_budget_lands_just_under_the_budget(resnet):
    _, space, cost = resnet
    rng = np.random.default_rng(0)
    ratios = rng.uniform(space.min_widths / space.widths, 1.0, size=(16, len(space)))
    batch = project_to_budget(space, cost, ratios, 0.5)
    assert batch.shape == ratios.shape and batch.dtype == np.int64
    for row, widths in zip(ratios, batch):
        assert np.array_equal(project_to_budget(space, cost, row, 0.5), widths)  # 1-D = one row of 2-D
        assert 0.45 <= _ratio(space, cost, widths) <= 0.5
    # monotone in the target, full widths when everything fits, minimal as the fallback
    lower = project_to_budget(space, cost, ratios, 0.3)
    assert np.all(lower <= batch)
    assert np.array_equal(project_to_budget(space, cost, np.ones(len(space)), 1.0), space.widths)
    assert np.array_equal(project_to_budget(space, cost, np.ones(len(space)), 1e-9), space.min_widths)


def test_project_to_budget_keeps_the_floor_widths(resnet):
    _, space, cost = resnet
    floor = np.minimum(space.widths, 6)
    starved = np.ones(len(space))
    starved[0] = 0.01  # a direction that would take group 0 down to its minimum
    widths = project_to_budget(space, cost, starved, 0.2, low=floor)
    assert np.all(widths >= floor) and 0.18 <= _ratio(space, cost, widths) <= 0.2
    assert project_to_budget(space, cost, starved, 0.2)[0] < floor[0]  # without the floor it goes below
    # a budget below the floor's own cost: the floor where it fits is no longer possible, the minimum widths are
    assert np.array_equal(project_to_budget(space, cost, starved, 1e-9, low=floor), space.min_widths)


def test_project_to_budget_respects_divisor():
    torch.manual_seed(0)
    model = load_model("small_cnn", 10, in_channels=1)
    space = build_space(model, torch.randn(1, 1, 8, 8), divisor=8)
    cost = CostModel(space)
    widths = project_to_budget(space, cost, np.array([1.0, 0.7, 0.4]), 0.4)
    space.from_vector(widths)  # multiples of 8 or full
    assert _ratio(space, cost, widths) <= 0.4


def _maximal(space, cost, widths, target):
    """No group can take one more step of its divisor within `target`."""
    for i, g in enumerate(space.groups):
        if widths[i] < g.width:
            wider = np.array(widths)
            wider[i] = min(wider[i] + g.divisor, g.width)
            if _ratio(space, cost, wider) <= target:
                return False
    return True


@pytest.mark.parametrize("target", [0.1, 0.05])
def test_fill_budget_spends_what_rounding_left_and_keeps_the_shape(resnet, target):
    _, space, cost = resnet
    uniform = project_to_budget(space, cost, np.ones(len(space)), target)
    assert _ratio(space, cost, uniform) < 0.96 * target  # rounding to whole channels leaves > 4% unused
    assert not _maximal(space, cost, uniform, target)
    filled = fill_budget(space, cost, uniform, target)
    assert filled.dtype == np.int64 and np.all(filled >= uniform)
    assert 0.99 * target <= _ratio(space, cost, filled) <= target and _maximal(space, cost, filled, target)
    assert np.all(filled - uniform <= 1)  # uniform's groups are widened by one channel each at most
    rng = np.random.default_rng(0)
    ratios = rng.uniform(1 / 3, 1.0, size=(6, len(space)))
    ratios[:, 0] = 0.0  # a group the direction gives nothing is never widened
    projected = project_to_budget(space, cost, ratios, target)
    batch = fill_budget(space, cost, projected, target, ratios)
    for row, before, after in zip(ratios, projected, batch):
        assert np.array_equal(fill_budget(space, cost, before, target, row), after)  # 1-D = one row of 2-D
        assert after[0] == before[0] and np.all(after >= before) and _ratio(space, cost, after) <= target
    over = space.widths.copy()
    assert np.array_equal(fill_budget(space, cost, over, target), over)  # over the target: returned as it is


def test_fill_budget_respects_the_divisor():
    torch.manual_seed(0)
    model = load_model("small_cnn", 10, in_channels=1)
    space = build_space(model, torch.randn(1, 1, 8, 8), divisor=8)
    cost = CostModel(space)
    widths = fill_budget(space, cost, project_to_budget(space, cost, np.array([1.0, 0.7, 0.4]), 0.4), 0.4)
    space.from_vector(widths)  # multiples of 8 or full
    assert _ratio(space, cost, widths) <= 0.4 and _maximal(space, cost, widths, 0.4)


@pytest.mark.parametrize("name", ["uniform", "random", "optuna"])
def test_a_searcher_with_fill_budget_proposes_profiles_no_step_can_widen(resnet, name):
    model, space, cost = resnet
    plain = _run(make_searcher(name, space, cost, budget=0.1, model=model, seed=1), space, 6)
    filled = _run(make_searcher(name, space, cost, budget=0.1, model=model, seed=1, fill_budget=True), space, 6)
    plain = [c["widths"] for c in plain if c != Searcher.FINISHED]
    filled = [c["widths"] for c in filled if c != Searcher.FINISHED]
    assert not all(_maximal(space, cost, w, 0.1) for w in plain)  # without it, budget is left unused
    for widths in filled:
        assert _ratio(space, cost, widths) <= 0.1 and _maximal(space, cost, widths, 0.1)


# -- baselines -------------------------------------------------------------------------------
def test_uniform_budget_mode_suggests_once_then_finishes(resnet):
    _, space, cost = resnet
    searcher = make_searcher("uniform", space, cost, budget=0.5)
    first = searcher.suggest("a")
    assert searcher.suggest("b") == Searcher.FINISHED
    assert searcher.suggest("c") == Searcher.FINISHED
    ratio = first["payload"]["ratio"]
    assert first["widths"] == list(space.vector(space.uniform(ratio)))
    assert 0.45 <= _ratio(space, cost, first["widths"]) <= 0.5


def test_uniform_pareto_mode_spans_ratios(small):
    _, space, cost = small
    searcher = make_searcher("uniform", space, cost, budget=None, points=5)
    configs = _run(searcher, space, 10)
    assert configs[-1] == Searcher.FINISHED and len(configs) == 6
    assert configs[-2]["widths"] == list(space.widths)
    ratios = [c["payload"]["ratio"] for c in configs[:-1]]
    assert ratios == sorted(ratios) and ratios[-1] == 1.0


def test_random_pareto_mode_and_no_duplicates(small):
    _, space, cost = small
    searcher = make_searcher("random", space, cost, budget=None, seed=3)
    configs = _run(searcher, space, 20)
    widths = [tuple(c["widths"]) for c in configs]
    assert len(set(widths)) == len(widths)
    targets = [c["payload"]["target"] for c in configs]
    for w, t in zip(widths, targets):
        assert _ratio(space, cost, w) <= t + 1e-9


def test_global_one_candidate_per_normalizer_then_finished(resnet):
    model, space, cost = resnet
    searcher = make_searcher("global", space, cost, budget=0.5, model=model)
    configs = _run(searcher, space, 10)
    assert configs[-1] == Searcher.FINISHED
    candidates = configs[:-1]
    assert 1 <= len(candidates) <= 3
    assert len({tuple(c["widths"]) for c in candidates}) == len(candidates)
    covered = sorted(n for c in candidates for n in c["payload"]["normalizers"])
    assert covered == ["max", "mean", "none"]
    for c in candidates:
        assert 0.45 <= _ratio(space, cost, c["widths"]) <= 0.5  # removal stops right at the budget


def test_global_removes_least_important_channels_first(small):
    model, space, cost = small
    searcher = make_searcher("global", space, cost, budget=0.5, model=model, normalizers=["max"])
    (config, finished) = _run(searcher, space, 5)
    assert finished == Searcher.FINISHED
    # Removing one more step (from any group) must already fit; one step fewer must not.
    profiles = searcher._removal_order(searcher._score(None), "max")
    ratios = cost.flops_many(profiles) / cost.base_flops
    k = int(np.argmax(ratios <= 0.5))
    assert config["widths"] == list(profiles[k]) and ratios[k - 1] > 0.5
    assert np.all(np.diff(profiles, axis=0) <= 0) and np.array_equal(profiles[-1], space.min_widths)


def test_global_pareto_targets(small):
    model, space, cost = small
    searcher = make_searcher("global", space, cost, budget=None, model=model, normalizers=["mean"],
                             targets=[0.2, 0.6])
    configs = _run(searcher, space, 5)
    assert configs[-1] == Searcher.FINISHED and len(configs) == 3
    for c in configs[:-1]:
        assert _ratio(space, cost, c["widths"]) <= c["payload"]["target"]


def test_global_needs_model(small):
    _, space, cost = small
    with pytest.raises(ConfigError, match="needs the model"):
        make_searcher("global", space, cost, budget=0.5)


# -- errors ----------------------------------------------------------------------------------
def test_unreachable_budget(small):
    _, space, cost = small
    with pytest.raises(ConfigError, match="budget 1e-06 is unreachable: the smallest profile"):
        make_searcher("random", space, cost, budget=1e-6)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            make_searcher("random", space, cost, budget=bad)


def test_unknown_option_and_searcher(small):
    _, space, cost = small
    with pytest.raises(ConfigError, match="unknown option 'pointz' for searcher 'uniform'; accepted options: points"):
        make_searcher("uniform", space, cost, pointz=3)
    with pytest.raises(ConfigError, match="unknown option 'pointz' for searcher 'uniform'"):
        check_options("uniform", {"pointz": 3})  # the cheap check the CLI runs before any work (no searcher loaded)
    with pytest.raises(ConfigError) as info:
        make_searcher("nope", space, cost)
    assert "unknown searcher 'nope'" in str(info.value)
    for name in BUILTIN:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="sampler"):
        make_searcher("optuna", space, cost, sampler="cmaes")
    with pytest.raises(ConfigError, match="mode"):
        make_searcher("random", space, cost, mode="best")


def test_registry_line_plugs_in_a_searcher(small, tmp_path, monkeypatch):
    """A searcher defined outside the package, registered with one line, runs end to end through the API."""
    import widthsearch as ws

    _, space, cost = small
    SEARCHERS["test_fixed"] = f"{__name__}:_Fixed"
    monkeypatch.setitem(options.OPTIONS, "test_fixed", {"rate": Option(0.5, float, "a rate", low=0, high=1)})
    try:
        searcher = make_searcher("test_fixed", space, cost, budget=0.5, rate=1)
        assert searcher.options == {"rate": 1.0}
        config = searcher.suggest("x")
        assert _ratio(space, cost, config["widths"]) <= 0.5
        with pytest.raises(ConfigError, match="unknown searcher 'nope'.*test_fixed"):
            searcher_class("nope")
        assert "test_fixed:" in searchers_help()
        monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray, started and stopped by fit()
        run = ws.Search(name="plugin", storage=str(tmp_path), searcher="test_fixed", searcher_options={"rate": 1},
                        budget=0.5, num_samples=2, concurrency=1, finetune_steps=2, bn_batches=2, base_epochs=1)
        rows = run.fit(progress=False).to_pylist()
        assert len(rows) == 2 and all(r["status"] == "ok" and r["searcher"] == "test_fixed" for r in rows)
        assert all(r["cost_ratio"] <= 0.5 for r in rows) and run.best()["trial_id"] in {r["trial_id"] for r in rows}
    finally:
        SEARCHERS.pop("test_fixed")
    SEARCHERS["test_bad"] = f"{__name__}:_ratio"
    try:
        with pytest.raises(TypeError, match="is not a WidthSearcher named 'test_bad'"):
            searcher_class("test_bad")
    finally:
        SEARCHERS.pop("test_bad")


@pytest.mark.parametrize("name, given, text", [
    ("aofp", {"epsilon": "abc"}, "searcher 'aofp': option 'epsilon' must be a number > 0, got 'abc'"),
    ("aofp", {"probes": 0}, "searcher 'aofp': option 'probes' must be an integer >= 1, got 0"),
    ("aofp", {"window": 2.5}, "option 'window' must be an integer >= 1, got 2.5"),
    ("optuna", {"sampler": "bogus"}, "searcher 'optuna': option 'sampler' must be one of: tpe, nsga2, random"),
    ("optuna", {"startup_trials": True}, "option 'startup_trials' must be an integer >= 0, or empty for automatic, got True"),
    ("global", {"normalizers": ["mean", "median"]}, "option 'normalizers' must be a list of: mean, max, sum, none"),
    ("global", {"targets": [0.5, 1.5]}, "option 'targets' must be a list of numbers in (0, 1]"),
    ("gradient", {"lam_min": 10, "lam_max": 1}, "lam_min (10.0) must be below lam_max (1.0)"),
    ("metapruning", {"topk": 20, "population": 10}, "option 'topk' (20) exceeds 'population' (10)"),
    ("metapruning", {"mutation_prob": 2}, "option 'mutation_prob' must be a number in [0, 1], got 2"),
])
def test_declared_options_are_checked_with_one_message_style(name, given, text):
    with pytest.raises(ConfigError) as info:
        check_options(name, given)
    assert text in str(info.value)


def test_options_coerce_and_help_lists_every_option():
    assert check_options("aofp", {"window": 20.0, "epsilon": 1})["window"] == 20
    assert check_options("global", {"normalizers": "max"})["normalizers"] == ["max"]
    text = searchers_help()
    for name in BUILTIN:
        assert f"{name}:" in text
        for key in options.OPTIONS[name]:
            assert f"  {key}=" in text


# -- Tune integration --------------------------------------------------------------------------
def test_set_search_properties(small):
    _, space, cost = small
    searcher = make_searcher("optuna", space, cost, metric="score", mode="max")
    assert searcher.set_search_properties("loss", "min", {"epochs": 2})
    assert searcher.metric == "loss" and searcher.mode == "min"
    assert searcher.study.directions[0].name == "MINIMIZE"
    assert not searcher.set_search_properties(None, None, {"lr": tune.uniform(0.1, 1.0)})


def test_optuna_errored_trials_fail(small):
    _, space, cost = small
    searcher = make_searcher("optuna", space, cost, seed=0)
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.on_trial_complete("a", None, error=True)
    searcher.on_trial_complete("b", {"other": 1.0})
    told = [t.state for t in searcher.study.trials if t.state != TrialState.WAITING]  # not the queued warm starts
    assert told == [TrialState.FAIL, TrialState.FAIL]


def test_optuna_pareto_nsga2(small):
    _, space, cost = small
    searcher = make_searcher("optuna", space, cost, budget=None, seed=0, population_size=4)
    assert type(searcher.study.sampler).__name__ == "NSGAIISampler"
    for i in range(16):
        config = searcher.suggest(f"p{i}")
        widths = config["widths"]
        space.from_vector(widths)
        result = {"score": _score(space, widths)}
        if i % 2:
            result["flops_ratio"] = _ratio(space, cost, widths)  # ignored: the searcher computes its measure
        searcher.on_trial_complete(f"p{i}", result)
    done = [t for t in searcher.study.trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 16 and all(len(t.values) == 2 for t in done)
    assert searcher.study.best_trials  # a Pareto front exists


# -- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["random", "optuna", "uniform"])
def test_save_restore_continues_like_an_uninterrupted_run(small, tmp_path, name):
    _, space, cost = small
    kwargs = dict(budget=0.5, seed=7)
    if name == "optuna":
        kwargs["startup_trials"] = 3
    if name == "uniform":
        kwargs["budget"] = None
    straight = make_searcher(name, space, cost, **kwargs)
    expected = _run(straight, space, 8)

    first = make_searcher(name, space, cost, **kwargs)
    head = _run(first, space, 4)
    pending = first.suggest("t4")  # a trial in flight at checkpoint time
    path = tmp_path / "searcher.pkl"
    first.save(str(path))
    state = pickle.loads(path.read_bytes())
    assert not {"_space", "_cost", "_model"} & set(state)

    second = make_searcher(name, space, cost, **{**kwargs, "seed": 99})
    second.restore(str(path))
    second.on_trial_complete("t4", {"score": _score(space, pending["widths"])})
    tail = _run(second, space, 3, start=5)
    assert head + [pending] + tail == expected


def test_restore_refuses_another_searchers_checkpoint(small, tmp_path):
    _, space, cost = small
    path = str(tmp_path / "s.pkl")
    make_searcher("random", space, cost, budget=0.5).save(path)
    with pytest.raises(WidthSearchError, match="does not match"):
        make_searcher("random", space, cost, budget=0.4).restore(path)
    with pytest.raises(WidthSearchError, match="does not match"):
        make_searcher("optuna", space, cost, budget=0.5).restore(path)


# -- optuna: sizing, warm start, parameterizations ---------------------------------------------
def test_optuna_sizes_its_startup_and_population_from_the_trial_count(resnet):
    model, space, cost = resnet
    small = make_searcher("optuna", space, cost, budget=0.5, model=model, num_samples=16)
    # the warm starts: uniform, 2 global-ranking, 2 width exponents, 3 synflow
    assert len(small._warm) == 8
    assert small.options["startup_trials"] == 8 and small.study.sampler._n_startup_trials == 8
    big = make_searcher("optuna", space, cost, budget=0.5, model=model, num_samples=400)
    assert big.options["startup_trials"] == 10
    pareto = make_searcher("optuna", space, cost, budget=None, model=model, num_samples=40)
    assert pareto.options["population_size"] == 10 and pareto.study.sampler._population_size == 10
    fixed = make_searcher("optuna", space, cost, budget=0.5, num_samples=16, startup_trials=7, warm_start=False)
    assert fixed.options["startup_trials"] == 7


def test_optuna_warm_start_evaluates_uniform_and_global_profiles_first(resnet):
    model, space, cost = resnet
    uniform = make_searcher("uniform", space, cost, budget=0.3).suggest("u")["widths"]
    ranking = make_searcher("global", space, cost, budget=0.3, model=model, normalizers=["mean", "max"])
    expected = [uniform] + [c["widths"] for c in iter(lambda: ranking.suggest("g"), "FINISHED")]
    searcher = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=24, seed=3,
                             parameterization="group", width_exponents=None, synflow_warm_starts=0)
    first = [searcher.suggest(f"t{i}") for i in range(len(expected))]
    for config, widths in zip(first, expected):
        assert config["payload"]["warm_start"] is True
        assert _ratio(space, cost, config["widths"]) <= 0.3
        assert np.all(np.array(config["widths"]) >= np.array(widths))  # the same direction, scaled up to the budget
    assert searcher.suggest("next")["payload"]["warm_start"] is False


def test_optuna_width_exponent_warm_starts_follow_full_width_to_the_budget(resnet):
    model, space, cost = resnet
    plain = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=24, width_exponents=None,
                          synflow_warm_starts=0)
    searcher = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=24, synflow_warm_starts=0)
    assert searcher.options["width_exponents"] == [0.5, 1.0]  # the default
    searcher = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=24,
                             width_exponents=[1.0, 0.5], synflow_warm_starts=0)
    assert len(searcher._warm) == len(plain._warm) + 2
    configs = [searcher.suggest(f"t{i}") for i in range(len(searcher._warm))]
    assert all(c["payload"]["warm_start"] for c in configs)
    full = space.widths
    equal, half = (np.array(c["widths"]) for c in configs[-2:])
    for widths in (equal, half):
        assert _ratio(space, cost, widths) <= 0.3
    # exponent 1: as many channels in every group (where the full width allows); 0.5: in between
    assert np.ptp(equal[full >= equal.max()]) <= 1
    ratio_equal, ratio_half = equal / full, half / full
    narrow, wide = np.argmin(full), np.argmax(full)
    assert ratio_equal[narrow] / ratio_equal[wide] > ratio_half[narrow] / ratio_half[wide] > 1
    with pytest.raises(ConfigError, match="width_exponents"):
        make_searcher("optuna", space, cost, budget=0.3, width_exponents=[-1.0])


def test_optuna_synflow_warm_starts_are_the_pools_highest_scoring_profiles(resnet, monkeypatch):
    """synflow_warm_starts K: K more warm starts, the pool's K best by synflow (here a stand-in score that records
    every architecture it sees: its parameter count), each within the budget, evaluated first."""
    import widthsearch.zero_cost
    from widthsearch import prune

    model, space, cost = resnet
    seen = []

    def params(pruned):
        return sum(p.numel() for p in pruned.parameters())

    def stand_in(pruned, shape):
        assert tuple(shape) == (3, 32, 32)
        seen.append(params(pruned))
        return float(seen[-1])

    monkeypatch.setattr(widthsearch.zero_cost, "synflow", stand_in)
    plain = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=24, seed=2,
                          synflow_warm_starts=0)
    assert seen == []  # K = 0: no pool scored
    searcher = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=24, seed=2,
                             synflow_warm_starts=2, synflow_pool=12, parameterization="group")
    assert 2 <= len(seen) <= 12 and len(set(seen)) >= 2  # the pool's distinct profiles, of differing widths
    assert len(searcher._warm) == len(plain._warm) + 2
    configs = [searcher.suggest(f"t{i}") for i in range(len(searcher._warm))]
    assert all(c["payload"]["warm_start"] for c in configs)
    picked = [c["widths"] for c in configs[-2:]]
    assert sorted(params(prune(model, space, space.from_vector(w))) for w in picked) == sorted(seen)[-2:]
    assert all(_ratio(space, cost, w) <= 0.3 for w in picked)
    assert searcher.suggest("next")["payload"]["warm_start"] is False
    with pytest.raises(ConfigError, match=r"'synflow_warm_starts' \(5\) exceeds 'synflow_pool' \(4\)"):
        make_searcher("optuna", space, cost, budget=0.3, model=model, synflow_warm_starts=5, synflow_pool=4)
    with pytest.raises(ConfigError, match="'synflow_warm_starts' needs the model"):
        make_searcher("optuna", space, cost, budget=0.3, synflow_warm_starts=1)


def test_optuna_synflow_warm_starts_default_to_three_where_the_model_is_given(resnet, monkeypatch):
    """synflow_warm_starts unset: SYNFLOW_WARM_STARTS (3) warm starts from a pool of synflow_pool where the searcher
    has the model (as the application always builds it); without the model none, and no error (only an explicit K
    needs the model); Pareto mode has none."""
    import widthsearch.zero_cost
    from searchers.options import SYNFLOW_WARM_STARTS

    model, space, cost = resnet
    calls = []
    monkeypatch.setattr(widthsearch.zero_cost, "synflow", lambda pruned, shape: calls.append(1) or float(len(calls)))
    assert SYNFLOW_WARM_STARTS == 3
    off = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=24, synflow_warm_starts=0)
    assert calls == []
    default = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=24, synflow_pool=8)
    assert 3 <= len(calls) <= 8  # the pool's distinct profiles scored
    assert len(default._warm) == len(off._warm) + SYNFLOW_WARM_STARTS
    calls.clear()
    bare = make_searcher("optuna", space, cost, budget=0.3, num_samples=24)
    pareto = make_searcher("optuna", space, cost, budget=None, model=model, num_samples=24)
    assert calls == []
    assert len(bare._warm) == len(off._warm) - 2  # neither the two global-ranking warm starts nor synflow's
    assert len(pareto._warm) == 4  # the dense profile and uniform at three ratios


def test_optuna_synflow_ranks_an_overflowing_score_last(resnet, monkeypatch):
    """A synflow that overflows (inf or nan in a very deep model) is no evidence of a good architecture: such a
    profile is picked only after every finite one."""
    import math

    import widthsearch.zero_cost
    from widthsearch import prune

    model, space, cost = resnet
    seen = []

    def params(pruned):
        return sum(p.numel() for p in pruned.parameters())

    def stand_in(pruned, shape):  # the two largest profiles overflow; otherwise smaller scores higher
        seen.append(params(pruned))
        return [math.inf, math.nan][len(seen) % 2] if len(seen) <= 2 else -float(seen[-1])

    monkeypatch.setattr(widthsearch.zero_cost, "synflow", stand_in)
    searcher = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=24, seed=2,
                             synflow_warm_starts=2, synflow_pool=12, parameterization="group")
    assert len(set(seen)) >= 4
    picked = [params(prune(model, space, space.from_vector(list(np.round(r * space.widths).astype(int)))))
              for r in searcher._warm[-2:]]
    assert sorted(picked) == sorted(seen[2:])[:2]


def test_synflow_scores_the_architecture_and_leaves_the_model_and_random_state_alone(resnet):
    from widthsearch import prune
    from widthsearch.zero_cost import synflow

    model, space, cost = resnet
    narrow, wide = (prune(model, space, space.uniform(r)) for r in (0.25, 0.5))
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    state = torch.random.get_rng_state()
    score = synflow(narrow, (3, 32, 32))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in narrow.state_dict().items())
    assert np.isfinite(score) and 0 < score < synflow(wide, (3, 32, 32))
    assert synflow(narrow, (3, 32, 32)) == score  # seeded: the same architecture, the same score
    with torch.no_grad():  # the weights it was given do not count, only the architecture
        for p in narrow.parameters():
            p.mul_(3.0)
    assert synflow(narrow, (3, 32, 32)) == pytest.approx(score)


@pytest.mark.parametrize("how, count", [("group", 12), ("stage", 6), ("depth", 6)])
def test_optuna_parameterizations_cover_every_group_and_stay_in_budget(resnet, how, count):
    model, space, cost = resnet
    searcher = make_searcher("optuna", space, cost, budget=0.5, model=model, num_samples=12, parameterization=how,
                             knots=3, warm_start=False, seed=1)
    assert searcher._basis.shape == (12, count) and (searcher._basis.sum(axis=1) > 0.99).all()
    for i, config in enumerate(_run(searcher, space, 12)):
        assert _ratio(space, cost, config["widths"]) <= 0.5
    if how == "stage":  # the 3 inner groups of each stage share one width; so do the stream groups of a width
        widths = searcher.suggest("x")["widths"]
        assert widths[1] == widths[2] == widths[3] and widths[6] == widths[7] and widths[10] == widths[11]


def test_optuna_spread_samples_log_uniform_ratios_within_the_factor(resnet):
    model, space, cost = resnet
    searcher = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=16, spread=2.0,
                             warm_start=False, seed=0)
    configs = _run(searcher, space, 12)
    params = np.array([[t.params[f"r{i}"] for i in range(searcher._basis.shape[1])] for t in searcher.study.trials])
    assert params.min() >= 0.5 and params.max() <= 1.0
    assert all(d.log for d in searcher.study.trials[0].distributions.values())
    for config in configs:
        widths = np.array(config["widths"])
        assert _ratio(space, cost, widths) <= 0.3
        ratios = widths / space.widths  # a factor 2 in the sampled ratios, widened by rounding to whole channels
        assert ratios.max() / ratios.min() <= 2.0 * (1 + 1 / widths.min()) + 1e-9
    default = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=16, warm_start=False)
    assert default.options["spread"] == 3.0 and default._low.min() == pytest.approx(1 / 3)
    unlimited = make_searcher("optuna", space, cost, budget=0.3, model=model, num_samples=16, warm_start=False,
                              spread=None)
    assert unlimited._low.min() < 0.1
    with pytest.raises(ConfigError, match="searcher 'optuna': option 'spread' must be .*>= 1.*got 0.5"):
        make_searcher("optuna", space, cost, budget=0.3, model=model, spread=0.5)


def test_optuna_min_channels_floors_every_group_at_the_narrower_of_n_and_its_uniform_width(resnet):
    model, space, cost = resnet
    uniform = np.asarray(make_searcher("uniform", space, cost, budget=0.05).suggest("u")["widths"])
    searcher = make_searcher("optuna", space, cost, budget=0.05, model=model, num_samples=16, spread=8.0,
                             min_channels=8, warm_start=False, seed=0)
    floor = np.minimum(uniform, 8)
    assert np.array_equal(searcher._floor, floor) and floor.min() < 8 and floor.max() == 8
    for config in _run(searcher, space, 12):
        widths = np.array(config["widths"])
        assert np.all(widths >= floor) and _ratio(space, cost, widths) <= 0.05
    plain = make_searcher("optuna", space, cost, budget=0.05, model=model, num_samples=16, spread=8.0,
                          warm_start=False, seed=0)
    assert plain._floor is None and min(np.min(c["widths"]) for c in _run(plain, space, 12)) < floor.min()
    with pytest.raises(ConfigError, match="searcher 'optuna': option 'min_channels' must be .*>= 1.*got 0"):
        make_searcher("optuna", space, cost, budget=0.05, model=model, min_channels=0)


def test_the_readme_lists_the_declared_options():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- searcher-options -->", 1)[1].split("<!-- /searcher-options -->", 1)[0]
    assert block.strip().strip("`").removeprefix("text").strip() == searchers_help(), (
        "README's searcher options are stale: paste the output of "
        "python -c 'from searchers import searchers_help; print(searchers_help())'")


def test_optuna_records_its_study_in_the_experiment_and_a_restored_search_adds_each_trial_once(small, tmp_path):
    """optuna.load_study (and optuna-dashboard) open the study of a search: EXP/widthsearch/optuna/study.journal."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    _, space, cost = small
    exp = tmp_path / "exp1"
    searcher = make_searcher("optuna", space, cost, budget=0.5, seed=0, exp_dir=str(exp), num_samples=8)
    _run(searcher, space, 4)
    searcher.suggest("a")
    searcher.on_trial_complete("a", None, error=True)
    snapshot = tmp_path / "state.pkl"
    searcher.save(str(snapshot))
    _run(searcher, space, 2, start=10)  # finished after the snapshot: the journal has them, the snapshot does not
    restored = make_searcher("optuna", space, cost, budget=0.5, seed=0, exp_dir=str(exp), num_samples=8)
    restored.restore(str(snapshot))
    _run(restored, space, 3, start=20)

    path = exp / "widthsearch" / "optuna" / "study.journal"
    study = optuna.load_study(study_name="exp1", storage=JournalStorage(JournalFileBackend(str(path))))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == len(study.trials) - 1
    # the restored sampler proposes what the first one proposed after the snapshot: each of those is recorded once
    assert [(t.user_attrs["search_number"], t.params) for t in study.trials] == \
        [(t.number, t.params) for t in restored.study.trials]
    assert study.best_value == max(t.value for t in restored.study.trials if t.state == TrialState.COMPLETE)
    assert study.user_attrs["groups"] == list(space.names) and study.user_attrs["budget"] == 0.5
    assert all("widths" in t.user_attrs for t in study.trials)
