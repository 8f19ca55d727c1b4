"""Tests for widthsearch.models: model sources, classifier lookup and checkpoints."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch
import torch_pruning as tp
from torch import nn

from widthsearch.errors import CheckpointError, ModelSourceError
from widthsearch.models import (
    BUILTIN_MODELS,
    classifier_of,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

CLASSIFIERS = {
    "small_cnn": "fc",
    "cifar_resnet20": "fc",
    "cifar_resnet32": "fc",
    "cifar_resnet56": "fc",
    "cifar_resnet110": "fc",
    "cifar_vgg16": "classifier.2",
    "cifar_mobilenetv2": "classifier",
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run fastest on one thread; OpenMP spinning is very slow on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(source: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return load_model(source, **kwargs).eval()


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- builtins


def test_builtin_list_matches_classifier_table():
    assert set(BUILTIN_MODELS) == set(CLASSIFIERS)


@pytest.mark.parametrize("source", BUILTIN_MODELS)
def test_builtin_forward_shapes(source):
    with torch.no_grad():
        rgb = _build(source, num_classes=7)
        assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        gray = _build(source, num_classes=10, in_channels=1)
        assert gray(torch.randn(2, 1, 8, 8)).shape == (2, 10)
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("source", BUILTIN_MODELS)
def test_builtin_classifier_and_determinism(source):
    model = _build(source, num_classes=5)
    name = classifier_of(model)
    assert name == CLASSIFIERS[source]
    classifier = model.get_submodule(name)
    assert isinstance(classifier, nn.Linear) and classifier.out_features == 5
    assert _same_state(model, _build(source, num_classes=5))


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_cifar_resnet_structure(depth):
    model = _build(f"cifar_resnet{depth}")
    n = (depth - 2) // 6
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3 * n
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    shortcut_convs = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(shortcut_convs) == 2  # option B, only where stride/width change
    assert len(convs) - len(shortcut_convs) == depth - 1  # stem + 2 per block
    assert model.conv1.out_channels == 16
    for stage, width in zip((model.layer1, model.layer2, model.layer3), (16, 32, 64)):
        assert len(stage) == n
        assert {b.conv2.out_channels for b in stage} == {width}
    assert model.fc.in_features == 64
    # every ReLU module is used once: no shared instances
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 3 * n


def test_mobilenetv2_depthwise_and_head():
    model = _build("cifar_mobilenetv2")
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert model.features[0].stride == (1, 1) and model.features[0].out_channels == 32
    assert model.classifier.in_features == 1280


@pytest.mark.parametrize("source", BUILTIN_MODELS)
def test_builtin_prunable_with_torch_pruning(source):
    model = _build(source, num_classes=10)
    classifier = model.get_submodule(classifier_of(model))
    example = torch.randn(1, 3, 32, 32)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    groups = list(dg.get_all_groups(ignored_layers=[classifier]))
    assert groups
    for group in groups:
        for dep, _ in group:
            prunes_out = dg.is_out_channel_pruning_fn(dep.handler)
            assert not (dep.target.module is classifier and prunes_out)
    n_params = sum(p.numel() for p in model.parameters())
    groups[0].prune(idxs=[0])
    groups[len(groups) // 2].prune(idxs=[0])
    assert sum(p.numel() for p in model.parameters()) < n_params
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------------------- other sources


def test_torchvision_source():
    model = load_model("torchvision:resnet18", num_classes=7)
    assert classifier_of(model) == "fc"
    assert model.fc.out_features == 7


def test_torchvision_unknown_name():
    with pytest.raises(ModelSourceError, match="no_such_net") as err:
        load_model("torchvision:no_such_net")
    assert "list_models()" in str(err.value)


def test_torchvision_needs_three_channels():
    with pytest.raises(ModelSourceError, match="3 input channels"):
        load_model("torchvision:resnet18", in_channels=1)


@pytest.fixture
def factory_pkg(tmp_path, monkeypatch):
    """A package ``ws_test_pkg.nets`` with assorted factories, importable from tmp_path."""
    pkg = tmp_path / "ws_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def with_classes(num_classes=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))

        def no_classes():
            return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))

        def not_a_module(num_classes=10):
            return "hello"

        def broken(num_classes=10):
            raise RuntimeError("boom")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ws_test_pkg.nets"
    for name in ("ws_test_pkg", "ws_test_pkg.nets"):
        sys.modules.pop(name, None)


def test_factory_source(factory_pkg):
    model = load_model(f"{factory_pkg}:with_classes", num_classes=3)
    assert model(torch.randn(2, 3, 2, 2)).shape == (2, 3)
    assert classifier_of(model) == "1"
    assert load_model(f"{factory_pkg}:no_classes").get_submodule("1").out_features == 4


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("ws_no_such_module.nets:f", "cannot import module 'ws_no_such_module.nets'"),
        ("ws_test_pkg.nets:missing", "has no attribute 'missing'"),
        ("ws_test_pkg.nets:not_a_module", "returned str, not a torch.nn.Module"),
        ("ws_test_pkg.nets:broken", "RuntimeError: boom"),
    ],
)
def test_factory_errors(factory_pkg, source, needle):
    with pytest.raises(ModelSourceError) as err:
        load_model(source)
    assert source in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("source", ["resnet20", "cifar_resnet", "", "a b:c", "pkg.mod:"])
def test_unknown_source(source):
    with pytest.raises(ModelSourceError) as err:
        load_model(source)
    msg = str(err.value)
    assert msg.startswith(f"unknown model source {source!r}; expected one of: small_cnn, ")
    assert ", ".join(BUILTIN_MODELS) in msg
    assert msg.endswith("torchvision:NAME or package.module:factory")


def test_classifier_falls_back_to_last_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1))
    assert classifier_of(model) == "2"
    with pytest.raises(ModelSourceError):
        classifier_of(nn.Sequential(nn.ReLU()))


# --------------------------------------------------------------------------- checkpoints


def _trained_like(source: str = "cifar_resnet20", **kwargs) -> nn.Module:
    """A model whose BN statistics differ from a fresh one, so outputs depend on them."""
    model = _build(source, seed=0, **kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, kwargs.get("in_channels", 3), 8, 8) * 3 + 1)
    return model.eval()


def test_checkpoint_round_trip(tmp_path):
    model = _trained_like()
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(model, path, epoch=3, accuracy=0.91, tags=("a", "b"))
    assert os.listdir(path.parent) == ["model.pt"]  # no temporary file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["meta"] == {"epoch": 3, "accuracy": 0.91, "tags": ["a", "b"]}

    torch.manual_seed(1)
    loaded = load_model("cifar_resnet20", checkpoint=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_plain_state_dict_checkpoint(tmp_path):
    model = _trained_like("small_cnn", in_channels=1)
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    fresh = _build("small_cnn", seed=5, in_channels=1)
    assert load_checkpoint(fresh, str(path)) is fresh
    assert _same_state(model, fresh)


def test_save_checkpoint_overwrites_atomically(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(_build("small_cnn", seed=0), path, run=1)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(_build("small_cnn", seed=1), path, bad=object())
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pt"]
    save_checkpoint(_build("small_cnn", seed=1), path, run=2)
    assert torch.load(path, weights_only=True)["meta"] == {"run": 2}


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="checkpoint not found: ") as err:
        load_model("small_cnn", checkpoint=path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "not_a_state_dict"])
def test_corrupt_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                         .to(torch.uint8).numpy().tobytes())
    elif kind == "truncated":
        save_checkpoint(_build("small_cnn"), path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"state_dict": [1, 2, 3]}, path)
    content = path.read_bytes()
    model = _build("small_cnn")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path)
    assert str(err.value).startswith(f"cannot read checkpoint {path}: ")
    assert path.read_bytes() == content


def test_checkpoint_of_other_architecture(tmp_path):
    path = tmp_path / "r20.pt"
    save_checkpoint(_build("cifar_resnet20"), path)
    with pytest.raises(CheckpointError) as err:
        load_model("cifar_resnet32", checkpoint=path)
    msg = str(err.value)
    assert str(path) in msg and "'cifar_resnet32'" in msg
    assert "missing keys: layer1.3.conv1.weight" in msg and "more)" in msg


def test_checkpoint_with_other_num_classes_leaves_model_untouched(tmp_path):
    path = tmp_path / "r20.pt"
    save_checkpoint(_trained_like(), path)
    model = _build("cifar_resnet20", seed=3, num_classes=7)
    reference = _build("cifar_resnet20", seed=3, num_classes=7)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path)
    msg = str(err.value)
    assert str(path) in msg
    assert "shape mismatch for fc.weight: checkpoint has (10, 64), model has (7, 64)" in msg
    assert _same_state(model, reference)  # nothing was partially loaded


def test_checkpoint_with_extra_keys(tmp_path):
    model = _build("small_cnn")
    state = dict(model.state_dict(), **{f"extra.{i}": torch.zeros(1) for i in range(7)})
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.0, .*\(\+2 more\)"):
        load_model("small_cnn", checkpoint=path)
