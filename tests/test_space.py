"""Tests for widthsearch.space: channel groups, frozen layers, divisors and profile validation."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from widthsearch import build_space, load_model
from widthsearch.errors import ProfileError, WidthSearchError
from widthsearch.models import BUILTIN_MODELS, classifier_of
from widthsearch.space import ChannelGroup, WidthSpace

X32 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet20():
    model = load_model("cifar_resnet20")
    return model, build_space(model, X32)


@pytest.fixture(scope="module")
def small():
    model = load_model("small_cnn")
    return model, build_space(model, X32)


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize("name", [n for n in BUILTIN_MODELS if n != "cifar_resnet110"])
def test_groups_are_model_modules_and_classifier_output_is_not_prunable(name):
    model = load_model(name)
    space = build_space(model, X32)
    modules = dict(model.named_modules())
    clf = classifier_of(model)
    assert len(space) > 0
    assert len(set(space.names)) == len(space)
    for g in space.groups:
        assert g.name in modules
        assert isinstance(modules[g.name], (nn.Conv2d, nn.Linear))
        assert g.layers[0] == g.name and set(g.layers) <= set(modules)
        assert g.width == (modules[g.name].out_channels if isinstance(modules[g.name], nn.Conv2d)
                           else modules[g.name].out_features)
        assert 1 == g.min_width < g.width and g.divisor == 1
    assert clf not in space.names
    # ... but the classifier's inputs shrink with the last group feeding it.
    assert sum(clf in g.layers for g in space.groups) == 1


def test_space_lookups(resnet20):
    model, space = resnet20
    assert space.model is model
    assert list(space.widths) == [space[n].width for n in space.names]
    assert list(space.min_widths) == [1] * len(space)
    assert space.full() == dict(zip(space.names, space.widths.tolist()))
    assert space.minimal() == {n: 1 for n in space.names}
    assert space.ratios(space.full()) == {n: 1.0 for n in space.names}
    assert space.ratios({"conv1": 4})["conv1"] == 0.25
    desc = space.describe()
    assert [d["name"] for d in desc] == space.names
    json.dumps(desc)  # plain data
    with pytest.raises(KeyError):
        space["nope"]


def test_residual_stream_is_one_group(resnet20):
    _, space = resnet20
    stem = space["conv1"]
    assert stem.width == 16
    assert {"conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.conv2", "layer1.1.bn2",
            "layer1.2.conv2", "layer1.2.bn2"} <= set(stem.layers)
    # the stage's inputs (conv1 of every block, the next stage's shortcut) are consumers
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.shortcut.0"} <= set(stem.layers)
    # no other group roots at a conv whose output belongs to the stream
    for name in ("layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"):
        assert name not in space.names
    # a block's inner width is its own group: conv1 -> bn1 -> conv2's input
    assert set(space["layer1.0.conv1"].layers) == {"layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}
    # the last stage's stream feeds the classifier
    assert "fc" in space["layer3.0.shortcut.0"].layers
    assert len(space) == 12


def test_groups_in_model_order(resnet20):
    model, space = resnet20
    order = [n for n, _ in model.named_modules()]
    assert space.names == sorted(space.names, key=order.index)
    assert space.names[:2] == ["conv1", "layer1.0.conv1"]
    assert build_space(model, X32).names == space.names


# --------------------------------------------------------------------------- frozen


def test_frozen_block_conv_is_not_a_group(resnet20):
    model, space = resnet20
    frozen = build_space(model, X32, frozen=["layer1.0.conv1"])
    assert "layer1.0.conv1" in space.names
    assert "layer1.0.conv1" not in frozen.names
    assert set(frozen.names) == set(space.names) - {"layer1.0.conv1"}
    assert frozen.frozen == ("layer1.0.conv1",)


def test_frozen_member_of_residual_stream_freezes_the_whole_stream(resnet20):
    model, _ = resnet20
    frozen = build_space(model, X32, frozen=["layer1.1.conv2"])
    assert "conv1" not in frozen.names
    for g in frozen.groups:
        assert "layer1.1.conv2" != g.name
        assert "layer1.1.bn2" not in g.layers  # its output channels are never pruned


def test_unknown_frozen_name(resnet20):
    model, _ = resnet20
    with pytest.raises(WidthSearchError, match="frozen module 'layer9.conv' is not in the model"):
        build_space(model, X32, frozen=["layer9.conv"])


def test_bad_min_width_or_divisor(small):
    model, _ = small
    for kwargs in ({"min_width": 0}, {"divisor": 0}):
        with pytest.raises(WidthSearchError, match="must be >= 1"):
            build_space(model, X32, **kwargs)


def test_min_width_drops_groups_that_cannot_shrink(small):
    model, _ = small
    space = build_space(model, X32, min_width=16)  # features.0 has 16 channels
    assert space.names == ["features.3", "features.7"]
    assert all(g.min_width == 16 for g in space.groups)
    with pytest.raises(WidthSearchError, match="no prunable channel group"):
        build_space(model, X32, min_width=64)


# --------------------------------------------------------------------------- divisor


def test_divisor_8(resnet20):
    model, _ = resnet20
    space = build_space(model, X32, divisor=8)
    assert len(space) == 12
    assert all(g.min_width == 8 and g.divisor == 8 for g in space.groups)
    for ratio in (0.3, 0.01, 0.5, 0.77):
        widths = space.uniform(ratio)
        assert all(w % 8 == 0 and w >= 8 for w in widths.values())
        assert space.validate(widths) == widths
    assert space.uniform(0.3)["layer3.1.conv1"] == 16  # 19.2 -> 16
    assert space.minimal() == {n: 8 for n in space.names}


def test_min_width_rounded_up_to_divisor(resnet20):
    """min_width=10 with divisor=8: the floor is 16, so minimal() and uniform() stay legal."""
    model, _ = resnet20
    space = build_space(model, X32, min_width=10, divisor=8)
    assert all(g.min_width == 16 for g in space.groups)
    assert "conv1" not in space.names  # 16 channels cannot shrink below 16
    assert space.validate(space.minimal()) == space.minimal()
    assert space.validate(space.uniform(0.1)) == space.uniform(0.1)


def test_channel_group_round_and_allowed():
    g = ChannelGroup("c", 20, 8, 8, ("c",))
    assert [g.round(c) for c in (0, 3, 11.9, 12.1, 19, 20, 25)] == [8, 8, 8, 16, 16, 20, 20]
    assert [g.allowed(c) for c in (0, 7, 8, 12, 16, 20, 24)] == [False, False, True, False, True, True, False]


# --------------------------------------------------------------------------- validation


def test_validate_fills_missing_groups_and_returns_plain_ints(resnet20):
    _, space = resnet20
    out = space.validate({"layer2.1.conv1": np.int64(7), "conv1": 5.0})
    assert list(out) == space.names
    assert out["layer2.1.conv1"] == 7 and out["conv1"] == 5 and out["layer3.2.conv1"] == 64
    assert all(type(v) is int for v in out.values())


@pytest.mark.parametrize("profile, message", [
    ({"nope": 3}, "unknown channel group 'nope'; groups are: conv1, layer1.0.conv1, "),
    ({"conv1": 0}, "width of group 'conv1' is 0, below its minimum 1"),
    ({"conv1": -3}, "width of group 'conv1' is -3, below its minimum 1"),
    ({"conv1": 17}, "width of group 'conv1' is 17, above its original width 16"),
    ({"conv1": 2.5}, "width of group 'conv1' must be an integer, got 2.5"),
    ({"conv1": "3"}, "width of group 'conv1' must be an integer, got '3'"),
    ({"conv1": True}, "width of group 'conv1' must be an integer, got True"),
    ({"conv1": None}, "width of group 'conv1' must be an integer, got None"),
    ({"conv1": float("nan")}, "width of group 'conv1' must be an integer, got nan"),
    ({"conv1": float("inf")}, "width of group 'conv1' must be an integer, got inf"),
    ([("conv1", 3)], "a width profile is a mapping {group: channels}, got list"),
])
def test_validate_errors(resnet20, profile, message):
    _, space = resnet20
    with pytest.raises(ProfileError) as info:
        space.validate(profile)
    assert message in str(info.value)


def test_validate_divisor_error_names_group_and_divisor(resnet20):
    model, _ = resnet20
    space = build_space(model, X32, divisor=8)
    with pytest.raises(ProfileError, match="width of group 'layer2.1.conv1' is 20, not a multiple of its divisor 8"):
        space.validate({"layer2.1.conv1": 20})
    with pytest.raises(ProfileError, match="width of group 'conv1' is 4, below its minimum 8"):
        space.validate({"conv1": 4})
    assert space.validate({"layer2.1.conv1": 24})["layer2.1.conv1"] == 24


def test_vector_round_trip(resnet20):
    _, space = resnet20
    profile = space.uniform(0.5)
    vec = space.vector(profile)
    assert vec.dtype == np.int64 and vec.tolist() == [profile[n] for n in space.names]
    assert space.from_vector(vec) == profile
    with pytest.raises(ProfileError, match="expected 12 widths \\(one per group\\), got 3"):
        space.from_vector([1, 2, 3])
    with pytest.raises(ProfileError, match="above its original width"):
        space.from_vector(space.widths + 1)


def test_profile_json_round_trip(resnet20):
    _, space = resnet20
    rng = np.random.default_rng(0)
    profile = {g.name: int(rng.integers(g.min_width, g.width + 1)) for g in space.groups}
    text = space.profile_to_json(profile)
    assert json.loads(text) == profile
    assert space.profile_from_json(text) == profile
    with pytest.raises(ProfileError, match="width profile is not valid JSON"):
        space.profile_from_json("{conv1: 3")
    with pytest.raises(ProfileError, match="width of group 'conv1' is 99, above its original width 16"):
        space.profile_from_json('{"conv1": 99}')
    with pytest.raises(ProfileError, match="unknown channel group 'x'"):
        space.profile_to_json({"x": 1})


# --------------------------------------------------------------------------- ratios


def test_uniform(resnet20):
    _, space = resnet20
    half = space.uniform(0.5)
    assert half == {n: w // 2 for n, w in zip(space.names, space.widths.tolist())}
    assert space.uniform(1.0) == space.full()
    assert space.uniform(1e-6) == space.minimal()
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ProfileError, match="keep ratio must be in \\(0, 1\\]"):
            space.uniform(bad)


def test_from_ratios(resnet20):
    _, space = resnet20
    by_name = space.from_ratios({"conv1": 0.5, "layer3.2.conv1": 0.25})
    assert by_name["conv1"] == 8 and by_name["layer3.2.conv1"] == 16
    assert all(by_name[n] == space[n].width for n in space.names if n not in ("conv1", "layer3.2.conv1"))
    seq = space.from_ratios([0.5] * len(space))
    assert seq == space.uniform(0.5)
    assert space.from_ratios(np.zeros(len(space))) == space.minimal()
    assert space.from_ratios([1.0] * len(space)) == space.full()
    with pytest.raises(ProfileError, match="expected 12 ratios \\(one per group\\), got 2"):
        space.from_ratios([0.5, 0.5])
    with pytest.raises(ProfileError, match="unknown channel group 'nope'"):
        space.from_ratios({"nope": 0.5})
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ProfileError, match="keep ratio of group 'conv1' must be in \\[0, 1\\]"):
            space.from_ratios({"conv1": bad})


# --------------------------------------------------------------------------- pickling


def test_pickle_drops_the_model(resnet20):
    model, space = resnet20
    copy = pickle.loads(pickle.dumps(space))
    assert copy.model is None and space.model is model
    assert copy.names == space.names and copy.groups == space.groups
    assert torch.equal(copy.example_input, space.example_input)
    assert copy.validate(space.uniform(0.5)) == space.uniform(0.5)


def test_empty_space_rejected():
    with pytest.raises(WidthSearchError, match="no prunable channel group"):
        WidthSpace([], X32)


def test_groups_touching_grouped_convs_are_left_out():
    """torch-pruning cannot shrink the channels of a ResNeXt-style grouped conv safely: those groups are locked."""
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=2),
                          nn.ReLU(), nn.Conv2d(16, 12, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))
    space = build_space(model, torch.randn(1, 3, 16, 16))
    assert space.names == ["5"]  # the plain conv's output; the two groups around the grouped conv are locked
    from widthsearch import CostModel, prune

    small = prune(model, space, space.uniform(0.5))
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 4) and CostModel(space).flops(space.uniform(0.5)) > 0


def test_a_model_torch_pruning_cannot_trace_gets_an_error_naming_the_op_and_its_layers():
    """ShuffleNet's channel shuffle breaks torch-pruning's index mapping (a bare ZeroDivisionError before)."""
    from widthsearch import load_model

    model = load_model("torchvision:shufflenet_v2_x0_5", 10, in_channels=3)
    with pytest.raises(WidthSearchError) as info:
        build_space(model, torch.randn(1, 3, 64, 64))
    text = str(info.value)
    assert text.startswith("cannot build a width space for this model: torch-pruning's dependency tracing fails "
                           "at the op _Reshape")
    assert "(after layer 'stage" in text and "ZeroDivisionError" in text and "channel shuffle" in text
    assert "search another model" in text
