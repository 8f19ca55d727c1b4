"""Export folders: every file, ONNX Runtime parity with PyTorch, load_exported from the package top level."""

import json

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from widthsearch import build_space, load_exported, load_model, load_preprocessing, prune
from widthsearch.errors import WidthSearchError
from widthsearch.export import FILES, ONNX_PREPROCESSING, ONNX_TOLERANCE, export
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


def test_the_export_carries_its_preprocessing_and_normal_file_modes(digits, tmp_path):
    """A deployer reads mean, std, channel order and class names from the folder or from the ONNX model alone."""
    torch.manual_seed(0)
    dense = load_model("small_cnn", digits.num_classes, in_channels=digits.in_channels).eval()
    space = build_space(dense, digits.example_input)
    profile = space.uniform(0.5)
    pruned = prune(dense, space, profile, "l1").eval()
    source = {"model": "small_cnn", "num_classes": digits.num_classes, "in_channels": digits.in_channels,
              "input_size": list(digits.image_size)}
    out = export(pruned, dense, tmp_path / "export", profile=profile, source=source, metrics={},
                 example_input=digits.example_input, preprocessing=digits.preprocessing())
    record = load_preprocessing(out)
    assert record["mean"] == list(digits.mean) and record["std"] == list(digits.std)
    assert record["input_shape"] == [1, 1, 8, 8] and record["channel_order"] == "gray" and record["layout"] == "NCHW"
    assert record["class_names"] == [str(d) for d in range(10)] and record["data"] == "digits"
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map[ONNX_PREPROCESSING]) == record
    # feeding the ONNX model from the record alone gives what the training pipeline gives
    pixels = digits.test.x[:4]
    mean, std = np.array(record["mean"])[:, None, None], np.array(record["std"])[:, None, None]
    by_hand = ((pixels.numpy() * record["scale"] - mean) / std).astype(np.float32)
    got = session.run(None, {"input": by_hand})[0]
    with torch.no_grad():
        assert np.abs(got - pruned(digits.normalize(pixels)).numpy()).max() <= ONNX_TOLERANCE
    assert isinstance(load_exported(out), nn.Module)  # unchanged
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask()) and (out.stat().st_mode & 0o055)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


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
