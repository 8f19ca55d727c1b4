"""AOFP: the binary search on known damages, where and how damage is measured, the base path's training, the end
of a search (budget met, or a message), timeouts, resume."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from searchers import check_options, make_searcher
from trainables import aofp as aofp_trainable
from trainables.aofp import (AofpJob, aofp_step, channel_masks, measure_point, probe_damage, round_batches,
                             train_base_path, trial_job)
from widthsearch import CostModel, build_space, load_model
from widthsearch.app.config import SearchConfig
from widthsearch.space import dependency_graph


class TwoLayer(nn.Module):
    """conv(2->8) -> BN -> ReLU -> conv(8->8) -> BN -> ReLU -> pool -> fc; for exact damages."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def synthetic():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    with torch.no_grad():  # channels 0..3 of c1 output exactly zero: masking them does no damage
        model.b1.weight[:4] = 0
        model.b1.bias[:4] = 0
        for bn in (model.b1, model.b2):  # running statistics far from any batch's: eval and train mode differ
            bn.running_mean.fill_(0.5)
            bn.running_var.fill_(4.0)
    space = build_space(model, torch.randn(1, 2, 6, 6))
    return model, space, CostModel(space)


def probe_result(payload: dict, damages: dict, rng: np.random.Generator) -> dict:
    """A probe's result with synthetic per-channel damage: the damage of a mask is the sum of its channels'."""
    sums, counts = {}, {}
    for name, space in payload["search"].items():
        s, c = np.zeros(len(space)), np.zeros(len(space), dtype=int)
        for _ in range(payload["window"]):
            picked = rng.choice(len(space), len(space) // 2, replace=False)
            s[picked] += sum(damages[name][space[i]] for i in picked)
            c[picked] += 1
        sums[name], counts[name] = s.tolist(), c.tolist()
    return {"damages": json.dumps({"sum": sums, "count": counts}), "score": float("nan")}


def drive(searcher, damages, max_trials: int = 400) -> list[dict]:
    """Run a search to its end: synthetic probes (`damages(round)` per group and channel), commits that succeed,
    the final trial. Returns every trial's payload in order."""
    payloads, rng = [], np.random.default_rng(0)
    while len(payloads) < max_trials:
        issued = []
        while (config := searcher.suggest(f"t{len(payloads)}")) not in (None, "FINISHED"):
            payloads.append(config["payload"])
            issued.append((f"t{len(payloads) - 1}", payloads[-1], config))
        if not issued:
            assert config == "FINISHED", "the searcher waits for nothing"
            return payloads
        for trial_id, payload, config in issued:
            if payload["phase"] == "probe":
                result = probe_result(payload, damages(payload["round"]), rng)
            elif payload["phase"] == "commit":
                result = {"score": 0.9, "val_acc": 0.9, "version": payload["version"] + 1}
            else:
                result = {"score": 0.95, "val_acc": 0.95}
            searcher.on_trial_complete(trial_id, result)
    raise AssertionError("the search did not end")


def phases(payloads: list[dict]) -> list[str]:
    return [p["phase"] for p in payloads]


# ----------------------------------------------------------------------------- the binary search
def test_a_decision_rests_by_default_on_as_many_images_as_the_authors_half():
    """The authors decide after 1000 iterations of 64 images; 20 batches ranked filters no better than chance."""
    options = check_options("aofp", {})
    assert options["probes"] * options["window"] * SearchConfig().batch_size >= 1000 * 64


def test_binary_search_prunes_the_harmless_channels_and_keeps_a_layer_that_all_matters(synthetic):
    _, space, cost = synthetic
    first, second = space.names
    damages = {first: [0.0] * 4 + [1.0] * 4,    # four harmless channels
               second: [1.0] * 8}                # every channel matters
    searcher = make_searcher("aofp", space, cost, budget=None, window=20, probes=2)
    payloads = drive(searcher, lambda r: damages)
    assert sorted(searcher.alive[first]) == [4, 5, 6, 7]   # exactly the zero channels went, all of them
    assert searcher.alive[second] == list(range(8))        # nothing could go
    assert set(searcher.stopped) == {first, second}
    assert "epsilon=0.01 in 3 passes" in searcher.stopped[second]
    assert phases(payloads)[-1] == "final" and phases(payloads).count("final") == 1
    assert searcher.suggest("after") == "FINISHED"


def test_each_round_probes_consecutive_slices_of_one_stream_and_the_commit_trains_on_all_of_them(synthetic):
    _, space, cost = synthetic
    searcher = make_searcher("aofp", space, cost, budget=0.5, window=7, probes=3, lr=0.002)
    probes = [searcher.suggest(f"p{i}")["payload"] for i in range(3)]
    assert searcher.suggest("p3") is None
    assert [p["offset"] for p in probes] == [0, 7, 14] and len({p["seed"] for p in probes}) == 1
    for i, p in enumerate(probes):
        searcher.on_trial_complete(f"p{i}", probe_result(p, {n: [0.5] * 8 for n in space.names},
                                                         np.random.default_rng(i)))
    commit = searcher.suggest("c")["payload"]
    assert commit["phase"] == "commit" and commit["seed"] == probes[0]["seed"]
    assert commit["steps"] == 21 and commit["lr"] == 0.002
    searcher.on_trial_complete("c", {"score": 0.9, "version": 1})
    assert searcher.suggest("p")["payload"]["seed"] != probes[0]["seed"]  # a new round, new batches


def test_budget_stops_the_search_once_met_and_says_so(synthetic):
    _, space, cost = synthetic
    searcher = make_searcher("aofp", space, cost, budget=0.9, window=20, probes=1)
    payloads = drive(searcher, lambda r: {n: [0.0] * 8 for n in space.names})
    assert searcher.trajectory[-1]["cost_ratio"] <= 0.9
    assert all(t["cost_ratio"] > 0.9 for t in searcher.trajectory[:-1])
    final = payloads[-1]
    assert final["phase"] == "final" and final["budget_met"] and final["keep"] == searcher.alive
    assert final["stop"].startswith("budget 0.9 met: FLOPs ratio")


def test_a_failed_pass_restarts_the_search_instead_of_stopping_the_group(synthetic):
    """The authors reset the search space when the k = 1 test fails; stopping the group stalled runs above budget."""
    _, space, cost = synthetic
    first, second = space.names

    def damages(round_):  # nothing can go in the first pass (3 rounds: k = 4, 2, 1); later, the weights have moved
        return {first: [1.0] * 8 if round_ < 3 else [0.0] * 4 + [1.0] * 4, second: [1.0] * 8}

    searcher = make_searcher("aofp", space, cost, budget=0.7, window=20, probes=1)
    payloads = drive(searcher, damages)
    assert len(searcher.alive[first]) < 8 and set(range(8)) - set(searcher.alive[first]) <= {0, 1, 2, 3}
    assert payloads[-1]["budget_met"] and searcher.trajectory[-1]["cost_ratio"] <= 0.7
    search_sizes = [len(p["search"][first]) for p in payloads if p["phase"] == "probe"]
    assert search_sizes[:4] == [8, 4, 2, 8]  # halved twice, failed at k = 1, restarted on all alive filters


def test_a_search_that_cannot_reach_the_budget_ends_with_a_message_naming_the_groups(synthetic, caplog):
    _, space, cost = synthetic
    first, second = space.names
    damages = {first: [0.0] * 4 + [1.0] * 4, second: [1.0] * 8}
    searcher = make_searcher("aofp", space, cost, budget=0.2, window=20, probes=1, patience=2, relax=1)
    with caplog.at_level(logging.WARNING, logger="searchers.aofp"):
        payloads = drive(searcher, lambda r: damages)
    final = payloads[-1]
    assert final["phase"] == "final" and not final["budget_met"]
    text = final["stop"]
    assert text.startswith("budget 0.2 not met (FLOPs ratio ") and "no group can be pruned further" in text
    for name in (first, second):
        assert f"{name} (no filter's mean damage below epsilon=0.01 in 2 passes in a row; the last test found 1" in text
    assert text in caplog.text


def test_with_a_budget_epsilon_relaxes_until_the_budget_is_met(synthetic):
    """Every filter does damage 0.05 (> epsilon 0.01): fixed epsilon stops both groups; relaxed, the budget is met."""
    _, space, cost = synthetic
    damages = {n: [0.05] * 8 for n in space.names}
    fixed = make_searcher("aofp", space, cost, budget=0.5, window=20, probes=1, patience=2, relax=1)
    assert not drive(fixed, lambda r: damages)[-1]["budget_met"]
    relaxed = make_searcher("aofp", space, cost, budget=0.5, window=20, probes=1, patience=2)
    payloads = drive(relaxed, lambda r: damages)
    assert payloads[-1]["budget_met"] and relaxed.trajectory[-1]["cost_ratio"] <= 0.5
    assert all(0.05 < e <= 0.16 for e in relaxed.epsilon.values())  # doubled until above the damage, no further
    assert len(payloads) < 40


def test_the_last_round_gives_back_what_it_took_past_the_budget(synthetic):
    _, space, cost = synthetic
    first, second = space.names
    damages = {first: [0.001 * (i + 1) for i in range(8)], second: [0.0] * 8}
    searcher = make_searcher("aofp", space, cost, budget=0.6, window=50, probes=1)
    payloads = drive(searcher, lambda r: damages)
    final = searcher.trajectory[-1]["cost_ratio"]
    assert payloads[-1]["budget_met"] and final <= 0.6
    widths = searcher.widths()
    one_more = [searcher.cost_ratio([w + (i == j) for j, w in enumerate(widths)]) for i in range(2) if widths[i] < 8]
    assert one_more and min(one_more) > 0.6  # no filter could have been spared and stayed within the budget


def test_running_out_of_trials_ends_with_the_final_trial_and_how_many_more_it_needs(synthetic):
    _, space, cost = synthetic
    first, second = space.names
    damages = {first: [0.0] * 8, second: [1.0] * 8}  # only the first group can go, slowly (relax off)
    searcher = make_searcher("aofp", space, cost, budget=0.05, window=5, probes=1, relax=1, patience=50,
                             num_samples=9)
    payloads = drive(searcher, lambda r: damages)
    assert len(payloads) <= 9 and phases(payloads)[-1] == "final"
    stop = payloads[-1]["stop"]
    assert stop.startswith("budget 0.05 not met") and "num_samples=9 ran out after 4 rounds" in stop  # 4 x 2 + final
    assert "more trials (" in stop and "raise --num-samples" in stop


def test_max_rounds_ends_the_search_with_a_message(synthetic):
    _, space, cost = synthetic
    searcher = make_searcher("aofp", space, cost, budget=0.2, window=5, probes=1, max_rounds=2, relax=1)
    payloads = drive(searcher, lambda r: {n: [1.0] * 8 for n in space.names})
    assert phases(payloads) == ["probe", "commit", "probe", "commit", "final"]
    assert "max_rounds=2 reached" in payloads[-1]["stop"] and "still searching: " in payloads[-1]["stop"]


def test_failed_probes_or_commit_end_the_search_on_the_last_good_version(synthetic):
    _, space, cost = synthetic
    searcher = make_searcher("aofp", space, cost, budget=0.5, window=5, probes=1)
    searcher.suggest("p")
    searcher.on_trial_complete("p", None, error=True)
    final = searcher.suggest("f")["payload"]
    assert final["phase"] == "final" and final["version"] == 0
    assert "every probe trial of round 0 failed" in final["stop"]

    searcher = make_searcher("aofp", space, cost, budget=0.5, window=5, probes=1)
    payload = searcher.suggest("p")["payload"]
    harmless = {n: [0.0] * 8 for n in space.names}
    searcher.on_trial_complete("p", probe_result(payload, harmless, np.random.default_rng(0)))
    commit = searcher.suggest("c")["payload"]
    assert commit["keep"] != commit["train_keep"]  # the decision pruned
    searcher.on_trial_complete("c", None, error=True)
    final = searcher.suggest("f")["payload"]
    assert final["keep"] == commit["train_keep"] and final["version"] == 0
    assert "the commit trial of round 0 failed" in final["stop"]


# ----------------------------------------------------------------------------- damage
def test_probe_damage_is_zero_exactly_for_dead_channels(synthetic):
    model, space, _ = synthetic
    first = space.names[0]
    batches = [(torch.randn(16, 2, 6, 6), torch.zeros(16, dtype=torch.long)) for _ in range(30)]
    sums, counts, evals = probe_damage(model, space, {first: list(range(8))}, batches, np.random.default_rng(0))
    mean = sums[first] / np.maximum(counts[first], 1)
    assert evals == 30 and counts[first].sum() == 30 * 4
    # a mask's damage is shared by all its channels: live channels are only ever ranked above dead ones on average
    assert mean[:4].mean() < mean[4:].mean()
    only_dead = probe_damage(model, space, {first: [0, 1, 2, 3]}, batches, np.random.default_rng(1))[0][first]
    assert np.all(only_dead == 0.0)


def test_damage_is_taken_after_the_next_layers_batchnorm_and_relu_with_batch_statistics(synthetic):
    model, space, _ = synthetic
    first = space.names[0]
    x = torch.randn(32, 2, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sums, counts, _ = probe_damage(model, space, {first: [4, 5]}, [(x, None)], np.random.default_rng(0))
    masked = 4 if counts[first][0] else 5

    def after_next(h):  # the authors' t: the next layer's output after its BN (batch statistics) and ReLU
        z = model.c2(h)
        return torch.relu(F.batch_norm(z, None, None, model.b2.weight, model.b2.bias, training=True))

    with torch.no_grad():
        h = torch.relu(F.batch_norm(model.c1(x), None, None, model.b1.weight, model.b1.bias, training=True))
        ablated = h.clone()
        ablated[:, masked] = 0
        y, y_ablated = after_next(h), after_next(ablated)
        expected = ((y_ablated - y) ** 2).sum() / (y ** 2).sum()
    assert counts[first].tolist() == ([1, 0] if masked == 4 else [0, 1])
    assert sums[first][masked - 4] == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running statistics untouched
    assert not model.training and not model.b1.training


def test_measure_points_of_a_resnet_follow_its_bn_and_relu_where_they_exist():
    model = load_model("cifar_resnet20", 10)
    graph = dependency_graph(model, torch.zeros(1, 3, 32, 32))
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}

    def point(layer):
        p = measure_point(graph, modules[layer])
        return names.get(p.bn), p.relu

    assert point("layer1.0.conv1") == ("layer1.0.bn1", True)    # conv -> BN -> ReLU
    assert point("layer1.0.conv2") == ("layer1.0.bn2", False)   # conv -> BN -> residual addition
    assert point("layer2.0.shortcut.0") == ("layer2.0.shortcut.1", False)
    assert point("fc") == (None, False)                          # the classifier: its logits


# ----------------------------------------------------------------------------- the base path
class Digits2:
    """A two-channel view of digits for TwoLayer, recording every training batch it streams."""

    def __init__(self, digits):
        self.digits, self.seen = digits, []

    def stream(self, split, batch_size, seed, device="cpu", augment=None):
        for x, y in self.digits.stream(split, batch_size, seed=seed, device=device, augment=augment):
            self.seen.append(x[0].sum().item())
            yield x.expand(-1, 2, -1, -1).contiguous(), y % 3


def test_the_base_path_trains_on_the_probes_batches_at_a_constant_rate_with_masked_channels_at_zero(digits):
    torch.manual_seed(0)
    model = TwoLayer()
    space = build_space(model, torch.zeros(1, 2, 8, 8))
    first = space.names[0]
    data = Digits2(digits)
    probed = [b for offset in (0, 3) for b in round_batches(data, 32, seed=7, offset=offset, count=3, device="cpu")]
    probe_seen, data.seen = data.seen[-6:], []
    keep = {first: [4, 5, 6, 7]}
    state = train_base_path(model, space, keep, data, steps=6, lr=0.1, batch_size=32, seed=7, optimizer_state=None,
                            device=torch.device("cpu"))
    assert len(probed) == 6 and data.seen == probe_seen     # the same batches, in the same order
    assert torch.all(model.c1.weight[:4] == 0) and torch.all(model.b1.weight[:4] == 0)
    assert torch.all(model.b1.bias[:4] == 0) and torch.all(model.c2.weight[:, :4] == 0)
    assert model.c1.weight[4:].abs().sum() > 0
    assert [g["lr"] for g in state["param_groups"]] == [0.1]  # constant: not annealed
    momentum = [s["momentum_buffer"] for s in state["state"].values()]
    assert momentum and any(m.abs().sum() > 0 for m in momentum)

    # the next commit carries the momentum on, and channels the last decision dropped are zeroed, buffers included
    keep = {first: [5, 6, 7]}
    before = model.c1.weight[5:].clone()
    state = train_base_path(model, space, keep, data, steps=1, lr=0.1, batch_size=32, seed=8, optimizer_state=state,
                            device=torch.device("cpu"))
    assert torch.all(model.c1.weight[:5] == 0) and not torch.equal(model.c1.weight[5:], before)
    index = [n for n, _ in model.named_parameters()].index("c1.weight")
    assert torch.all(state["state"][index]["momentum_buffer"][:5] == 0)


def test_channel_masks_cover_every_coupled_layer(synthetic):
    model, space, _ = synthetic
    masks = channel_masks(model, space, {space.names[0]: [1, 2, 3, 4, 5, 6, 7]})
    assert set(masks) == {"c1.weight", "c1.bias", "b1.weight", "b1.bias", "c2.weight"}
    assert masks["c2.weight"][:, 0].sum() == 0 and masks["c2.weight"][:, 1:].all()


# ----------------------------------------------------------------------------- trials
def test_trial_job_honours_the_timeout_and_storage(synthetic, monkeypatch):
    model, space, cost = synthetic
    common = dict(model=model, space=space, cost=cost, measure=cost.measure("flops"), data="digits",
                  val_fraction=0.1, split_seed=0, seed=0, criterion="l1", importance_batches=1, bn_batches=1,
                  batch_size=8)
    _, job = trial_job(SearchConfig(trial_timeout_s=0.05, finetune_steps=7), "s3://bucket/exp", common)
    assert (job.trial_timeout_s, job.exp_dir, job.finetune_steps) == (0.05, "s3://bucket/exp", 7)

    release = threading.Event()
    monkeypatch.setattr(aofp_trainable, "_step", lambda config, job: release.wait())  # a trial that hangs
    try:
        with pytest.raises(TimeoutError, match="trial exceeded trial_timeout_s=0.05"):
            aofp_step({"widths": [8, 8], "payload": "{}"}, job)
    finally:
        release.set()
    assert isinstance(job, AofpJob)


def test_save_restore_continues_the_same_search(synthetic, tmp_path):
    _, space, cost = synthetic
    damages = {space.names[0]: [0.0] * 4 + [1.0] * 4, space.names[1]: [1.0] * 8}
    a = make_searcher("aofp", space, cost, budget=None, window=10, probes=1)
    payload = a.suggest("p")["payload"]
    a.on_trial_complete("p", probe_result(payload, damages, np.random.default_rng(0)))
    a.suggest("c")
    a.on_trial_complete("c", {"score": 0.9, "version": 1})
    a.save(str(tmp_path / "s.pkl"))
    b = make_searcher("aofp", space, cost, budget=None, window=10, probes=1)
    b.restore(str(tmp_path / "s.pkl"))
    assert (b.version, b.round, b.alive, b.search, b.stopped, b.failed_passes) == \
        (a.version, a.round, a.alive, a.search, a.stopped, a.failed_passes)
    assert b.suggest("n1") == a.suggest("n1")


def test_bad_options_are_named(synthetic):
    _, space, cost = synthetic
    with pytest.raises(Exception, match="searcher 'aofp': option 'patience' must be an integer >= 1, got 0"):
        make_searcher("aofp", space, cost, budget=None, patience=0)
    with pytest.raises(Exception, match="unknown option 'commit_steps' for searcher 'aofp'"):
        make_searcher("aofp", space, cost, budget=None, commit_steps=5)
