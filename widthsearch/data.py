"""Image data held in memory as uint8 tensors: load a source, carve a validation split, batch.

Sources: ``digits`` (scikit-learn's bundled 8x8 digits), ``npz:PATH``, ``cifar10:ROOT``,
``cifar100:ROOT`` (torchvision's on-disk format; ``?download=1`` allows a download) and
``imagefolder:ROOT`` (``ROOT/train`` plus ``ROOT/test`` or ``ROOT/val``; ``?size=N``, default 32).
Nothing is ever downloaded unless the source string asks for it.
"""

from __future__ import annotations

import itertools
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from widthsearch.errors import DataSourceError

SPLITS = ("train", "val", "test")
SOURCES = {"digits": "digits", "npz": "npz:PATH", "cifar10": "cifar10:ROOT", "cifar100": "cifar100:ROOT",
           "imagefolder": "imagefolder:ROOT"}  # each kind of data source, as a source of it is written
_USAGE = f"expected {', '.join(list(SOURCES.values())[:-1])} or {list(SOURCES.values())[-1]}"
_OPTIONS = {"digits": (), "npz": (), "cifar10": ("download",), "cifar100": ("download",),
            "imagefolder": ("size",)}
_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")

# x_train, y_train, x_test, y_test as numpy (uint8 NCHW, int64 N), whether to augment, class names (or None).
_Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool, "list[str] | None"]
Batch = tuple[torch.Tensor, torch.Tensor]  # normalised float32 images, int64 labels


