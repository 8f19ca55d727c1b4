"""Tests for widthsearch.surgery: physical pruning, masking and channel selection by criterion."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from widthsearch import CRITERIA, CostModel, build_space, load_model, mask, prune, select_channels
from widthsearch.errors import ProfileError, WidthSearchError
from widthsearch.importance import score_channels
from widthsearch.space import dependency_graph, root_group

X32 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomise(model: nn.Module, seed: int = 0, negative: float = 0.0) -> nn.Module:
    """Random BN affine parameters and statistics, so BN channels differ (and zeroed BN outputs matter).

    A fraction `negative` (in expectation) of the BN scales is negative.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                sign = torch.where(torch.rand(m.num_features, generator=gen) < negative, -1.0, 1.0) if negative else 1.0
                m.weight.copy_(sign * (torch.rand(m.num_features, generator=gen) + 0.5))
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def random_profile(space, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {g.name: int(rng.integers(g.min_width, g.width)) for g in space.groups}  # every group shrinks


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def out_width(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def batches(n: int = 2, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=gen), torch.randint(0, 10, (size,), generator=gen))
            for _ in range(n)]


@pytest.fixture(scope="module")
def resnet20():
    model = randomise(load_model("cifar_resnet20"))
    return model, build_space(model, X32)


@pytest.fixture(scope="module")
def small():
    model = randomise(load_model("small_cnn"))
    return model, build_space(model, X32)


# --------------------------------------------------------------------------- prune


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20", "cifar_mobilenetv2"])
def test_prune_shapes_match_profile(name):
    model = randomise(load_model(name))
    space = build_space(model, X32)
    before = snapshot(model)
    profile = random_profile(space, 0)
    pruned = prune(model, space, profile)
    assert pruned is not model
    assert_same_state(model, before)  # the original is untouched
    modules = dict(pruned.named_modules())
    for g in space.groups:
        assert out_width(modules[g.name]) == profile[g.name], g.name
        for layer in g.layers:  # every BN of the group has the group's width
            if isinstance(modules[layer], nn.BatchNorm2d):
                assert modules[layer].num_features == profile[g.name], (g.name, layer)
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    flops, params = tp.utils.count_ops_and_params(pruned, X32)
    cost = CostModel(space)
    assert (flops, params) == (cost.flops(profile), cost.params(profile))


def test_prune_resnet20_consumers(resnet20):
    model, space = resnet20
    profile = space.uniform(0.5)
    profile["layer3.0.shortcut.0"] = 40
    pruned = prune(model, space, profile)
    assert pruned.conv1.out_channels == 8 and pruned.bn1.num_features == 8
    assert pruned.layer1[0].conv2.out_channels == 8 and pruned.layer1[2].bn2.num_features == 8
    assert pruned.layer1[0].conv1.in_channels == 8 and pruned.layer1[0].conv2.in_channels == 8
    assert pruned.layer2[0].shortcut[0].in_channels == 8
    assert pruned.layer3[2].conv2.out_channels == 40 and pruned.fc.in_features == 40
    assert pruned.fc.out_features == 10  # the classifier's output is never pruned


def test_prune_full_profile_is_a_copy(small):
    model, space = small
    pruned = prune(model, space, space.full())
    assert pruned is not model
    assert_same_state(pruned, snapshot(model))
    assert pruned.features[0].weight.data_ptr() != model.features[0].weight.data_ptr()


def test_prune_keeps_train_eval_mode(small):
    model, space = small
    model.train()
    try:
        assert prune(model, space, space.uniform(0.5)).training
        assert model.training
    finally:
        model.eval()
    assert not prune(model, space, space.uniform(0.5)).training


def test_prune_rejects_bad_profiles(small):
    model, space = small
    with pytest.raises(ProfileError, match="width of group 'features.3' is 40, above its original width 32"):
        prune(model, space, {"features.3": 40})
    with pytest.raises(ProfileError, match="unknown channel group 'fc'"):
        prune(model, space, {"fc": 5})
    with pytest.raises(ProfileError, match="a width profile is a mapping"):
        prune(model, space)


# --------------------------------------------------------------------------- mask


