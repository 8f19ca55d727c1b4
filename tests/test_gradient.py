"""Gradient searcher: differentiable complexity, gates on a synthetic model, lam bisection, end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logit
from torch import nn

from searchers import make_searcher
from widthsearch import CostModel, build_space, prune
from widthsearch.errors import ConfigError
from widthsearch.gates import ChannelGates, GateSchedule, complexity_fn, extract, optimize_gates
from widthsearch.results import chosen_channels

from .test_e2e_cli import FAST, cli, rows


class Synthetic(nn.Module):
    """1x1 conv(3->w1) -> tanh -> 1x1 conv(w1->w2) -> tanh -> mean -> fc(w2->4) (tanh: no dead channels)."""

    def __init__(self, w1: int = 8, w2: int = 8):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, w1, 1), nn.Conv2d(w1, w2, 1), nn.Linear(w2, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).mean((2, 3)))


USELESS = {"c1": [5, 6, 7], "c2": [6, 7]}  # no path from these channels to the output


@pytest.fixture(scope="module")
def synthetic():
    """The model (fitted to a wider teacher, USELESS channels held disconnected), its space and cost, data."""
    torch.manual_seed(0)
    teacher, model = Synthetic(16, 16), Synthetic()
    x = torch.randn(1024, 3, 4, 4)
    with torch.no_grad():
        logits = teacher(x)
        y = (logits - logits.mean(0)).argmax(1)  # balanced classes

    def disconnect():
        with torch.no_grad():
            model.c2.weight[:, USELESS["c1"]] = 0
            model.fc.weight[:, USELESS["c2"]] = 0

    disconnect()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for x_, y_ in itertools.islice(batches((x, y), 128), 300):
        opt.zero_grad()
        F.cross_entropy(model(x_), y_).backward()
        opt.step()
        disconnect()
    space = build_space(model.eval(), x[:1])
    return model, space, CostModel(space), (x, y)


def batches(xy, size: int = 64, seed: int = 0):
    x, y = xy
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(x), (size,), generator=g)
        yield x[idx], y[idx]


SCHEDULE = GateSchedule(steps=150, lr=0.1)


def test_complexity_is_the_cost_model_and_its_gradient_matches_finite_differences(synthetic):
    _, space, cost, _ = synthetic
    w = torch.tensor([5.0, 3.0], dtype=torch.float64)
    assert cost.flops_torch(w).item() == pytest.approx(cost.flops({"c1": 5, "c2": 3}))
    assert cost.params_torch(w).item() == pytest.approx(cost.params({"c1": 5, "c2": 3}))

    gates = ChannelGates(Synthetic(), space)
    penalty = complexity_fn(cost.measure("flops"))
    logits = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def term(a):
        return penalty(gates.expected_widths(torch.sigmoid(a / 0.7)))

    (grad,) = torch.autograd.grad(term(logits), logits)
    eps = 1e-6
    numeric = torch.stack([(term(logits.detach() + eps * e) - term(logits.detach() - eps * e)) / (2 * eps)
                           for e in torch.eye(16, dtype=torch.float64)])
    assert torch.allclose(grad, numeric, rtol=1e-5, atol=1e-9)
    assert (grad > 0).all()  # every kept channel costs


def test_hard_gates_compute_exactly_the_pruned_model(synthetic):
    model, space, _, (x, _) = synthetic
    gates = ChannelGates(model, space)
    keep = {"c1": [0, 2, 3], "c2": [1, 4]}
    z = torch.zeros(16)
    z[keep["c1"]] = 1
    z[[8 + c for c in keep["c2"]]] = 1
    with torch.no_grad(), gates.applied():
        gates.set(z)
        gated = model(x[:8])
    assert torch.allclose(gated, prune(model, space, keep=keep)(x[:8]), atol=1e-5)


def test_gates_close_exactly_the_useless_channels(synthetic):
    model, space, cost, xy = synthetic
    result = optimize_gates(model, space, cost.measure("flops"), batches(xy), lam=0.05, schedule=SCHEDULE)
    keep = extract(space, result.logits)
    assert keep == {n: [c for c in range(8) if c not in USELESS[n]] for n in ("c1", "c2")}
    assert result.expected_ratio == pytest.approx(cost.flops_ratio({"c1": 5, "c2": 6}), rel=0.01)


def test_zero_penalty_keeps_everything_and_a_large_one_prunes_to_the_minimum(synthetic):
    model, space, cost, xy = synthetic
    free = optimize_gates(model, space, cost.measure("flops"), batches(xy), lam=0.0, schedule=SCHEDULE)
    assert extract(space, free.logits) == {"c1": list(range(8)), "c2": list(range(8))}
    heavy = optimize_gates(model, space, cost.measure("flops"), batches(xy), lam=1e3, schedule=SCHEDULE)
    assert {n: len(k) for n, k in extract(space, heavy.logits).items()} == {"c1": 1, "c2": 1}


def test_extraction_respects_minimum_width_and_divisor():
    model = Synthetic(16, 16)
    space = build_space(model, torch.randn(1, 3, 4, 4), min_width=4, divisor=4)
    probs = [np.r_[np.full(5, 0.9), np.full(11, 0.1)], np.linspace(0.0, 0.4, 16)]
    keep = extract(space, [logit(p) for p in probs])
    assert keep["c1"] == [0, 1, 2, 3, 4, 5, 6, 7]     # 5 above 0.5, rounded up to a multiple of 4
    assert keep["c2"] == [12, 13, 14, 15]             # none above 0.5: the 4 most probable


def fake_widths(space, lam: float) -> list[int]:
    """A gate trial's outcome stand-in: keep ratio 1 / (1 + lam) of every group, rounded to channels."""
    return [g.round(g.width / (1 + lam)) for g in space.groups]


