"""Tests of widthsearch.data: sources, splits, normalisation, batching and errors."""

import itertools
import re

import numpy as np
import pytest
import torch

from widthsearch.data import DataSplits, Split, load_data, parse_data_source
from widthsearch.errors import DataSourceError


def rows(split: Split) -> set[tuple[bytes, int]]:
    """Each sample of a split as (image bytes, label)."""
    return {(x.numpy().tobytes(), int(y)) for x, y in zip(split.x, split.y)}


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("digits")


# --- digits ---------------------------------------------------------------------------------

def test_digits_sizes_and_metadata(digits):
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(digits.test) == 360
    assert len(digits.val) == pytest.approx(0.1 * (len(digits.train) + len(digits.val)), abs=1)
    assert digits.num_classes == 10
    assert digits.in_channels == 1 and digits.image_size == (8, 8)
    assert digits.train.x.dtype == torch.uint8 and digits.train.y.dtype == torch.int64
    assert int(digits.train.x.max()) == 240
    assert digits.augment is False
    example = digits.example_input
    assert example.shape == (1, 1, 8, 8) and example.dtype == torch.float32


def test_digits_test_split_fixed_and_val_seeded(digits):
    other = load_data("digits", seed=1)
    assert torch.equal(digits.test.x, other.test.x) and torch.equal(digits.test.y, other.test.y)
    assert rows(digits.val) != rows(other.val)
    assert rows(digits.train) | rows(digits.val) == rows(other.train) | rows(other.val)


def test_digits_splits_do_not_overlap(digits):
    train, val, test = rows(digits.train), rows(digits.val), rows(digits.test)
    assert not train & val and not train & test and not val & test
    assert len(train | val | test) == 1797  # the 1797 digits images are all distinct


def test_digits_val_is_stratified(digits):
    counts = torch.bincount(digits.val.y, minlength=10)
    assert counts.min() >= 12 and counts.max() <= 16


def test_batches_are_normalised(digits):
    xs, ys = zip(*digits.batches("train", batch_size=100))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == digits.train.x.shape
    assert abs(float(x.mean())) < 1e-4
    assert float(x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert [len(b) for b, _ in digits.batches("test", batch_size=100)] == [100, 100, 100, 60]
    assert [len(b) for b, _ in digits.batches("test", 100, drop_last=True)] == [100, 100, 100]


def test_batches_shuffle_and_order(digits):
    x, y = next(digits.batches("val", batch_size=1000))
    assert torch.equal(y, digits.val.y)  # val/test keep their order by default
    assert torch.allclose(x, digits.normalize(digits.val.x))
    _, y_train = next(digits.batches("train", batch_size=2000, seed=0))
    assert not torch.equal(y_train, digits.train.y)
    assert sorted(y_train.tolist()) == sorted(digits.train.y.tolist())


def test_batches_deterministic_by_seed(digits):
    def run(seed):
        return [(x, y) for x, y in digits.batches(batch_size=256, seed=seed, augment=True)]

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])


def test_digits_not_augmented_by_default(digits):
    x, _ = next(digits.batches("train", batch_size=2000, shuffle=False))
    assert torch.equal(x, digits.normalize(digits.train.x))


def test_bad_split_name(digits):
    with pytest.raises(ValueError, match="'validation'"):
        digits.batches("validation")


def test_stream_is_endless(digits):
    epoch = len(list(digits.batches("val", batch_size=50)))
    taken = list(itertools.islice(digits.stream("val", batch_size=50, seed=0), 3 * epoch + 1))
    assert len(taken) == 3 * epoch + 1
    first, second = [torch.cat([y for _, y in taken[i * epoch:(i + 1) * epoch]]) for i in (0, 1)]
    assert not torch.equal(first, second)  # successive epochs are reshuffled
    assert sorted(first.tolist()) == sorted(second.tolist())


# --- npz ------------------------------------------------------------------------------------

def make_arrays(shape_chw=(3, 32, 32), n_train=40, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape_chw), dtype=np.uint8),
        "y_train": rng.integers(0, 4, n_train),
        "x_test": rng.integers(0, 256, (n_test, *shape_chw), dtype=np.uint8),
        "y_test": rng.integers(0, 4, n_test),
    }


def save(tmp_path, name, arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def assert_same(a: DataSplits, b: DataSplits):
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)
    assert a.mean == pytest.approx(b.mean) and a.std == pytest.approx(b.std)