@pytest.mark.parametrize("fixture", ["small", "resnet20"])
@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_mask_equals_prune(request, fixture, criterion):
    model, space = request.getfixturevalue(fixture)
    before = snapshot(model)
    profile = random_profile(space, 3)
    pruned = prune(model, space, profile, criterion=criterion)
    masked = mask(model, space, profile, criterion=criterion)
    assert_same_state(model, before)
    shapes = {k: v.shape for k, v in masked.state_dict().items()}
    assert shapes == {k: v.shape for k, v in before.items()}  # full size
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense, p, m = model(x), pruned.eval()(x), masked.eval()(x)
    torch.testing.assert_close(m, p, atol=1e-5, rtol=1e-5)
    assert (dense - p).abs().max() > 1e-2  # pruning did change the function


def test_mask_zeroes_dropped_channels(small):
    model, space = small
    keep = {"features.3": [1, 4, 9, 30]}
    masked = mask(model, space, keep=keep)
    dropped = [i for i in range(32) if i not in keep["features.3"]]
    f = masked.features
    assert torch.all(f[3].weight[dropped] == 0) and torch.all(f[4].weight[dropped] == 0)
    assert torch.all(f[4].bias[dropped] == 0) and torch.all(f[7].weight[:, dropped] == 0)
    assert torch.equal(f[3].weight[keep["features.3"]], model.features[3].weight[keep["features.3"]])
    assert torch.equal(f[0].weight, model.features[0].weight)  # other groups untouched


# --------------------------------------------------------------------------- criteria


