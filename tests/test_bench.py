"""The benchmark's own contracts (bench/ is not the product, but its cells are the proof)."""

from __future__ import annotations

import pytest


def test_bench_refuses_to_resume_a_cell_measured_on_another_base(tmp_path):
    """A base trained again (another CPU, a new checkout's empty cache) is another model: the bench's cells of the
    old one must not be resumed or extended as if they paired; a cell of the same base, or one that does not say,
    passes."""
    from bench.common import check_same_base

    info = {"model": "cifar_resnet20", "val_acc": 0.7662, "test_acc": 0.7532}
    path = tmp_path / "cifar_resnet20-uniform-b0.1-s0.json"
    check_same_base({"base_info": dict(info)}, info, path)
    check_same_base({"method": "uniform"}, info, path)
    old = {"base_info": {"val_acc": 0.7404, "test_acc": 0.7473, "cpu": "Intel Xeon"}}
    with pytest.raises(SystemExit, match=r"cifar_resnet20-uniform-b0.1-s0.json was measured on another cifar_resnet20 "
                                         r"base \(val 0.7404, test 0.7473, trained on Intel Xeon\)"):
        check_same_base(old, info, path)


def test_a_base_kept_in_git_is_found_before_the_cache(tmp_path, monkeypatch):
    """bench/checkpoints/ (in git) comes before bench/cache/ (a new checkout's is empty): the bench reuses the kept
    base instead of training another model on this machine."""
    import json

    from bench import common

    kept, cache = tmp_path / "kept", tmp_path / "cache"
    monkeypatch.setattr(common, "KEPT", kept)
    monkeypatch.setattr(common, "CACHE", cache)
    stem = common.base_stem("cifar_resnet20", "npz:/data/cifar10-5k.npz", 80)
    for folder, acc in ((cache, 0.5), (kept, 0.7)):
        folder.mkdir()
        (folder / f"{stem}.pt").write_bytes(b"weights")
        (folder / f"{stem}.json").write_text(json.dumps({"val_acc": acc}))
    ckpt, info = common.base_checkpoint("cifar_resnet20", "npz:/data/cifar10-5k.npz")
    assert ckpt == kept / f"{stem}.pt" and info == {"val_acc": 0.7}
    (kept / f"{stem}.json").unlink()  # a checkpoint without its info is not a kept base
    assert common.base_checkpoint("cifar_resnet20", "npz:/data/cifar10-5k.npz")[0] == cache / f"{stem}.pt"
