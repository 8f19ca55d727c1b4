"""AOFP: the binary search on known damages, damage measurement on a synthetic model, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from searchers import make_searcher
from trainables.aofp import commit, probe_damage
from widthsearch import CostModel, build_space


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
    space = build_space(model, torch.randn(1, 2, 6, 6))
    return model, space, CostModel(space)


def feed(searcher, damages_of):
    """Run one probe round with synthetic per-channel damage: damage of a mask = sum of its channels'."""
    ids = []
    while (config := searcher.suggest(f"p{len(ids)}-{searcher.round}")) is not None:
        payload = json.loads(config["payload"])
        if payload["phase"] != "probe":
            break
        ids.append((f"p{len(ids)}-{searcher.round}", payload))
    rng = np.random.default_rng(searcher.round)
    for trial_id, payload in ids:
        sums, counts = {}, {}
        for name, space in payload["search"].items():
            s, c = np.zeros(len(space)), np.zeros(len(space), dtype=int)
            for _ in range(payload["window"]):
                picked = rng.choice(len(space), len(space) // 2, replace=False)
                s[picked] += sum(damages_of[name][space[i]] for i in picked)
                c[picked] += 1
            sums[name], counts[name] = s.tolist(), c.tolist()
        searcher.on_trial_complete(trial_id, {"damages": json.dumps({"sum": sums, "count": counts}), "score": 0.0})


def commit_round(searcher, val_acc=0.9):
    config = searcher.suggest(f"c{searcher.round}")
    assert json.loads(config["payload"])["phase"] == "commit"
    assert searcher.suggest("extra") is None  # waits for the commit
    widths = config["widths"]
    searcher.on_trial_complete(f"c{searcher.round}", {"score": val_acc, "val_acc": val_acc, "version": searcher.version + 1,
                                                       "flops_ratio": searcher.cost_ratio(widths)})
    return config


def test_binary_search_prunes_the_harmless_channels_and_keeps_a_layer_that_all_matters(synthetic):
    model, space, cost = synthetic
    first, second = space.names
    damages = {first: [0.0] * 4 + [1.0] * 4,    # four harmless channels
               second: [1.0] * 8}                # every channel matters
    searcher = make_searcher("aofp", space, cost, budget=None, window=20, probes=2)
    for _ in range(12):
        if searcher._finished:
            break
        feed(searcher, damages)
        commit_round(searcher)
    assert sorted(searcher.alive[first]) == [4, 5, 6, 7]   # exactly the zero channels went, all of them
    assert searcher.alive[second] == list(range(8))        # nothing could go
    assert searcher.stopped == {first, second} and searcher._finished
    assert searcher.suggest("after") == "FINISHED"


def test_budget_stops_the_search_once_met(synthetic):
    model, space, cost = synthetic
    first, second = space.names
    searcher = make_searcher("aofp", space, cost, budget=0.9, window=20, probes=1)
    damages = {first: [0.0] * 8, second: [0.0] * 8}
    rounds = 0
    while not searcher._finished and rounds < 20:
        feed(searcher, damages)
        commit_round(searcher)
        rounds += 1
    assert searcher.trajectory[-1]["cost_ratio"] <= 0.9
    assert all(t["cost_ratio"] > 0.9 for t in searcher.trajectory[:-1])


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


def test_commit_holds_masked_channels_at_zero_through_finetuning(synthetic, digits):
    model, space, _ = synthetic
    first = space.names[0]
    tiny = TwoLayer()
    space1 = build_space(tiny, digits.example_input.expand(1, 2, 8, 8).contiguous())

    class Data:  # two-channel view of digits
        def stream(self, split, batch_size, seed, device):
            for x, y in digits.stream(split, batch_size, seed=seed, device=device):
                yield x.expand(-1, 2, -1, -1).contiguous(), y % 3

    keep = {first: [4, 5, 6, 7]}
    commit(tiny, space1, keep, Data(), steps=5, lr=0.1, batch_size=32, seed=0, device=torch.device("cpu"))
    assert torch.all(tiny.c1.weight[:4] == 0) and torch.all(tiny.b1.weight[:4] == 0)
    assert torch.all(tiny.c2.weight[:, :4] == 0)
    assert tiny.c1.weight[4:].abs().sum() > 0


def test_save_restore_continues_the_same_search(synthetic, tmp_path):
    model, space, cost = synthetic
    damages = {space.names[0]: [0.0] * 4 + [1.0] * 4, space.names[1]: [1.0] * 8}
    a = make_searcher("aofp", space, cost, budget=None, window=10, probes=1)
    feed(a, damages)
    commit_round(a)
    a.save(str(tmp_path / "s.pkl"))
    b = make_searcher("aofp", space, cost, budget=None, window=10, probes=1)
    b.restore(str(tmp_path / "s.pkl"))
    assert (b.version, b.round, b.alive, b.search, b.stopped) == (a.version, a.round, a.alive, a.search, a.stopped)
    assert b.suggest("n1") == a.suggest("n1")


def test_bad_options_are_named(synthetic):
    _, space, cost = synthetic
    with pytest.raises(Exception, match="aofp"):
        make_searcher("aofp", space, cost, budget=None, probes=0)