def test_npz_layouts_agree(tmp_path):
    arrays = make_arrays()
    nchw = load_data(f"npz:{save(tmp_path, 'nchw.npz', arrays)}")
    nhwc_arrays = {k: v.transpose(0, 2, 3, 1) if k[0] == "x" else v for k, v in arrays.items()}
    nhwc = load_data(f"npz:{save(tmp_path, 'nhwc.npz', nhwc_arrays)}")
    float_arrays = {k: v / 255.0 if k[0] == "x" else v for k, v in nhwc_arrays.items()}
    floats = load_data(f"npz:{save(tmp_path, 'float.npz', float_arrays)}")
    assert_same(nchw, nhwc)
    assert_same(nchw, floats)
    assert nchw.in_channels == 3 and nchw.image_size == (32, 32) and nchw.num_classes == 4
    assert nchw.augment is True
    assert len(nchw.train) + len(nchw.val) == 40 and len(nchw.test) == 12


def test_npz_grayscale_is_not_augmented(tmp_path):
    arrays = make_arrays(shape_chw=(28, 28))
    data = load_data(f"npz:{save(tmp_path, 'gray.npz', arrays)}")
    assert data.in_channels == 1 and data.image_size == (28, 28)
    assert data.augment is False


def test_augmentation_changes_pixels_keeps_shape(tmp_path):
    data = load_data(f"npz:{save(tmp_path, 'c.npz', make_arrays())}")
    plain, _ = next(data.batches("train", batch_size=64, shuffle=False, augment=False))
    augmented, y = next(data.batches("train", batch_size=64, shuffle=False, seed=0))
    assert augmented.shape == plain.shape == (len(data.train), 3, 32, 32)
    assert torch.equal(y, data.train.y)
    changed = (augmented != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.8
    # Each image is a 32x32 crop of the original zero-padded by 4 pixels, maybe flipped.
    padded = torch.nn.functional.pad(data.train.x, (4, 4, 4, 4))
    for image, original in zip(augmented[:8], padded):
        crops = data.normalize(original.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4))
        crops = torch.cat([crops.flatten(0, 1), crops.flatten(0, 1).flip(3)])
        assert (crops == image).flatten(1).all(1).any()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("y_test"), "no array 'y_test'"),
        (lambda a: a.update(y_train=a["y_train"][:-1]),
         "y_train in .* has 39 labels but x_train has 40"),
        (lambda a: a.update(y_test=a["y_test"] * 0.5), "y_test in .* integer"),
        (lambda a: a.update(x_train=a["x_train"][:, 0, 0]), "x_train in .* dimensions"),
        (lambda a: a.update(x_test=a["x_test"] * 2.0), "x_test in .* float images must lie in"),
        (lambda a: a.update(y_train=a["y_train"] - 9), "y_train in .* negative"),
        (lambda a: a.update(x_test=a["x_test"][:, :, :16]), "x_test in .* shape"),
    ],
)
def test_npz_bad_arrays(tmp_path, change, message):
    arrays = make_arrays()
    change(arrays)
    path = save(tmp_path, "bad.npz", arrays)
    with pytest.raises(DataSourceError, match=message) as info:
        load_data(f"npz:{path}")
    assert str(path) in str(info.value)


def test_npz_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(DataSourceError, match=f"data file not found: {path}"):
        load_data(f"npz:{path}")


def test_npz_of_a_folder_says_what_it_takes(tmp_path):
    with pytest.raises(DataSourceError, match=f"npz:{tmp_path} is a folder; npz: takes one .npz file holding "
                                              "x_train, y_train, x_test, y_test"):
        load_data(f"npz:{tmp_path}")


def test_sources_record_their_class_names_and_channel_order(tmp_path):
    digits = load_data("digits")
    assert digits.class_names == tuple(str(d) for d in range(10)) and digits.channel_order == "gray"
    plain = load_data(f"npz:{save(tmp_path, 'plain.npz', make_arrays())}")
    assert plain.class_names is None and plain.channel_order == "as stored"
    named = load_data(f"npz:{save(tmp_path, 'named.npz', {**make_arrays(), 'class_names': np.array(list('abcd'))})}")
    assert named.class_names == ("a", "b", "c", "d")
    record = named.preprocessing()
    assert record["class_names"] == ["a", "b", "c", "d"] and record["input_shape"] == [1, 3, 32, 32]
    assert record["mean"] == list(named.mean) and record["std"] == list(named.std)
    with pytest.raises(DataSourceError, match="class_names in .* must list one name per class"):
        load_data(f"npz:{save(tmp_path, 'short.npz', {**make_arrays(), 'class_names': np.array(['a'])})}")