def full_groups(model: nn.Module, space, names):
    graph = dependency_graph(model, space.example_input)
    modules = dict(model.named_modules())
    return {n: root_group(graph, modules[n], range(space[n].width)) for n in names}


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_criterion_keeps_highest_scores(resnet20, criterion):
    model, space = resnet20
    data = batches() if CRITERIA[criterion].needs_batches else None
    profile = random_profile(space, 7)
    before = snapshot(model)
    kept = select_channels(model, space, profile, criterion, batches=data, seed=3)
    assert_same_state(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert set(kept) == set(space.names)

    work = copy.deepcopy(model)
    scores = score_channels(criterion, work, full_groups(work, space, space.names), data, seed=3)
    for name, idxs in kept.items():
        assert len(idxs) == profile[name] and idxs == sorted(set(idxs))
        s = scores[name]
        assert s.shape == (space[name].width,) and torch.isfinite(s).all()
        dropped = [i for i in range(space[name].width) if i not in set(idxs)]
        assert s[idxs].min() >= s[dropped].max(), (criterion, name)
    distinct = [n for n in kept if len(set(scores[n].tolist())) == space[n].width]
    assert len(distinct) >= len(kept) // 2  # the ranking is informative, not all ties

    pruned = prune(model, space, profile, criterion, batches=data, seed=3)
    modules, original = dict(pruned.named_modules()), dict(model.named_modules())
    for name, idxs in kept.items():
        # the root's inputs belong to the group that feeds it (if any): slice both dims
        feeding = [g.name for g in space.groups if g.name != name and name in g.layers]
        weight = original[name].weight[idxs]
        if feeding:
            (source,) = feeding
            weight = weight[:, kept[source]]
        assert torch.equal(modules[name].weight, weight), name
    assert_same_state(model, before)


def test_l1_removes_the_smallest_filters(small):
    model, space = small
    model = copy.deepcopy(model)
    tiny = [2, 5, 11, 17, 29]
    with torch.no_grad():  # shrink every coupled weight of these channels of group features.3
        model.features[3].weight[tiny] *= 1e-3
        model.features[4].weight[tiny] *= 1e-3
        model.features[4].bias[tiny] *= 1e-3
        model.features[7].weight[:, tiny] *= 1e-3
    profile = {"features.3": 32 - len(tiny)}
    expected = [i for i in range(32) if i not in tiny]
    assert select_channels(model, space, profile, "l1") == {"features.3": expected}
    pruned = prune(model, space, profile, "l1")
    assert torch.equal(pruned.features[3].weight, model.features[3].weight[expected])
    assert torch.equal(pruned.features[4].running_mean, model.features[4].running_mean[expected])
    assert torch.equal(pruned.features[7].weight, model.features[7].weight[:, expected])
    # dropping fewer channels drops a subset of the tiny ones
    kept = select_channels(model, space, {"features.3": 30}, "l1")["features.3"]
    assert set(expected) <= set(kept) and len(set(kept) & set(tiny)) == 3


def test_random_criterion_depends_on_seed(resnet20):
    model, space = resnet20
    profile = space.uniform(0.5)
    a = select_channels(model, space, profile, "random", seed=1)
    assert a == select_channels(model, space, profile, "random", seed=1)
    assert a != select_channels(model, space, profile, "random", seed=2)


@pytest.mark.parametrize("criterion", ["taylor", "frs"])
def test_data_criteria_need_batches(small, criterion):
    model, space = small
    for call in (prune, mask, select_channels):
        with pytest.raises(WidthSearchError, match=f"importance criterion '{criterion}' needs data batches"):
            call(model, space, space.uniform(0.5), criterion)
    with pytest.raises(WidthSearchError, match="needs data batches"):
        prune(model, space, space.uniform(0.5), criterion, batches=[])


def test_unknown_criterion(small):
    model, space = small
    with pytest.raises(WidthSearchError) as info:
        prune(model, space, space.uniform(0.5), "l3")
    text = str(info.value)
    assert "unknown importance criterion 'l3'" in text
    assert all(name in text for name in CRITERIA)


# --------------------------------------------------------------------------- keep


def test_explicit_keep(small):
    model, space = small
    keep = {"features.3": [30, 0, 7, 7, 12], "features.7": list(range(0, 64, 2))}
    pruned = prune(model, space, keep=keep)
    assert pruned.features[0].out_channels == 16  # not listed: full width
    assert torch.equal(pruned.features[3].weight, model.features[3].weight[[0, 7, 12, 30]])
    assert torch.equal(pruned.features[7].weight, model.features[7].weight[::2][:, [0, 7, 12, 30]])
    assert torch.equal(pruned.fc.weight, model.fc.weight[:, ::2])
    masked = mask(model, space, keep=keep)
    with torch.no_grad():
        torch.testing.assert_close(masked(X32), pruned(X32), atol=1e-5, rtol=1e-5)


def test_bad_keep(small):
    model, space = small
    with pytest.raises(ProfileError, match="channel index out of range for group 'features.3' \\(width 32\\)"):
        prune(model, space, keep={"features.3": [0, 32]})
    with pytest.raises(ProfileError, match="channel index out of range for group 'features.3' \\(width 32\\)"):
        prune(model, space, keep={"features.3": [-1, 3]})
    with pytest.raises(ProfileError, match="unknown channel group 'features.5'"):
        prune(model, space, keep={"features.5": [0]})
    with pytest.raises(ProfileError, match="keeping 0 channels of group 'features.3' is out of bounds \\[1, 32\\]"):
        mask(model, space, keep={"features.3": []})
    divisible = build_space(model, X32, divisor=8)
    with pytest.raises(ProfileError, match="keeping 7 channels of group 'features.3' is out of bounds "
                                           "\\[8, 32\\] \\(divisor 8\\)"):
        prune(model, divisible, keep={"features.3": list(range(7))})
    with pytest.raises(ProfileError, match="keeping 12 channels of group 'features.3'.*\\(divisor 8\\)"):
        prune(model, divisible, keep={"features.3": list(range(12))})
    assert prune(model, divisible, keep={"features.3": list(range(16))}).features[3].out_channels == 16


@pytest.mark.parametrize("criterion", ["taylor", "frs"])
def test_data_criteria_drop_dead_channels(small, criterion):
    model, space = small
    model = copy.deepcopy(model)
    dead = [3, 8, 20]
    with torch.no_grad():  # these channels output exactly zero: no relevance, no Taylor saliency
        model.features[3].weight[dead] = 0
        model.features[4].weight[dead] = 0
        model.features[4].bias[dead] = 0
    work = copy.deepcopy(model)
    scores = score_channels(criterion, work, full_groups(work, space, ["features.3"]), batches(), seed=0)
    s = scores["features.3"]
    assert torch.all(s[dead] == 0)
    assert (s > 0).sum() >= 20
    # both scores are non-negative (squared Taylor term, absolute relevance): the dead channels go first
    kept = select_channels(model, space, {"features.3": 29}, criterion, batches=batches())["features.3"]
    assert not set(kept) & set(dead)


def test_unknown_criterion_fails_even_when_nothing_shrinks(resnet20):
    model, space = resnet20[:2]
    with pytest.raises(WidthSearchError, match="unknown importance criterion 'bogus'"):
        prune(model, space, space.full(), criterion="bogus")
