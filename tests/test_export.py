"""Export folders: every file, ONNX Runtime parity with PyTorch, load_exported from the package top level."""

import json

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from widthsearch import build_space, load_exported, load_model, prune
from widthsearch.errors import WidthSearchError
from widthsearch.export import FILES, ONNX_TOLERANCE, export
from widthsearch.training import train


@pytest.mark.parametrize("model_name", ["small_cnn", "cifar_resnet20"])
def test_export_onnx_matches_pytorch(digits, tmp_path, model_name):
    torch.manual_seed(0)
    dense = load_model(model_name, digits.num_classes, in_channels=digits.in_channels)
    train(dense, digits, steps=10)  # trained weights and BatchNorm statistics, not the initialisation
    dense.eval()
    space = build_space(dense, digits.example_input)
    profile = space.uniform(0.5)
    pruned = prune(dense, space, profile, "l1").eval()
    source = {"model": model_name, "num_classes": digits.num_classes, "in_channels": digits.in_channels,
              "input_size": list(digits.image_size)}
    out = export(pruned, dense, tmp_path / "export", profile=profile, source=source, metrics={"test_acc": 0.5},
                 example_input=digits.example_input, check_input=digits.normalize(digits.val.x[:32]))

    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_acc"] == 0.5 and metrics["onnx_check_batch"] == 32 and metrics["onnx_opset"] == 17
    assert 0 <= metrics["onnx_max_abs_diff"] <= ONNX_TOLERANCE
    print(f"{model_name}: onnx_max_abs_diff {metrics['onnx_max_abs_diff']:.3g}")

    x = digits.normalize(digits.test.x[:5])  # a batch size seen neither by the trace nor by the check
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    reloaded = load_exported(out)
    with torch.no_grad():
        want = reloaded(x).numpy()
        assert np.array_equal(want, pruned(x).numpy())
    assert got.shape == (5, digits.num_classes)
    assert np.abs(got - want).max() <= ONNX_TOLERANCE
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in dense.parameters())


class BatchDependent(nn.Module):
    """Python control flow on the batch size: a trace keeps only the branch of the traced batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        return logits if x.shape[0] == 1 else logits + 1.0


def test_export_fails_when_onnx_differs_from_pytorch(digits, tmp_path):
    model = BatchDependent().eval()
    with pytest.raises(WidthSearchError, match=r"ONNX export does not match PyTorch: max abs difference 1 on a "
                                               r"batch of 8 inputs exceeds the tolerance 0.0001"):
        export(model, model, tmp_path / "export", profile={}, source={}, metrics={},
               example_input=digits.example_input, check_input=digits.normalize(digits.val.x[:8]))
    assert not (tmp_path / "export").exists()