@dataclass
class Split:
    """One split held in memory: uint8 images N×C×H×W and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataSplits:
    """Train/val/test splits of one source plus the train statistics used to normalise them."""

    source: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    val_fraction: float = 0.1
    split_seed: int = 0
    class_names: tuple[str, ...] | None = None  # in label order, where the source has them
    channel_order: str = "as stored"            # "RGB" (decoded images), "gray" (one channel), else as stored

    def preprocessing(self) -> dict:
        """How to feed a model trained on this data: what a deployer needs besides the weights.

        Input: float32 N×C×H×W; each pixel p (uint8, 0..255, channels in `channel_order`) becomes
        (p / 255 - mean[c]) / std[c] (the train split's statistics); `resize` for sources that resize.
        """
        return {"layout": "NCHW", "dtype": "float32", "input_shape": [1, self.in_channels, *self.image_size],
                "channel_order": self.channel_order, "scale": 1 / 255, "mean": list(self.mean), "std": list(self.std),
                "formula": "x = (pixel / 255 - mean[c]) / std[c], pixel uint8 0..255",
                "class_names": None if self.class_names is None else list(self.class_names),
                "num_classes": self.num_classes, "data": self.source,
                **({"resize": {"size": list(self.image_size), "method": "bilinear", "convert": "RGB"}}
                   if self.source.startswith("imagefolder") else {})}

    @property
    def split(self) -> dict:
        """What identifies the train/val split: source, val fraction, split seed and a digest of the val images.

        A base model trained on one split must be searched on the same one, or candidates are
        scored on images the base was trained on; ``train-base`` stores this in its checkpoint.
        """
        import hashlib

        digest = hashlib.sha256()
        for tensor in (self.val.x, self.val.y, torch.tensor([len(self.train), len(self.val)])):
            digest.update(tensor.contiguous().numpy().tobytes())
        return {"data": self.source, "val_fraction": self.val_fraction, "split_seed": self.split_seed,
                "val_digest": digest.hexdigest()[:16]}

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.x.shape[2:])

    @property
    def example_input(self) -> torch.Tensor:
        """The first train image, normalised, as a float 1×C×H×W tensor."""
        return self.normalize(self.train.x[:1])

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Map uint8 images (…×C×H×W) to float32 with the train mean/std per channel."""
        if x_uint8.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images, got {x_uint8.dtype}")
        mean = torch.tensor(self.mean, device=x_uint8.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=x_uint8.device).view(-1, 1, 1)
        return (x_uint8.float().div_(255.0) - mean) / std

    def batches(self, split: str = "train", batch_size: int = 128, *,
                shuffle: bool | None = None, augment: bool | None = None,
                seed: int | None = None, drop_last: bool = False,
                device: str | torch.device = "cpu") -> Iterator[Batch]:
        """One pass over ``split``: normalised float32 images and int64 labels on ``device``.

        ``shuffle`` defaults to ``split == "train"``, ``augment`` to train and ``self.augment``
        (random crop after zero padding by ``max(1, H // 8)`` plus horizontal flip). The same
        ``seed`` gives the same batches; ``seed=None`` draws one from torch's global generator.
        """
        data = self._split(split)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shuffle = split == "train" if shuffle is None else shuffle
        augment = (split == "train" and self.augment) if augment is None else augment
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        return self._iterate(data, batch_size, shuffle, augment, seed, drop_last,
                             torch.device(device))

    def stream(self, split: str = "train", batch_size: int = 128, *, seed: int = 0,
               augment: bool | None = None,
               device: str | torch.device = "cpu") -> Iterator[Batch]:
        """Endless shuffled batches, epoch ``e`` seeded ``seed + e`` (for "fine-tune k steps")."""
        if len(self._split(split)) == 0:
            raise ValueError(f"cannot stream the empty {split!r} split")
        return itertools.chain.from_iterable(
            self.batches(split, batch_size, shuffle=True, augment=augment, seed=seed + epoch,
                         device=device)
            for epoch in itertools.count())

    def _iterate(self, data: Split, batch_size: int, shuffle: bool, augment: bool, seed: int,
                 drop_last: bool, device: torch.device) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        n = len(data)
        order = torch.randperm(n, generator=gen) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            if order is None:
                xb, yb = data.x[start:start + batch_size], data.y[start:start + batch_size]
            else:
                idx = order[start:start + batch_size]
                xb, yb = data.x[idx], data.y[idx]
            xb = xb.to(device)
            if augment:
                xb = _augment(xb, gen)
            yield self.normalize(xb), yb.to(device)

    def _split(self, split: str) -> Split:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, split)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``max(1, H // 8)``) and horizontal flip of a uint8 batch."""
    b, c, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen).to(x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    x = padded[batch, chan, rows, cols]
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def parse_data_source(source: str) -> tuple[str, str | None]:
    """Split ``source`` into (kind, path), e.g. ("digits", None) or ("npz", "a.npz").

    Options after ``?`` are validated and left out of the path.
    """
    kind, path, _ = _parse(source)
    return kind, path


def _parse(source: str) -> tuple[str, str | None, dict[str, str]]:
    kind, sep, rest = source.partition(":")
    kind = kind.strip().lower()
    if kind not in _OPTIONS:
        raise DataSourceError(f"unknown data source {source!r}; {_USAGE}")
    if kind == "digits":
        if sep:
            raise DataSourceError(f"data source 'digits' takes no path, got {source!r}")
        return kind, None, {}
    path, _, query = rest.partition("?")
    if not path:
        raise DataSourceError(f"data source {source!r} needs a path: {kind}:PATH")
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in _OPTIONS[kind]:
            allowed = ", ".join(_OPTIONS[kind]) or "none"
            raise DataSourceError(f"bad option {item!r} in data source {source!r}; "
                                  f"{kind} accepts: {allowed} (as KEY=VALUE)")
        options[key] = value
    return kind, path, options


def load_data(source: str = "digits", val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """Load ``source`` into memory; carve ``val_fraction`` of train into val, seeded by ``seed``."""
    if not 0 < val_fraction <= 0.5:
        raise DataSourceError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    kind, path, options = _parse(source)
    if kind == "digits":
        x_train, y_train, x_test, y_test, augment, names = _load_digits()
    elif kind == "npz":
        x_train, y_train, x_test, y_test, augment, names = _load_npz(Path(path))
    elif kind == "imagefolder":
        x_train, y_train, x_test, y_test, augment, names = _load_imagefolder(Path(path), options, source)
    else:
        x_train, y_train, x_test, y_test, augment, names = _load_cifar(kind, path, options, source)
    train_idx, val_idx = _carve(y_train, val_fraction, seed, source)
    x_fit = x_train[train_idx]
    mean, std = _channel_stats(x_fit)
    return DataSplits(
        source=source,
        train=_to_split(x_fit, y_train[train_idx]),
        val=_to_split(x_train[val_idx], y_train[val_idx]),
        test=_to_split(x_test, y_test),
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
        mean=mean,
        std=std,
        augment=augment,
        val_fraction=val_fraction,
        split_seed=seed,
        class_names=None if names is None else tuple(str(n) for n in names),
        channel_order="gray" if x_train.shape[1] == 1 else ("RGB" if kind in ("cifar10", "cifar100", "imagefolder")
                                                            else "as stored"),
    )


def check_split(recorded: dict | None, current: dict, checkpoint: str) -> str | None:
    """Refuse a base checkpoint trained on another train/val split; a warning text when it records none.

    `recorded` is the checkpoint's ``split`` metadata (from ``DataSplits.split``), `current` the search's.
    The val-image digest decides (a moved data file is the same split); the error names both splits.
    """
    if not recorded:
        return (f"checkpoint {checkpoint} records no train/val split: if it was trained on images of this "
                f"search's validation split ({_split_text(current)}), validation scores are optimistic; "
                "train bases with `widthsearch train-base` (it records the split)")
    if recorded.get("val_digest") != current["val_digest"]:
        raise DataSourceError(
            f"checkpoint {checkpoint} was trained on another train/val split ({_split_text(recorded)}) than this "
            f"search uses ({_split_text(current)}): its validation images would include images the base model "
            "was trained on. Search with the checkpoint's data, val_fraction and split_seed, or train a base "
            "on this split with `widthsearch train-base`")
    return None


def _split_text(split: dict) -> str:
    return (f"data {split.get('data')}, val_fraction {split.get('val_fraction')}, "
            f"split_seed {split.get('split_seed')}, val digest {split.get('val_digest')}")


def _to_split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)),
                 torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


