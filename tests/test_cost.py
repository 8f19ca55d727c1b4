"""Tests for widthsearch.cost: the CostModel equals torch-pruning's count on the pruned model."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch_pruning as tp

from widthsearch import CostModel, build_space, load_model, prune
from widthsearch.errors import ProfileError, WidthSearchError

SLOW = {"cifar_resnet110", "torchvision:densenet121"}
MODELS = ["small_cnn", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110", "cifar_vgg16",
          "cifar_mobilenetv2", "torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2",
          "torchvision:densenet121"]
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS]


def example(name: str) -> torch.Tensor:
    size = 64 if name.startswith("torchvision:") else 32
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def random_profile(space, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {g.name: int(rng.integers(g.min_width, g.width + 1)) for g in space.groups}


def count(model, x) -> tuple[int, int]:
    flops, params = tp.utils.count_ops_and_params(model, x)
    return flops, params


class Built:
    def __init__(self, name: str):
        self.x = example(name)
        self.model = load_model(name).eval()
        self.space = build_space(self.model, self.x)
        self.cost = CostModel(self.space)  # no model passed: the space keeps a reference


@pytest.fixture(scope="module")
def built():
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = Built(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", PARAMS)
def test_exact_on_dense_and_pruned_models(built, name):
    b = built(name)
    flops, params = count(b.model, b.x)
    assert (b.cost.base_flops, b.cost.base_params) == (flops, params)
    assert (b.cost.flops(b.space.full()), b.cost.params(b.space.full())) == (flops, params)
    assert isinstance(b.cost.base_flops, int) and isinstance(b.cost.base_params, int)

    # profile 0: l1-ranked channels; 1: random explicit channels (cheaper on densenet: no ranking);
    # 2 (small models only): random-criterion channels
    n_profiles = 3 if name.startswith("cifar_") and name not in SLOW or name == "small_cnn" else 2
    profiles = [random_profile(b.space, seed) for seed in range(n_profiles)]
    for seed, profile in enumerate(profiles):
        if seed == 1:
            rng = np.random.default_rng(seed)
            keep = {n: rng.choice(b.space[n].width, size=w, replace=False).tolist() for n, w in profile.items()}
            pruned = prune(b.model, b.space, keep=keep)
        else:
            pruned = prune(b.model, b.space, profile, criterion="random" if seed else "l1")
        assert (b.cost.flops(profile), b.cost.params(profile)) == count(pruned, b.x), profile
        assert b.cost.flops(profile) < flops and b.cost.params(profile) < params

    profiles += [b.space.full(), b.space.minimal(), b.space.uniform(0.5)]
    stack = np.stack([b.space.vector(p) for p in profiles])
    np.testing.assert_array_equal(b.cost.flops_many(stack), [b.cost.flops(p) for p in profiles])
    np.testing.assert_array_equal(b.cost.params_many(stack), [b.cost.params(p) for p in profiles])
    assert b.cost.flops_many(stack[0]).shape == (1,)  # one vector: a batch of one


def test_uniform_half_resnet56(built):
    b = built("cifar_resnet56")
    ratio = b.cost.flops_ratio(b.space.uniform(0.5))
    assert 0.25 <= ratio <= 0.5
    assert b.cost.flops_ratio(b.space.full()) == 1.0
    assert b.cost.params(b.space.uniform(0.5)) / b.cost.base_params < 0.5


def test_monotone(built):
    b = built("cifar_resnet20")
    space, cost = b.space, b.cost
    rng = np.random.default_rng(0)
    # removing one channel from any group strictly lowers FLOPs and params
    for seed in range(3):
        profile = random_profile(space, seed)
        f, p = cost.flops(profile), cost.params(profile)
        for g in space.groups:
            if profile[g.name] > g.min_width:
                smaller = {**profile, g.name: profile[g.name] - 1}
                assert cost.flops(smaller) < f and cost.params(smaller) < p, g.name
    # vectorised: W' <= W elementwise => cost(W') <= cost(W)
    lo, hi = space.min_widths, space.widths
    w = rng.integers(lo, hi + 1, size=(500, len(space)))
    w2 = rng.integers(lo, w + 1)
    assert np.all(cost.flops_many(w2) <= cost.flops_many(w))
    assert np.all(cost.params_many(w2) <= cost.params_many(w))
    assert np.all(cost.flops_many(w) <= cost.base_flops)
    assert np.all(cost.flops_many(np.stack([lo])) > 0)


def test_validates_profiles(built):
    b = built("small_cnn")
    with pytest.raises(ProfileError, match="unknown channel group 'nope'"):
        b.cost.flops({"nope": 1})
    with pytest.raises(ProfileError, match="width of group 'features.3' is 33, above its original width 32"):
        b.cost.params({"features.3": 33})
    # missing groups keep their full width
    assert b.cost.flops({"features.3": 32}) == b.cost.base_flops


def test_batch_size_of_example_input_gives_per_image_flops(built):
    b = built("cifar_resnet20")
    x2 = torch.randn(2, 3, 32, 32)
    space2 = build_space(b.model, x2)
    cost2 = CostModel(space2)
    profile = random_profile(space2, 5)
    assert cost2.params(profile) == b.cost.params(profile)
    assert abs(cost2.flops(profile) - b.cost.flops(profile)) <= 10  # linear biases count once per batch
    assert cost2.flops(profile) == count(prune(b.model, space2, profile), x2)[0]


def test_pickle(built):
    b = built("cifar_resnet20")
    assert b.space.model is b.model
    space = pickle.loads(pickle.dumps(b.space))
    assert space.model is None
    with pytest.raises(WidthSearchError, match="CostModel needs the model: pass it, or a space fresh from build_space"):
        CostModel(space)
    profile = random_profile(b.space, 1)
    again = CostModel(space, b.model)  # the model may be given explicitly
    assert again.flops(profile) == b.cost.flops(profile)

    cost = pickle.loads(pickle.dumps(b.cost))
    assert cost.space.model is None
    assert (cost.base_flops, cost.base_params) == (b.cost.base_flops, b.cost.base_params)
    assert (cost.flops(profile), cost.params(profile)) == (b.cost.flops(profile), b.cost.params(profile))
    w = np.stack([b.space.vector(profile), b.space.widths])
    np.testing.assert_array_equal(cost.flops_many(w), b.cost.flops_many(w))


def test_cost_model_does_not_touch_the_model(built):
    b = built("small_cnn")
    model = b.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    CostModel(b.space)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()


class _Head(torch.nn.Module):
    def __init__(self, act: torch.nn.Module, recurrent: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.act = act
        self.gru = torch.nn.GRUCell(8, 4) if recurrent else None
        self.fc = torch.nn.Linear(4 if recurrent else 8, 2)

    def forward(self, x):
        h = self.act(self.conv(x)).mean((2, 3))
        return self.fc(self.gru(h) if self.gru is not None else h)


def test_layers_torch_pruning_does_not_count_are_ignored():
    model, x = _Head(torch.nn.SiLU()), torch.randn(1, 3, 8, 8)  # SiLU: not in op_counter's table
    space = build_space(model, x)
    cost = CostModel(space)
    assert cost.base_flops == count(model, x)[0]
    assert cost.flops({"conv": 3}) == count(prune(model, space, {"conv": 3}), x)[0]


def test_unsupported_layer_is_reported():
    model = _Head(torch.nn.ReLU(), recurrent=True)
    space = build_space(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(WidthSearchError, match="CostModel cannot model layer type GRUCell"):
        CostModel(space)