def fake_ratio(space, cost, lam: float) -> float:
    return cost.flops_ratio(space.from_vector(fake_widths(space, lam)))


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.75])
def test_the_search_on_log_lambda_lands_within_three_percent_below_the_budget(budget, tmp_path):
    model = Synthetic(128, 128)
    space = build_space(model, torch.randn(1, 3, 4, 4))
    cost = CostModel(space)
    searcher = make_searcher("gradient", space, cost, budget=budget, max_trials=30)
    trial, achieved = 0, []
    while (config := searcher.suggest(f"t{trial}")) not in ("FINISHED",):
        assert config is not None
        assert searcher.suggest("other") is None  # one gate optimisation at a time
        lam = config["payload"]["lam"]
        achieved.append(fake_ratio(space, cost, lam))
        if trial == 2:  # resume half-way through
            searcher.save(str(tmp_path / "s.pkl"))
            searcher = make_searcher("gradient", space, cost, budget=budget, max_trials=30)
            searcher.restore(str(tmp_path / "s.pkl"))
        searcher.on_trial_complete(f"t{trial}", {"score": 0.5, "widths": fake_widths(space, lam)})
        trial += 1
    within = [a for a in achieved if a <= budget]  # one-sided: only these count as meeting the budget
    assert within and max(within) >= budget * 0.97 and len(achieved) <= 20  # the fake moves in steps of ~2.8%


def test_the_search_steps_by_secant_not_by_the_whole_expand_factor():
    model = Synthetic(128, 128)
    space = build_space(model, torch.randn(1, 3, 4, 4))
    cost = CostModel(space)
    searcher = make_searcher("gradient", space, cost, budget=0.1)
    lams = []
    for trial, gate_ratio in enumerate([0.82, 0.22, 0.03]):  # cifar_resnet20's gates at lam 1 and 10, then below
        config = searcher.suggest(f"t{trial}")
        lams.append(config["payload"]["lam"])
        searcher.on_trial_complete(f"t{trial}", {"score": 0.5, "widths": space.widths.tolist(),
                                                 "gate_ratio": gate_ratio})
    lams.append(searcher.suggest("t3")["payload"]["lam"])
    assert lams[:2] == [1.0, 10.0]
    # through (1, 0.82) and (10, 0.22) the budget 0.1 lies at lam ~40, not at 10 x expand = 100
    assert 30 < lams[2] < 50
    # bracketed by 10 (0.22) and lams[2] (0.03): interpolation inside the bracket
    assert 10 < lams[3] < lams[2]


def test_a_result_above_the_budget_never_counts_as_meeting_it():
    model = Synthetic(128, 128)
    space = build_space(model, torch.randn(1, 3, 4, 4))
    cost = CostModel(space)
    searcher = make_searcher("gradient", space, cost, budget=0.5, tol=0.05)
    config = searcher.suggest("t0")
    over = space.uniform(0.715)  # FLOPs ratio just above 0.5, within tol of it on the other side
    assert 0.5 < cost.flops_ratio(over) <= 0.5 * 1.05
    searcher.on_trial_complete("t0", {"score": 0.9, "widths": space.vector(over).tolist()})
    assert not searcher.converged and searcher.suggest("t1") not in (None, "FINISHED")
    assert config["payload"]["budget"] == 0.5


def test_extraction_trims_a_rounded_profile_back_within_the_budget():
    model = Synthetic(16, 16)
    space = build_space(model, torch.randn(1, 3, 4, 4), min_width=4, divisor=4)
    cost = CostModel(space)
    probs = [np.linspace(1.0, 0.0, 16), np.linspace(0.95, 0.05, 16)]  # 8 channels above 0.5 in each
    loose = extract(space, [logit(p) for p in probs])
    budget = cost.flops_ratio({n: len(k) for n, k in loose.items()}) - 1e-6  # exactly at it would fit
    keep = extract(space, [logit(p) for p in probs], cost.measure("flops"), budget)
    widths = {n: len(k) for n, k in keep.items()}
    assert cost.flops_ratio(widths) <= budget
    assert all(w % 4 == 0 and w >= 4 for w in widths.values())
    for name, p in zip(space.names, probs):  # the least probable channels went first
        assert keep[name] == sorted(np.argsort(-p, kind="stable")[: widths[name]].tolist())