def _carve(y: np.ndarray, val_fraction: float, seed: int,
           source: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and val; stratified when sklearn can keep every class on both sides."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_val = math.ceil(val_fraction * n)
    if n - n_val < 1:
        raise DataSourceError(f"{source}: the train split has {n} sample(s), "
                              f"too few to carve a validation split")
    counts = np.bincount(y)
    n_classes = np.count_nonzero(counts)
    stratify = counts[counts > 0].min() >= 2 and min(n_val, n - n_val) >= n_classes
    return train_test_split(np.arange(n), test_size=n_val, random_state=seed,
                            stratify=y if stratify else None)


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (floored at 1e-3) in 0..1 units, exact via pixel histograms."""
    levels = np.arange(256) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = np.bincount(x[:, c].ravel(), minlength=256)
        mean = float(counts @ levels / counts.sum())
        var = float(counts @ (levels - mean) ** 2 / counts.sum())
        means.append(mean)
        stds.append(max(math.sqrt(var), 1e-3))
    return tuple(means), tuple(stds)


def _load_digits() -> _Raw:
    """scikit-learn's 1797 8x8 digits (0..16 scaled by 15); fixed stratified 80/20 test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images * 15).astype(np.uint8)[:, None]
    y = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y,
                                           random_state=0)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], False, [str(d) for d in range(10)]