def test_npz_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataSourceError, match="could not read data file") as info:
        load_data(f"npz:{path}")
    assert str(path) in str(info.value)


def test_npz_plain_npy_rejected(tmp_path):
    path = tmp_path / "single.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(DataSourceError, match="not an .npz archive"):
        load_data(f"npz:{path}")


# --- cifar / imagefolder --------------------------------------------------------------------

@pytest.mark.parametrize("kind, name", [("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")])
def test_cifar_missing(tmp_path, kind, name):
    with pytest.raises(DataSourceError) as info:
        load_data(f"{kind}:{tmp_path}")
    text = str(info.value)
    assert str(tmp_path) in text and name in text and "download=True" in text
    assert f"{kind}:{tmp_path}?download=1" in text


def make_image_folder(root, splits=("train", "val"), classes=("a", "b"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagefolder_loads(tmp_path):
    make_image_folder(tmp_path, per_class=5)
    data = load_data(f"imagefolder:{tmp_path}", val_fraction=0.2)
    assert data.num_classes == 2 and data.in_channels == 3 and data.image_size == (32, 32)
    assert len(data.train) + len(data.val) == 10 and len(data.test) == 10
    assert data.augment is True
    assert sorted(data.test.y.tolist()) == [0] * 5 + [1] * 5
    small = load_data(f"imagefolder:{tmp_path}?size=16")
    assert small.image_size == (16, 16)
    assert data.channel_order == "RGB" and data.class_names == tuple(sorted(data.class_names))
    assert small.preprocessing()["resize"] == {"size": [16, 16], "method": "bilinear", "convert": "RGB"}


def test_imagefolder_prefers_test_folder(tmp_path):
    make_image_folder(tmp_path, splits=("train", "val"))
    make_image_folder(tmp_path, splits=("test",), per_class=1)
    assert len(load_data(f"imagefolder:{tmp_path}").test) == 2


def test_imagefolder_missing_train(tmp_path):
    make_image_folder(tmp_path, splits=("val",))
    with pytest.raises(DataSourceError, match="no train/ folder") as info:
        load_data(f"imagefolder:{tmp_path}")
    assert str(tmp_path) in str(info.value)


def test_imagefolder_class_mismatch(tmp_path):
    make_image_folder(tmp_path, splits=("train",))
    make_image_folder(tmp_path, splits=("val",), classes=("a", "c"))
    with pytest.raises(DataSourceError, match="class folders differ"):
        load_data(f"imagefolder:{tmp_path}")


# --- source strings and arguments -----------------------------------------------------------

def test_parse_data_source():
    assert parse_data_source("digits") == ("digits", None)
    assert parse_data_source("npz:/data/a.npz") == ("npz", "/data/a.npz")
    assert parse_data_source("cifar10:/data?download=1") == ("cifar10", "/data")
    assert parse_data_source("imagefolder:/img?size=64") == ("imagefolder", "/img")


@pytest.mark.parametrize(
    "source, message",
    [
        ("mnist", "unknown data source 'mnist'; expected digits, npz:PATH, cifar10:ROOT, "
                  "cifar100:ROOT or imagefolder:ROOT"),
        ("npz:", "needs a path"),
        ("digits:/x", "takes no path"),
        ("npz:/a.npz?download=1", "bad option 'download=1'"),
        ("cifar10:/data?size=3", "bad option 'size=3'"),
    ],
)
def test_bad_sources(source, message):
    with pytest.raises(DataSourceError) as info:
        parse_data_source(source)
    assert message in str(info.value)


def test_bad_option_values(tmp_path):
    with pytest.raises(DataSourceError, match="bad size 'big'"):
        load_data(f"imagefolder:{tmp_path}?size=big")
    with pytest.raises(DataSourceError, match="download=1"):
        load_data(f"cifar10:{tmp_path}?download=yes")


@pytest.mark.parametrize("fraction", [0, 0.9, -0.1])
def test_bad_val_fraction(fraction):
    expected = f"val_fraction must be in (0, 0.5], got {fraction}"
    with pytest.raises(DataSourceError, match=re.escape(expected)):
        load_data("digits", val_fraction=fraction)
