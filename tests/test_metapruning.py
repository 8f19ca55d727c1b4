"""MetaPruning: generated weight shapes on every built-in model, PruningNet training, evolution, resume, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from searchers import make_searcher
from trainables.metapruning import score_widths, train_pruningnet
from widthsearch import CostModel, build_space, load_model, prune, save_checkpoint
from widthsearch.errors import ConfigError
from widthsearch.pruningnet import PruningNet, prefix_keep, sample_widths
from widthsearch.search import _chosen_channels
from widthsearch.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20", "cifar_vgg16", "cifar_mobilenetv2"])
def test_generated_weights_have_exactly_the_profile_shapes(name):
    torch.manual_seed(0)
    model = load_model(name, 10, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    space = build_space(model, x[:1])
    net = PruningNet(model, space, hidden=1).eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():  # a trained-looking meta net: the generated weights depend on the encoding
        for block in net.blocks.values():
            block.fc2.weight.normal_(0, 0.01)
    for widths in (sample_widths(space, rng, 1)[0], space.min_widths):
        pruned = net.materialize(widths).eval()
        state = pruned.state_dict()
        generated = net.cropped(widths)
        assert generated and all(generated[k].shape == state[k].shape for k in generated)
        # the reference: the base model physically pruned to the same prefix channels
        reference = prune(model, space, keep=prefix_keep(space, widths)).state_dict()
        assert all(state[k].shape == reference[k].shape for k in reference)
        with torch.no_grad():  # the dense net with masked weights computes exactly the cropped network
            torch.testing.assert_close(net.logits(widths, x), pruned(x), atol=1e-5, rtol=1e-4)
    if name == "cifar_mobilenetv2":
        depthwise = [k for k, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert depthwise and all(state[f"{k}.weight"].shape[1] == 1 for k in depthwise)
        assert all(state[f"{k}.weight"].shape[0] == generated[f"{k}.weight"].shape[0] for k in depthwise)


def test_pruningnet_starts_at_the_base_weights_cropped():
    model = load_model("cifar_resnet20", 10, in_channels=3).eval()
    space = build_space(model, torch.randn(1, 3, 32, 32))
    widths = sample_widths(space, np.random.default_rng(1), 1)[0]
    generated = PruningNet(model, space, hidden=4).cropped(widths)
    reference = prune(model, space, keep=prefix_keep(space, widths)).state_dict()
    assert all(torch.equal(generated[k], reference[k]) for k in generated)


@pytest.fixture(scope="module")
def digits_space(digits):
    torch.manual_seed(0)
    model = load_model("small_cnn", digits.num_classes, in_channels=digits.in_channels).eval()
    space = build_space(model, digits.example_input)
    return model, space, CostModel(space, model)


def test_trained_pruningnet_beats_random_weights_and_resumes(digits, digits_space, tmp_path):
    model, space, cost = digits_space  # an untrained model: everything it knows comes from PruningNet training
    net = PruningNet(model, space, hidden=8)
    ckpt = tmp_path / "net.pt"
    first = train_pruningnet(net, digits, cost, steps=150, lr=0.05, batch_size=64, seed=0, checkpoint=ckpt, every=50)
    assert first["step"] == 150 and torch.load(ckpt, weights_only=True)["step"] == 150
    resumed = PruningNet(model, space, hidden=8)  # a re-run trial: continues from the checkpoint
    info = train_pruningnet(resumed, digits, cost, steps=300, lr=0.05, batch_size=64, seed=0, checkpoint=ckpt,
                            every=50)
    assert info["step"] == 300 and info["train_s"] > first["train_s"]

    profiles = sample_widths(space, np.random.default_rng(3), 6, cost, (0.2, 0.5))
    meta = [score_widths(resumed, w, digits, bn_batches=5, batch_size=64, seed=0)[0] for w in profiles]
    torch.manual_seed(1)
    fresh = load_model("small_cnn", digits.num_classes, in_channels=digits.in_channels)
    random_net = PruningNet(fresh, space, hidden=8)  # random weights, BN recalibrated the same way
    rand = [score_widths(random_net, w, digits, bn_batches=5, batch_size=64, seed=0)[0] for w in profiles]
    assert np.mean(meta) > np.mean(rand) + 0.3, (meta, rand)


def _drive(searcher, count: int, prefix: str = "t") -> list[dict]:
    """Suggest and complete up to `count` trials (score: more channels is better); returns the configs."""
    configs = []
    for i in range(count):
        config = searcher.suggest(f"{prefix}{i}")
        if config is None or config == "FINISHED":
            break
        configs.append(config)
        payload = json.loads(config["payload"])
        result = {"checkpoint": "net.pt"} if payload["phase"] == "train" else {"score": float(sum(config["widths"]))}
        searcher.on_trial_complete(f"{prefix}{i}", result)
    return configs


@pytest.fixture(scope="module")
def resnet_space():
    model = load_model("cifar_resnet20", 10, in_channels=3).eval()
    space = build_space(model, torch.randn(1, 3, 32, 32))
    return space, CostModel(space, model)


def test_evolution_only_proposes_feasible_new_profiles(resnet_space):
    space, cost = resnet_space
    opts = {"population": 8, "generations": 4, "topk": 3, "mutation_prob": 0.3}
    searcher = make_searcher("metapruning", space, cost, budget=0.3, seed=0, **opts)
    configs = _drive(searcher, 100)
    assert searcher.suggest("last") == "FINISHED"
    train, candidates = configs[0], configs[1:]
    assert json.loads(train["payload"])["phase"] == "train" and len(candidates) == 8 * 4
    widths = np.array([c["widths"] for c in candidates])
    assert np.all(cost.flops_many(widths) <= 0.3 * cost.base_flops)
    assert len({tuple(w) for w in widths}) == len(widths)
    for c in candidates:
        keep = json.loads(c["payload"])["keep"]
        assert all(keep[g] == list(range(w)) for g, w in zip(space.names, c["widths"]) if g in keep)
    by_gen = [np.mean([sum(c["widths"]) for c in candidates[8 * g:8 * g + 8]]) for g in range(4)]
    assert by_gen[-1] > by_gen[0]  # selection pressure towards the (synthetic) better profiles


def test_tight_budget_and_pareto_mode(resnet_space):
    space, cost = resnet_space
    tight = 1.2 * cost.flops(space.minimal()) / cost.base_flops  # random profiles (almost) never fit
    for budget in (tight, None):
        searcher = make_searcher("metapruning", space, cost, budget=budget, seed=0, population=4, generations=2,
                                 topk=2)
        widths = np.array([c["widths"] for c in _drive(searcher, 20)[1:]])
        assert len(widths) == 8
        if budget is not None:
            assert np.all(cost.flops_many(widths) <= budget * cost.base_flops)


def test_searcher_state_resumes(resnet_space, tmp_path):
    space, cost = resnet_space
    opts = {"population": 6, "generations": 3, "topk": 2}
    original = make_searcher("metapruning", space, cost, budget=0.5, seed=1, **opts)
    _drive(original, 10)  # mid-way through generation 1
    original.save(str(tmp_path / "searcher.pkl"))
    restored = make_searcher("metapruning", space, cost, budget=0.5, seed=1, **opts)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert (restored.generation, restored.checkpoint, restored.top) == (original.generation, original.checkpoint,
                                                                         original.top)
    assert _drive(original, 20, "r") == _drive(restored, 20, "r")


@pytest.mark.parametrize("options, message", [({"population": 0}, "population"), ({"topk": 60}, "topk"),
                                              ({"mutation_prob": 2.0}, "mutation_prob"),
                                              ({"train_flops_min": 0.9, "train_flops_max": 0.5}, "train_flops_min"),
                                              ({"speed": 1}, "unknown option")])
def test_bad_options_are_config_errors(resnet_space, options, message):
    with pytest.raises(ConfigError, match=message):
        make_searcher("metapruning", *resnet_space, budget=0.5, **options)


def test_metapruning_search_through_the_cli(digits, tmp_path):
    torch.manual_seed(0)
    model = load_model("small_cnn", digits.num_classes, in_channels=digits.in_channels)
    train(model, digits, steps=60, config=TrainConfig(lr=0.05, batch_size=64))
    ckpt = tmp_path / "base.pt"
    save_checkpoint(model, ckpt, model_source="small_cnn")
    args = ["search", "--name", "mp", "--storage", str(tmp_path), "--checkpoint", str(ckpt), "--searcher",
            "metapruning", "--budget", "0.5", "--num-samples", "50", "--bn-batches", "3", "--concurrency", "2",
            "--quiet", "--option", "train_steps=20", "--option", "checkpoint_every=10", "--option", "population=2",
            "--option", "generations=1", "--option", "topk=2"]
    proc = subprocess.run([sys.executable, "-m", "widthsearch.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    import pyarrow.dataset as ds

    rows = ds.dataset(tmp_path / "mp" / "widthsearch" / "rows", format="parquet").to_table().to_pylist()
    trained = [r for r in rows if r["status"] == "train"]
    candidates = [r for r in rows if r["status"] == "ok"]
    assert len(trained) == 1 and Path(trained[0]["checkpoint"]).is_file()
    assert len(candidates) == 2 and all(r["flops_ratio"] <= 0.5 and r["finetune_steps"] == 0 for r in candidates)
    best = max(candidates, key=lambda r: r["score"])
    keep = _chosen_channels(best)["keep"]  # what `widthsearch retrain` keeps: the prefix channels
    assert keep == prefix_keep(build_space(model, digits.example_input), best["widths"])