def _load_npz(path: Path) -> _Raw:
    """Arrays x_train, y_train, x_test, y_test from an .npz file (NCHW, NHWC or NHW images), and the optional
    `class_names` (strings in label order)."""
    if path.is_dir():
        raise DataSourceError(f"npz:{path} is a folder; npz: takes one .npz file holding "
                              f"{', '.join(_NPZ_ARRAYS)} (a folder of images per class: imagefolder:{path})")
    if not path.is_file():
        raise DataSourceError(f"data file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataSourceError(f"data file {path} is not an .npz archive "
                                  f"(expected arrays {', '.join(_NPZ_ARRAYS)})")
        with archive:
            arrays = {name: archive[name] for name in (*_NPZ_ARRAYS, "class_names") if name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataSourceError(f"could not read data file {path}: {exc}") from None
    missing = [name for name in _NPZ_ARRAYS if name not in arrays]
    if missing:
        raise DataSourceError(f"data file {path} has no array {missing[0]!r} "
                              f"(expected {', '.join(_NPZ_ARRAYS)})")
    x_train = _npz_images(arrays["x_train"], "x_train", path)
    x_test = _npz_images(arrays["x_test"], "x_test", path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataSourceError(f"x_test in {path} has images of shape {x_test.shape[1:]} "
                              f"but x_train has {x_train.shape[1:]}")
    y_train = _npz_labels(arrays["y_train"], "y_train", len(x_train), path)
    y_test = _npz_labels(arrays["y_test"], "y_test", len(x_test), path)
    _, c, h, w = x_train.shape
    names = arrays.get("class_names")
    if names is not None and (names.ndim != 1 or len(names) <= max(y_train.max(), y_test.max())):
        raise DataSourceError(f"class_names in {path} must list one name per class in label order, "
                              f"got shape {names.shape}")
    return (x_train, y_train, x_test, y_test, c == 3 and h == w and h >= 16,
            None if names is None else [str(n) for n in names])


def _npz_images(x: np.ndarray, name: str, path: Path) -> np.ndarray:
    """uint8 N×C×H×W from uint8/integer 0..255 or float 0..1 images in NCHW, NHWC or NHW."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise DataSourceError(f"{name} in {path} must have 3 (N×H×W) or 4 (NCHW/NHWC) "
                              f"dimensions, got shape {x.shape}")
    elif x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if len(x) == 0:
        raise DataSourceError(f"{name} in {path} is empty")
    if np.issubdtype(x.dtype, np.floating):
        if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise DataSourceError(f"{name} in {path}: float images must lie in [0, 1]")
        x = np.rint(x * 255)
    elif not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() > 255:
        raise DataSourceError(f"{name} in {path} must be uint8 (0..255) or float in [0, 1], "
                              f"got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.uint8)


def _npz_labels(y: np.ndarray, name: str, n_images: int, path: Path) -> np.ndarray:
    """int64 labels of shape (N,) (N×1 accepted), non-negative, one per image."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataSourceError(f"{name} in {path} must be 1-D class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataSourceError(f"{name} in {path} must hold integer class indices, got {y.dtype}")
    if len(y) != n_images:
        raise DataSourceError(f"{name} in {path} has {len(y)} labels but x_{name[2:]} "
                              f"has {n_images} images")
    if y.min() < 0:
        raise DataSourceError(f"{name} in {path} has negative labels")
    return y.astype(np.int64)


def _load_cifar(kind: str, root: str, options: dict[str, str], source: str) -> _Raw:
    """CIFAR-10/100 from torchvision's on-disk format; downloads only with ``?download=1``."""
    from torchvision.datasets import CIFAR10, CIFAR100

    if options.get("download", "0") not in ("0", "1"):
        raise DataSourceError(f"bad value for download in {source!r}; use download=1")
    download = options.get("download") == "1"
    cls, name = (CIFAR10, "CIFAR-10") if kind == "cifar10" else (CIFAR100, "CIFAR-100")
    try:
        train, test = (cls(root, train=flag, download=download) for flag in (True, False))
    except RuntimeError:
        raise DataSourceError(
            f"folder {root} does not contain {name} in torchvision's format; get it with "
            f"python -c \"import torchvision; torchvision.datasets.{cls.__name__}('{root}', "
            f"download=True)\" or use the source '{kind}:{root}?download=1'") from None
    except OSError as exc:
        raise DataSourceError(f"could not download {name} into {root}: {exc}") from None
    return (np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)), np.asarray(train.targets),
            np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)), np.asarray(test.targets),
            True, list(train.classes))


def _load_imagefolder(root: Path, options: dict[str, str], source: str) -> _Raw:
    """ROOT/train and ROOT/test (else ROOT/val) as RGB images resized to size×size."""
    size_text = options.get("size", "32")
    if not size_text.isdigit() or int(size_text) < 1:
        raise DataSourceError(f"bad size {size_text!r} in {source!r}; use e.g. size=64")
    size = int(size_text)
    if not (root / "train").is_dir():
        raise DataSourceError(f"image folder {root} has no train/ folder "
                              f"(expected {root}/train/CLASS/*.png and {root}/val/CLASS/*.png)")
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not test_dir.is_dir():
        raise DataSourceError(f"image folder {root} has no test/ or val/ folder to test on")
    x_train, y_train, train_classes = _read_image_folder(root / "train", size)
    x_test, y_test, test_classes = _read_image_folder(test_dir, size)
    if train_classes != test_classes:
        raise DataSourceError(f"class folders differ between {root / 'train'} {train_classes} "
                              f"and {test_dir} {test_classes}")
    return x_train, y_train, x_test, y_test, True, train_classes


def _read_image_folder(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of one torchvision ImageFolder as uint8 N×3×size×size, labels, class names."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(folder))
    except OSError as exc:
        raise DataSourceError(f"cannot read image folder {folder}: {exc}") from None
    x = np.empty((len(dataset.samples), size, size, 3), dtype=np.uint8)
    for i, (file, _) in enumerate(dataset.samples):
        try:
            with Image.open(file) as image:
                image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                x[i] = np.asarray(image)
        except OSError as exc:
            raise DataSourceError(f"cannot read image {file}: {exc}") from None
    y = np.asarray(dataset.targets, dtype=np.int64)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y, dataset.classes
