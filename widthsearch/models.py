"""Model sources: built-in CIFAR-style CNNs, torchvision models and user factories.

A model source is a string:

* a built-in name from :data:`BUILTIN_MODELS`;
* ``torchvision:NAME`` for ``torchvision.models.get_model(NAME)`` (random weights);
* ``package.module:factory`` for a user callable returning an ``nn.Module``.

Checkpoints are files written by :func:`save_checkpoint` (``{"state_dict", "meta"}``)
or plain state dicts; they are read with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from widthsearch.errors import CheckpointError, ModelSourceError

__all__ = [
    "BUILTIN_MODELS",
    "classifier_of",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]

_FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_MAX_KEYS_SHOWN = 5


# --------------------------------------------------------------------------- builtins


def _conv_bn(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


def _init_weights(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers and a linear head; for tests and 8x8 digits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, 16), nn.ReLU(inplace=True),
            *_conv_bn(16, 32), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            *_conv_bn(32, 64), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block; 1x1 conv + BN shortcut when stride or width changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016): depth = 6n + 2, stages of 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(cin, cout, stride), *(BasicBlock(cout, cout) for _ in range(n - 1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


_VGG16_CFG = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
)


class CifarVGG16(nn.Module):
    """VGG16 with BN; ceil-mode max pools so inputs down to 8x8 still run."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [*_conv_bn(cin, int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out + x if self.use_residual else out


# (expansion t, channels c, repeats n, stride s); the first two strides are 1 for 32x32 inputs.
_MOBILENETV2_CFG = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for CIFAR: stride-1 stem with 32 channels, 1280-wide last conv."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, 32), nn.ReLU6(inplace=True)]
        cin = 32
        for t, c, n, s in _MOBILENETV2_CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [*_conv_bn(cin, 1280, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": lambda k, c: SmallCNN(k, c),
    "cifar_resnet20": lambda k, c: CifarResNet(20, k, c),
    "cifar_resnet32": lambda k, c: CifarResNet(32, k, c),
    "cifar_resnet56": lambda k, c: CifarResNet(56, k, c),
    "cifar_resnet110": lambda k, c: CifarResNet(110, k, c),
    "cifar_vgg16": lambda k, c: CifarVGG16(k, c),
    "cifar_mobilenetv2": lambda k, c: CifarMobileNetV2(k, c),
}
BUILTIN_MODELS: tuple[str, ...] = tuple(_BUILDERS)


# --------------------------------------------------------------------------- sources


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise ModelSourceError(
            f"torchvision models take 3 input channels; model source 'torchvision:{name}' "
            f"cannot be built with in_channels={in_channels}"
        )
    if name not in torchvision.models.list_models():
        raise ModelSourceError(
            f"unknown torchvision model {name!r}; see torchvision.models.list_models()"
        )
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except Exception as e:
        raise ModelSourceError(f"cannot build 'torchvision:{name}': {type(e).__name__}: {e}") from e


def _takes_num_classes(factory: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: assume it does
        return True
    return any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)


def _factory_model(source: str, num_classes: int) -> nn.Module:
    module_name, attr = source.split(":")
    prefix = f"model source {source!r}"
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ModelSourceError(
            f"{prefix}: cannot import module {module_name!r}: {type(e).__name__}: {e}"
        ) from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelSourceError(f"{prefix}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelSourceError(f"{prefix}: {attr!r} is not callable")
    try:
        model = factory(num_classes=num_classes) if _takes_num_classes(factory) else factory()
    except Exception as e:
        raise ModelSourceError(f"{prefix}: factory raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"{prefix}: factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def load_model(
    source: str,
    num_classes: int = 10,
    checkpoint: str | os.PathLike | None = None,
    in_channels: int = 3,
) -> nn.Module:
    """Build the model named by ``source`` and optionally load ``checkpoint`` into it.

    Raises ModelSourceError for a bad source and CheckpointError for a bad checkpoint.
    """
    if num_classes < 1 or in_channels < 1:
        raise ModelSourceError(
            f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
        )
    if source in _BUILDERS:
        model = _BUILDERS[source](num_classes, in_channels)
    elif source.startswith("torchvision:"):
        model = _torchvision_model(source.partition(":")[2], num_classes, in_channels)
    elif _FACTORY_RE.match(source):
        model = _factory_model(source, num_classes)
    else:
        raise ModelSourceError(
            f"unknown model source {source!r}; expected one of: {', '.join(BUILTIN_MODELS)}, "
            "torchvision:NAME or package.module:factory"
        )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, source=source)
    return model


def classifier_of(model: nn.Module) -> str:
    """Qualified name of the final classifier: the last nn.Linear, else the last conv layer."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not linears and not convs:
        raise ModelSourceError(
            f"{type(model).__name__} has no Linear or Conv layer to act as classifier"
        )
    return (linears or convs)[-1]


# --------------------------------------------------------------------------- checkpoints


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing keys: {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_key_list(unexpected)}")
    for key, want in expected.items():
        if key in state and state[key].shape != want.shape:
            problems.append(
                f"shape mismatch for {key}: checkpoint has {tuple(state[key].shape)}, "
                f"model has {tuple(want.shape)}"
            )
            break
    return "; ".join(problems) or None


def _read_error(e: Exception) -> str:
    """One-line reason for a failed ``torch.load``, without torch's long advice text."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        lines = [ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()]
        detail = lines[0] if lines else "unsupported content"
        return f"not a weights-only PyTorch file ({detail.split('. ')[0]})"
    first = text.strip().split("\n")[0].split(". ")[0]
    return f"{type(e).__name__}: {first}" if first else f"{type(e).__name__} (empty or cut short?)"


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, source: str | None = None
) -> nn.Module:
    """Load a checkpoint's weights into ``model`` in place and return it.

    ``source`` only improves error messages. The model is untouched when the
    checkpoint is missing, unreadable or does not fit (CheckpointError).
    """
    path = Path(path)
    obj = _read_checkpoint(path)
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"cannot read checkpoint {path}: it holds no state dict of tensors")
    problem = _mismatch(model, state)
    if problem:
        target = f"model {source!r}" if source else f"the {type(model).__name__} model"
        raise CheckpointError(f"checkpoint {path} does not fit {target}: {problem}")
    model.load_state_dict(state)
    return model


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """The metadata saved with a checkpoint by save_checkpoint ({} for a bare state dict)."""
    obj = _read_checkpoint(Path(path))
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def _read_checkpoint(path: Path):
    """torch.load of a checkpoint file (weights only), as a CheckpointError when it is missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_read_error(e)}") from e


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **meta: object) -> None:
    """Atomically save ``{"state_dict": ..., "meta": meta}`` (a local path or URI); ``meta`` must be JSON-able."""
    from .storage import torch_bytes, write_atomic

    meta = json.loads(json.dumps(meta))  # plain data only, so weights_only loading works
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(str(path), torch_bytes({"state_dict": state, "meta": meta}))
