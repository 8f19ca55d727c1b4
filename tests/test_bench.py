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