def test_extraction_scales_a_profile_far_above_the_budget_as_a_whole():
    model = Synthetic(16, 16)
    space = build_space(model, torch.randn(1, 3, 4, 4))
    cost = CostModel(space)
    rng = np.random.default_rng(0)
    # group 1: every channel kept, logits 3-4 (float32 probabilities at T = 0.1 all exactly 1); group 2: 8 kept
    logits = [3 + rng.random(16), np.r_[0.4 + 0.01 * rng.random(8), np.full(8, -2.0)]]
    assert np.all(torch.sigmoid(torch.tensor(logits[0], dtype=torch.float32) / 0.1).numpy() == 1.0)
    budget = 0.25 * cost.flops_ratio({space.names[0]: 16, space.names[1]: 8})
    keep = extract(space, logits, cost.measure("flops"), budget)
    widths = [len(keep[name]) for name in space.names]
    assert cost.flops_ratio(dict(zip(space.names, widths))) <= budget
    # both groups shrink by about the same factor (trimming the least probable first would empty the second one)
    assert widths[1] >= 2 and 1.5 <= widths[0] / widths[1] <= 2.5
    for name, a, w in zip(space.names, logits, widths):  # the channels of the largest logits, not the first ones
        assert keep[name] == sorted(np.argsort(-a)[:w].tolist())
    assert keep[space.names[0]] != list(range(widths[0]))


def test_pareto_mode_spreads_lambda_and_bad_options_are_named(synthetic):
    _, space, cost, _ = synthetic
    searcher = make_searcher("gradient", space, cost, budget=None, points=4, lam_min=0.1, lam_max=100)
    lams = [searcher.suggest(f"t{i}")["payload"]["lam"] for i in range(4)]
    assert lams == pytest.approx([0.1, 1, 10, 100])
    assert searcher.suggest("t4") == "FINISHED"
    with pytest.raises(ConfigError, match="searcher 'gradient': option 'tau_end' must be a number > 0, got 0"):
        make_searcher("gradient", space, cost, budget=0.5, tau_end=0)
    with pytest.raises(ConfigError, match="option 'complexity' must be one of: budget, flops, params, got 'latency'"):
        make_searcher("gradient", space, cost, budget=0.5, complexity="latency")
    with pytest.raises(ConfigError, match=r"lam_min \(5.0\) must be below lam_max \(1.0\)"):
        make_searcher("gradient", space, cost, budget=0.5, lam_min=5, lam_max=1)


def test_gradient_search_on_digits_through_the_cli(tmp_path):
    cli("search", "--name", "grad", "--storage", str(tmp_path), "--base-epochs", "2", "--searcher", "gradient",
        "--budget", "0.5", "--num-samples", "3", "--option", "steps=30", "--option", "lr=0.3", *FAST)
    table = sorted(rows(tmp_path / "grad"), key=lambda r: r["started_at"])
    assert 1 <= len(table) <= 3 and all(r["status"] == "ok" for r in table)
    lams = [json.loads(r["payload"])["lam"] for r in table]
    assert lams[0] == 1.0 and len(set(lams)) == len(lams)  # bisection: a new lam per trial
    assert all(r["flops_ratio"] <= 0.5 for r in table)  # budget mode: every row within (trimmed if need be)
    groups = json.loads((tmp_path / "grad" / "widthsearch" / "experiment.json").read_text())["groups"]
    for r in table:
        keep = json.loads(r["payload"])["keep"]
        assert [len(keep[n]) for n in groups] == r["widths"] and 0 <= r["val_acc"] <= 1
        assert chosen_channels(r) == {"keep": keep, "weights": None}  # retrain keeps exactly these channels
    summary = json.loads(cli("retrain", "grad", "--storage", str(tmp_path), "--best", "--epochs", "1", "--quiet").stdout)
    assert summary["flops_ratio"] <= 0.5


def test_the_penalty_is_whatever_measure_the_budget_bounds_latency_included(synthetic, tmp_path):
    """complexity=budget (the default) penalises the experiment's measure: here a latency model (an injected,
    parameter-shaped timer); a heavy penalty prunes to the minimum and the reported ratio is that model's."""
    from widthsearch.latency import latency_model

    model, space, _, xy = synthetic
    latency = latency_model(space, model, grid=2, cache_dir=tmp_path, progress=False,
                            timer=lambda module, inputs: 1e-3 * sum(p.numel() for p in module.parameters()) + 0.5)
    heavy = optimize_gates(model, space, latency, batches(xy), lam=1e3, schedule=SCHEDULE)
    assert {n: len(k) for n, k in extract(space, heavy.logits).items()} == {"c1": 1, "c2": 1}
    expected = np.array([p.sum() for p in heavy.probabilities], dtype=np.float64)
    assert heavy.expected_ratio == pytest.approx(latency.of(expected) / latency.base, rel=1e-4)
