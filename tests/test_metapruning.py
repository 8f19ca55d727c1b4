"""MetaPruning: generated weights (shapes, best channels), PruningNet training, evolution and its sizing, resume,
timeouts, the CLI on URI storage."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from searchers import check_options, make_searcher
from searchers.base import Payload
from searchers.options import evolution_plan
from trainables.metapruning import MetaPruningJob, metapruning_step, score_widths, train_pruningnet
from trainables.retrain import RetrainJob, build_pruned
from widthsearch import CostModel, build_space, load_model, prune, save_checkpoint
from widthsearch.errors import ConfigError, WidthSearchError
from widthsearch.pruningnet import PruningNet, channel_order, keep_channels, sample_widths
from widthsearch.results import chosen_channels
from widthsearch.storage import Storage
from widthsearch.training import TrainConfig, train

from .storage_check import artifacts_under_experiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20", "cifar_vgg16", "cifar_mobilenetv2"])
def test_generated_weights_have_exactly_the_profile_shapes(name):
    torch.manual_seed(0)
    model = load_model(name, 10, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    space = build_space(model, x[:1])
    order = channel_order(model, space, "random")  # a shuffled order: the crop must follow it on every layer
    net = PruningNet(model, space, hidden=1, order=order).eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():  # a trained-looking meta net: the generated weights depend on the encoding
        for block in net.blocks.values():
            block.fc2.weight.normal_(0, 0.01)
    for widths in (sample_widths(space, rng, 1)[0], space.min_widths):
        pruned = net.materialize(widths).eval()
        state = pruned.state_dict()
        generated = net.cropped(widths)
        assert generated and all(generated[k].shape == state[k].shape for k in generated)
        # the reference: the base model physically pruned to the same channels
        reference = prune(model, space, keep=keep_channels(space, order, widths)).state_dict()
        assert all(state[k].shape == reference[k].shape for k in reference)
        with torch.no_grad():  # the dense net with masked weights computes exactly the cropped network
            torch.testing.assert_close(net.logits(widths, x), pruned(x), atol=1e-5, rtol=1e-4)
    if name == "cifar_mobilenetv2":
        depthwise = [k for k, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert depthwise and all(state[f"{k}.weight"].shape[1] == 1 for k in depthwise)
        assert all(state[f"{k}.weight"].shape[0] == generated[f"{k}.weight"].shape[0] for k in depthwise)


def _ranked_model():
    """small_cnn whose channel importances (l1) are known: in every group, channel c has rank[g][c] (0 = best)."""
    torch.manual_seed(0)
    model = load_model("small_cnn", 10, in_channels=1).eval()
    space = build_space(model, torch.zeros(1, 1, 8, 8))
    rank = {}
    with torch.no_grad():
        for g in space.groups:
            rank[g.name] = torch.randperm(g.width, generator=torch.Generator().manual_seed(g.width)).tolist()
            conv = dict(model.named_modules())[g.name]
            for c, r in enumerate(rank[g.name]):  # the group's l1 is dominated by its root conv's filter
                conv.weight[c] = conv.weight[c].sign() * 1000.0 * (g.width - r)
    return model, space, rank


def test_pruningnet_generates_the_base_weights_of_the_most_important_channels():
    model, space, rank = _ranked_model()
    cost = CostModel(space, model)
    widths = [g.width // 2 for g in space.groups]
    best = {g.name: sorted(c for c, r in enumerate(rank[g.name]) if r < w) for g, w in zip(space.groups, widths)}
    order = channel_order(model, space, "l1")
    assert keep_channels(space, order, widths) == best
    generated = PruningNet(model, space, hidden=4, order=order).cropped(widths)
    convs = dict(model.named_modules())
    inputs = [slice(None)] + [best[g.name] for g in space.groups[:-1]]  # small_cnn: group i feeds group i + 1
    for g, cols in zip(space.groups, inputs):  # each conv's generated filters: the base filters of the best channels
        base = convs[g.name].weight[best[g.name]][:, cols]
        torch.testing.assert_close(generated[f"{g.name}.weight"], base, rtol=0, atol=0)
    reference = prune(model, space, keep=best).state_dict()
    assert all(torch.equal(generated[k], reference[k]) for k in generated)
    # the searcher proposes those channels to retrain (payload "keep"), for every candidate
    searcher = make_searcher("metapruning", space, cost, budget=0.6, model=model, seed=0, population=4,
                             generations=2)
    for config in _drive(searcher, 6)[1:]:
        assert config["payload"]["keep"] == keep_channels(space, order, config["widths"])
        chosen = {g: sorted(c for c, r in enumerate(rank[g]) if r < w) for g, w in zip(space.names, config["widths"])}
        assert config["payload"]["keep"] == {g: k for g, k in chosen.items() if len(k) < space[g].width}


@pytest.mark.parametrize("criterion", ["l1", "bn_scale"])
def test_first_w_is_best_w_under_the_experiments_criterion_and_retrain_keeps_those_channels(criterion):
    model, space, l1_rank = _ranked_model()
    modules = dict(model.named_modules())
    bn_rank = {}
    with torch.no_grad():  # a second ranking, by BN scale, that disagrees with the l1 one (too small to change it)
        for g in space.groups:
            bn_rank[g.name] = [(r + g.width // 2) % g.width for r in l1_rank[g.name]]
            bn = modules[f"features.{int(g.name.split('.')[1]) + 1}"]  # small_cnn: conv i, then its BN at i + 1
            bn.weight.copy_(0.1 * (g.width - torch.tensor(bn_rank[g.name], dtype=torch.float32)))
    rank = {"l1": l1_rank, "bn_scale": bn_rank}[criterion]
    assert l1_rank != bn_rank
    cost = CostModel(space, model)
    searcher = make_searcher("metapruning", space, cost, budget=0.6, model=model, criterion=criterion, seed=0,
                             population=4, generations=2)
    configs = _drive(searcher, 9)
    train_payload = configs[0]["payload"]
    # the PruningNet's order (what the training trial builds it with): every group's channels, best first
    assert train_payload["criterion"] == criterion
    assert train_payload["order"] == {g: sorted(range(len(r)), key=r.__getitem__) for g, r in rank.items()}
    net = PruningNet(model, space, hidden=4, order=train_payload["order"])
    assert len(configs) == 9
    for config in configs[1:]:
        widths = config["widths"]
        best = {g.name: sorted(c for c, r in enumerate(rank[g.name]) if r < w) for g, w in zip(space.groups, widths)}
        keep = chosen_channels({"payload": json.dumps(dict(config["payload"]))})["keep"]  # what `retrain` reads of a row
        assert keep == {g: k for g, k in best.items() if len(k) < space[g].width}
        job = RetrainJob(model=model, space=space, cost=cost, measure=cost.measure("flops"), data="digits",
                         val_fraction=0.1, split_seed=0, seed=0, criterion=criterion, importance_batches=1,
                         bn_batches=1, batch_size=8, widths=widths, epochs=1, lr=0.1, from_scratch=False,
                         model_source="small_cnn", num_classes=10, in_channels=1, keep=keep)
        retrained = build_pruned(job, torch.device("cpu")).state_dict()  # the model retrain starts from
        candidate = net.materialize(widths).state_dict()  # the candidate the search scored (before training)
        assert retrained.keys() == candidate.keys()
        for k in retrained:  # the same channels: the untrained PruningNet generates their base weights
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(retrained[k], candidate[k]), k


def test_channel_order_must_be_a_permutation():
    model, space, _ = _ranked_model()
    with pytest.raises(WidthSearchError, match="channel order of group 'features.0' is not a permutation of its 16"):
        PruningNet(model, space, order={**channel_order(model, space), "features.0": [0, 0, 1]})


@pytest.fixture(scope="module")
def digits_space(digits):
    torch.manual_seed(0)
    model = load_model("small_cnn", digits.num_classes, in_channels=digits.in_channels).eval()
    space = build_space(model, digits.example_input)
    return model, space, CostModel(space, model)


def test_trained_pruningnet_beats_random_weights_and_resumes(digits, digits_space, tmp_path):
    model, space, cost = digits_space  # an untrained model: everything it knows comes from PruningNet training
    net = PruningNet(model, space, hidden=8, order=channel_order(model, space, "random"))
    store = Storage(tmp_path.as_uri())  # checkpoints go through pyarrow.fs, as on s3://
    first = train_pruningnet(net, digits, cost, steps=150, lr=0.05, batch_size=64, seed=0, store=store,
                             name="metapruning/net.pt", every=50)
    saved = store.load_torch("metapruning/net.pt")
    assert first["step"] == 150 and saved["step"] == 150 and saved["order"] == net.order and saved["hidden"] == 8
    assert (tmp_path / "widthsearch" / "metapruning" / "net.pt").is_file()
    resumed = PruningNet(model, space, hidden=8, order=saved["order"])  # a re-run trial: continues from it
    info = train_pruningnet(resumed, digits, cost, steps=300, lr=0.05, batch_size=64, seed=0, store=store,
                            name="metapruning/net.pt", every=50)
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
        payload = config["payload"]
        result = {"checkpoint": "net.pt"} if payload["phase"] == "train" else {"score": float(sum(config["widths"]))}
        searcher.on_trial_complete(f"{prefix}{i}", result)
    return configs


@pytest.fixture(scope="module")
def resnet_space():
    model = load_model("cifar_resnet20", 10, in_channels=3).eval()
    space = build_space(model, torch.randn(1, 3, 32, 32))
    return space, CostModel(space, model), model


def test_evolution_only_proposes_feasible_new_profiles(resnet_space):
    space, cost, model = resnet_space
    opts = {"population": 8, "generations": 4, "topk": 3, "mutation_prob": 0.3}
    searcher = make_searcher("metapruning", space, cost, budget=0.3, seed=0, model=model, **opts)
    configs = _drive(searcher, 100)
    assert searcher.suggest("last") == "FINISHED"
    train, candidates = configs[0], configs[1:]
    assert train["payload"]["phase"] == "train" and len(candidates) == 8 * 4
    widths = np.array([c["widths"] for c in candidates])
    assert np.all(cost.flops_many(widths) <= 0.3 * cost.base_flops)
    assert len({tuple(w) for w in widths}) == len(widths)
    order = channel_order(model, space, "l1")
    for c in candidates:
        payload = c["payload"]
        assert payload["keep"] == keep_channels(space, order, c["widths"])
        assert (payload["population"], payload["generations"], payload["topk"]) == (8, 4, 3)
    by_gen = [np.mean([sum(c["widths"]) for c in candidates[8 * g:8 * g + 8]]) for g in range(4)]
    assert by_gen[-1] > by_gen[0]  # selection pressure towards the (synthetic) better profiles


def test_a_mutated_gene_always_changes(resnet_space):
    space, cost, model = resnet_space
    searcher = make_searcher("metapruning", space, cost, budget=0.5, model=model, mutation_prob=1.0)
    parent = space.min_widths[None]
    legal = [np.array([w, w + 1]) for w in space.min_widths]  # two choices per gene: a no-op draw is likely
    for _ in range(10):
        assert np.all(searcher._mutant(parent, legal) == space.min_widths + 1)


def test_tight_budget_and_pareto_mode(resnet_space):
    space, cost, model = resnet_space
    tight = 1.2 * cost.flops(space.minimal()) / cost.base_flops  # random profiles (almost) never fit
    for budget in (tight, None):
        searcher = make_searcher("metapruning", space, cost, budget=budget, seed=0, model=model, population=4,
                                 generations=2, topk=2)
        widths = np.array([c["widths"] for c in _drive(searcher, 20)[1:]])
        assert len(widths) == 8
        if budget is not None:
            assert np.all(cost.flops_many(widths) <= budget * cost.base_flops)


def test_searcher_state_resumes(resnet_space, tmp_path):
    space, cost, model = resnet_space
    opts = {"population": 6, "generations": 3, "topk": 2}
    original = make_searcher("metapruning", space, cost, budget=0.5, seed=1, model=model, **opts)
    _drive(original, 10)  # mid-way through generation 1
    original.save(str(tmp_path / "searcher.pkl"))
    restored = make_searcher("metapruning", space, cost, budget=0.5, seed=1, model=model, **opts)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert (restored.generation, restored.checkpoint, restored.top) == (original.generation, original.checkpoint,
                                                                         original.top)
    assert _drive(original, 20, "r") == _drive(restored, 20, "r")


@pytest.mark.parametrize("options, message", [
    ({"population": 0}, "searcher 'metapruning': option 'population' must be an integer >= 1, or empty for automatic, "
                        "got 0"),
    ({"generations": "abc"}, "searcher 'metapruning': option 'generations' must be an integer >= 1, or empty for "
                             "automatic, got 'abc'"),
    ({"topk": 60}, "searcher 'metapruning': option 'topk' (60) exceeds 'population' (50)"),
    ({"topk": 9, "population": 4}, "searcher 'metapruning': option 'topk' (9) exceeds 'population' (4)"),
    ({"mutation_prob": 2.0}, "searcher 'metapruning': option 'mutation_prob' must be a number in [0, 1], got 2.0"),
    ({"lr": 0}, "searcher 'metapruning': option 'lr' must be a number > 0, got 0"),
    ({"train_steps": 1.5}, "searcher 'metapruning': option 'train_steps' must be an integer >= 1, got 1.5"),
    ({"train_flops_min": 0.9, "train_flops_max": 0.5},
     "searcher 'metapruning': option 'train_flops_min' (0.9) must be below 'train_flops_max' (0.5)"),
    ({"bn_batches": 0}, "searcher 'metapruning': option 'bn_batches' must be an integer >= 1, got 0"),
    ({"speed": 1}, "unknown option 'speed' for searcher 'metapruning'; accepted options: bn_batches, "
                   "checkpoint_every, generations, hidden, lr, mutation_prob, population, topk, train_flops_max, "
                   "train_flops_min, train_steps"),
])
def test_bad_options_are_config_errors(resnet_space, options, message):
    with pytest.raises(ConfigError) as early:  # the cheap check `widthsearch search` runs before any work
        check_options("metapruning", options)
    assert str(early.value) == message
    space, cost, model = resnet_space
    with pytest.raises(ConfigError) as info:  # and the same one from the constructor
        make_searcher("metapruning", space, cost, budget=0.5, model=model, **options)
    assert str(info.value) == message


def test_it_needs_the_model_and_batches_for_data_driven_criteria(resnet_space):
    space, cost, model = resnet_space
    with pytest.raises(ConfigError, match="needs the base model"):
        make_searcher("metapruning", space, cost, budget=0.5)
    with pytest.raises(ConfigError, match="criterion 'taylor' needs training batches"):
        make_searcher("metapruning", space, cost, budget=0.5, model=model, criterion="taylor")


NO_SIZES = {"population": None, "generations": None, "topk": None}


@pytest.mark.parametrize("num_samples, given, plan", [
    (None, {}, (50, 20, 10)),            # unknown budget (Python): the paper's sizes
    (1001, {}, (50, 20, 10)),            # enough for the paper's 1 + 50 x 20
    (5000, {}, (50, 20, 10)),
    (101, {}, (15, 6, 3)),               # population ~ sqrt(2.5 x 100), generations as many as fit
    (9, {}, (4, 2, 2)),
    (8, {}, (3, 2, 2)),                  # population capped at half the candidates: a second generation fits
    (5, {}, (2, 2, 2)),                  # the smallest automatic evolution: one generation after the random one
    (101, {"population": 10}, (10, 10, 2)),
    (101, {"generations": 4}, (25, 4, 5)),
    (41, {"population": 8, "generations": 5, "topk": 3}, (8, 5, 3)),
])
def test_evolution_is_sized_from_num_samples(num_samples, given, plan):
    assert tuple(evolution_plan({**NO_SIZES, **given}, num_samples).values()) == plan
    assert 1 + plan[0] * plan[1] <= (num_samples or 1001)


def test_automatic_sizing_accepts_every_num_samples_from_the_smallest_evolution_up():
    for num_samples in range(5, 1101):  # never refused past the first one that works; always fits; never random
        plan = evolution_plan(NO_SIZES, num_samples)
        assert 2 <= plan["topk"] <= plan["population"] and plan["generations"] >= 2, (num_samples, plan)
        assert 1 + plan["population"] * plan["generations"] <= num_samples


@pytest.mark.parametrize("num_samples, given, text", [
    (4, {}, "num_samples 4 leaves the evolution only its random generation (population 2 x generations 1); "
            "give num_samples >= 5 for one generation of mutation and crossover, or set 'generations'"),
    (2, {}, "num_samples 2 leaves the evolution no generation (population 2 x generations 0)"),
    (5, {"generations": 10}, "num_samples 5 leaves 4 candidate trials after the PruningNet training trial, fewer "
                             "than 'generations' (10); give num_samples >= 11"),
    (40, {"population": 8, "generations": 5}, "num_samples 40 does not cover 1 + population x generations = "
                                              "1 + 8 x 5 = 41 trials"),
    (30, {"population": 20}, "give num_samples >= 41 for one generation of mutation and crossover"),
])
def test_a_budget_that_leaves_the_search_random_is_refused(resnet_space, num_samples, given, text):
    space, cost, model = resnet_space
    with pytest.raises(ConfigError) as info:
        make_searcher("metapruning", space, cost, budget=0.5, model=model, num_samples=num_samples, **given)
    assert str(info.value).startswith("searcher 'metapruning': ") and text in str(info.value)
    with pytest.raises(ConfigError) as early:  # the cheap check `widthsearch search` runs before any work
        check_options("metapruning", given, num_samples)
    assert str(early.value) == str(info.value)


def test_the_plan_sized_from_num_samples_is_what_runs(resnet_space):
    space, cost, model = resnet_space
    searcher = make_searcher("metapruning", space, cost, budget=0.5, model=model, num_samples=21)
    configs = _drive(searcher, 100)
    plan = evolution_plan(NO_SIZES, 21)  # 20 candidates: population 7 x 2 generations
    assert plan == {"population": 7, "generations": 2, "topk": 2} and searcher.suggest("x") == "FINISHED"
    assert len(configs) == 1 + 7 * 2 <= 21
    assert all({k: c["payload"][k] for k in plan} == plan for c in configs)


def _job(model, space, exp_dir: str, timeout: float | None) -> MetaPruningJob:
    cost = CostModel(space, model)
    return MetaPruningJob(model=model, space=space, cost=cost, measure=cost.measure("flops"), data="digits",
                          val_fraction=0.1, split_seed=0, seed=0, criterion="l1", importance_batches=1,
                          bn_batches=2, batch_size=32, exp_dir=exp_dir, trial_timeout_s=timeout)


def test_training_and_candidate_trials_honour_trial_timeout_s(digits_space, tmp_path, monkeypatch):
    import trainables.common as common
    import trainables.metapruning as trainable

    model, space, _ = digits_space
    reports = []
    monkeypatch.setattr(common, "setup_trial", lambda: (torch.device("cpu"), "node"))  # begin_trial's Tune context
    monkeypatch.setattr(trainable.tune, "report", reports.append)
    order = channel_order(model, space)
    # the payloads as the searcher hands them to its trials
    train_payload = Payload({"phase": "train", "net": "n", "steps": 4, "lr": 0.01, "hidden": 2, "every": 2,
                             "seed": 0, "flops_min": 0.0, "flops_max": 1.0, "order": order})
    widths = [int(w) for w in space.min_widths]
    candidate = Payload({"phase": "candidate", "net": "n", "bn_batches": 2, "keep": {}})
    exp_dir = tmp_path.as_uri()
    metapruning_step({"widths": widths, "payload": train_payload}, _job(model, space, exp_dir, None))
    assert reports[-1]["status"] == "train" and reports[-1]["checkpoint"] == f"{exp_dir}/widthsearch/metapruning/n.pt"
    metapruning_step({"widths": widths, "payload": candidate}, _job(model, space, exp_dir, 600))
    assert 0 <= reports[-1]["score"] <= 1
    for payload in (train_payload, candidate):  # a deadline far shorter than either trial
        with pytest.raises(TimeoutError, match="trial exceeded trial_timeout_s=0.001"):
            metapruning_step({"widths": widths, "payload": payload}, _job(model, space, exp_dir, 0.001))
    for thread in threading.enumerate():  # the timed-out bodies finish in the background: let them, before the
        if thread.name == "widthsearch-trial":  # monkeypatched report is undone
            thread.join()


def test_metapruning_search_through_the_cli_on_uri_storage(digits, tmp_path):
    torch.manual_seed(0)
    model = load_model("small_cnn", digits.num_classes, in_channels=digits.in_channels)
    train(model, digits, steps=60, config=TrainConfig(lr=0.05, batch_size=64))
    ckpt = tmp_path / "base.pt"
    save_checkpoint(model, ckpt, model_source="small_cnn")
    storage = (tmp_path / "store").as_uri()  # file:///...: read and written through pyarrow.fs, like s3://
    args = ["search", "--name", "mp", "--storage", storage, "--checkpoint", str(ckpt), "--searcher",
            "metapruning", "--budget", "0.5", "--num-samples", "3", "--bn-batches", "3", "--concurrency", "2",
            "--quiet", "--option", "train_steps=20", "--option", "checkpoint_every=10", "--option", "population=2",
            "--option", "generations=1", "--option", "topk=2", "--option", "bn_batches=2"]
    proc = subprocess.run([sys.executable, "-m", "widthsearch.app.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    from widthsearch.results import load

    rows = load(f"{storage}/mp").to_pylist()
    trained = [r for r in rows if r["status"] == "train"]
    candidates = [r for r in rows if r["status"] == "ok"]
    # every artifact under the experiment (rows, metadata, searcher state, PruningNet), none beside the checkout
    state = artifacts_under_experiment(tmp_path / "store", "mp", [r["trial_id"] for r in rows])
    checkpoint = f"{storage}/mp/widthsearch/metapruning/pruningnet-s0.pt"
    assert len(rows) == 3 and len(trained) == 1 and trained[0]["checkpoint"] == checkpoint
    assert sorted(p.name for p in (tmp_path / "store" / "mp" / "widthsearch" / "metapruning").iterdir()) == \
        ["pruningnet-s0.pt"]
    assert (state["phase"], state["checkpoint"], state["num_samples"]) == ("evolve", checkpoint, 3)
    saved = Storage(f"{storage}/mp").load_torch("metapruning/pruningnet-s0.pt")
    assert saved["step"] == 20 and saved["order"] == channel_order(model, build_space(model, digits.example_input))
    assert len(candidates) == 2 and all(r["flops_ratio"] <= 0.5 and r["steps_reached"] == 0 for r in candidates)
    best = max(candidates, key=lambda r: r["score"])
    keep = chosen_channels(best)["keep"]  # what `widthsearch retrain` keeps: the best channels (l1) of the base
    space = build_space(model, digits.example_input)
    assert keep == keep_channels(space, channel_order(model, space, "l1"), best["widths"])


def test_cli_refuses_a_num_samples_that_leaves_the_evolution_random(tmp_path):
    args = ["search", "--name", "mp", "--storage", str(tmp_path), "--searcher", "metapruning", "--num-samples", "4",
            "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "widthsearch.app.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "num_samples 4 leaves the evolution only its random generation" in proc.stderr
    assert "Traceback" not in proc.stderr and "training a base" not in proc.stderr
    assert not (tmp_path / "mp").exists()  # refused before any data was loaded or base model trained
