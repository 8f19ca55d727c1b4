"""Export a pruned model (weights, profile, model source, metrics, TorchScript, ONNX, latency) and load it back.

ONNX goes through torch's TorchScript-based exporter (`dynamo=False`; torch before 2.5 has no other and no
`dynamo` argument): it needs only the `onnx` package, no network, and exports these models in about a second
(checked on torch 2.14.1). torch 2.9+ prefers its torch.export-based exporter, which also needs `onnxscript`
and took about four times longer here; it becomes the path once the TorchScript exporter is removed (torch is
capped at 2.14.1). Every ONNX file is checked: ONNX Runtime must reproduce PyTorch's outputs on a batch of
inputs (another batch size than the one traced).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import nn

from .errors import WidthSearchError
from .models import load_model
from .space import build_space, device_of
from .storage import filesystem
from .surgery import prune
from .timing import time_ms

FILES = ("weights.pt", "profile.json", "model.json", "metrics.json", "model.torchscript.pt", "model.onnx",
         "latency.json", "preprocessing.json")
ONNX_PREPROCESSING = "widthsearch.preprocessing"  # the ONNX metadata key holding preprocessing.json's record
ONNX_OPSET = 17            # supported by torch 2.1..2.14's TorchScript exporter and by ONNX Runtime >= 1.13
ONNX_TOLERANCE = 1e-4      # max abs difference of ONNX Runtime's outputs from PyTorch's


@torch.no_grad()
def measure_latency(model: nn.Module, example: torch.Tensor, batch_sizes=(1, 64)) -> dict:
    """Milliseconds per forward ("batch{N}_ms", the median wall-clock sample of `timing.time_ms`) per batch size,
    eval mode, on the model's device."""
    model.eval()
    device = device_of(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for bs in batch_sizes:
        x = example[:1].to(device).expand(bs, *example.shape[1:]).contiguous()
        out[f"batch{bs}_ms"] = time_ms(lambda: model(x), sync)
    return out


def legacy_onnx_kwargs() -> dict:
    """torch.onnx.export's arguments that choose the TorchScript-based exporter (see the module docstring)."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


@contextlib.contextmanager
def _torchscript_chosen() -> Iterator[None]:
    """A block in which torch's deprecation warnings about TorchScript (its tracer, its ONNX exporter: chosen on
    purpose, see the module docstring) are not shown to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        yield


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, check_input: torch.Tensor,
                tolerance: float = ONNX_TOLERANCE, metadata: Mapping[str, str] | None = None) -> dict:
    """Write `model` (CPU, eval) as ONNX with a dynamic batch axis and `metadata` (the model's metadata_props);
    check it in ONNX Runtime on `check_input`.

    Returns {"onnx_opset", "onnx_check_batch", "onnx_max_abs_diff"}; raises WidthSearchError when ONNX
    Runtime's outputs differ from PyTorch's by more than `tolerance`.
    """
    import onnx
    import onnxruntime

    with _torchscript_chosen():
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET,
                          **legacy_onnx_kwargs())
    if metadata:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, dict(metadata))
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": check_input.numpy()})[0]
    diff = float(np.abs(got - model(check_input).numpy()).max())
    if not diff <= tolerance:
        raise WidthSearchError(f"ONNX export does not match PyTorch: max abs difference {diff:.3g} on a batch of "
                               f"{len(check_input)} inputs exceeds the tolerance {tolerance:g}")
    return {"onnx_opset": ONNX_OPSET, "onnx_check_batch": len(check_input), "onnx_max_abs_diff": diff}


def check_export_folder(out_dir: str | os.PathLike) -> None:
    """WidthSearchError when the folder `out_dir` (a local path or a URI) exists and is not empty (an export never
    overwrites)."""
    fs, path = filesystem(str(out_dir))
    if fs.get_file_info(path).type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
        raise WidthSearchError(f"export folder {out_dir} already exists and is not empty")


def export(pruned: nn.Module, dense: nn.Module, out_dir: str | Path, *, profile: Mapping[str, int],
           source: Mapping, metrics: Mapping, example_input: torch.Tensor,
           check_input: torch.Tensor | None = None, preprocessing: Mapping | None = None) -> Path:
    """Write the export folder atomically (a temp folder renamed into place, with the usual file modes); refuse
    to overwrite.

    `source` = {"model": model source, "num_classes", "in_channels", "frozen", "min_width", "divisor"}:
    enough for `load_exported` to rebuild the architecture. `check_input` is the batch on which ONNX Runtime
    must match PyTorch (default: `example_input`); metrics.json gets the ONNX figures. `preprocessing`
    (`DataSplits.preprocessing()`: input shape, mean, std, channel order, class names, data source) goes to
    preprocessing.json and into the ONNX model's metadata (key ONNX_PREPROCESSING); `load_preprocessing`
    reads it back.
    """
    check_export_folder(out_dir)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    pruned, dense = pruned.cpu().eval(), dense.cpu().eval()
    example = example_input.cpu()
    check = example if check_input is None else check_input.cpu()
    latency = {"device": "cpu", "dense": measure_latency(dense, example), "pruned": measure_latency(pruned, example)}
    latency["speedup_batch1"] = latency["dense"]["batch1_ms"] / latency["pruned"]["batch1_ms"]
    latency["speedup_batch64"] = latency["dense"]["batch64_ms"] / latency["pruned"]["batch64_ms"]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        folder = Path(tmp)
        torch.save(pruned.state_dict(), folder / "weights.pt")
        (folder / "profile.json").write_text(json.dumps(dict(profile), indent=1))
        (folder / "model.json").write_text(json.dumps(dict(source), indent=1))
        record = dict(preprocessing or {})
        (folder / "preprocessing.json").write_text(json.dumps(record, indent=1))
        onnx_check = export_onnx(pruned, folder / "model.onnx", example, check,
                                 metadata={ONNX_PREPROCESSING: json.dumps(record)} if record else None)
        (folder / "metrics.json").write_text(json.dumps({**metrics, **onnx_check}, indent=1))
        (folder / "latency.json").write_text(json.dumps(latency, indent=1))
        with _torchscript_chosen():
            torch.jit.trace(pruned, example).save(str(folder / "model.torchscript.pt"))
        if out.exists():
            out.rmdir()
        umask = os.umask(0)
        os.umask(umask)
        folder.chmod(0o777 & ~umask)  # a temporary folder is private (0700); an export is not
        shutil.move(str(folder), str(out))
        folder.mkdir()  # let TemporaryDirectory clean up its (now empty) name
    return out


def load_preprocessing(folder: str | Path) -> dict:
    """The preprocessing record of an export folder (preprocessing.json; exports made before it: {})."""
    path = Path(folder) / "preprocessing.json"
    if not (Path(folder) / "model.json").is_file():
        raise WidthSearchError(f"{folder} is not a widthsearch export (missing model.json)")
    return json.loads(path.read_text()) if path.is_file() else {}


def load_exported(folder: str | Path) -> nn.Module:
    """Rebuild the pruned architecture from an export folder and load its weights (eval mode)."""
    folder = Path(folder)
    missing = [f for f in ("weights.pt", "profile.json", "model.json") if not (folder / f).is_file()]
    if missing:
        raise WidthSearchError(f"{folder} is not a widthsearch export (missing {', '.join(missing)})")
    source = json.loads((folder / "model.json").read_text())
    profile = json.loads((folder / "profile.json").read_text())
    dense = load_model(source["model"], source["num_classes"], in_channels=source["in_channels"])
    example = torch.zeros(1, source["in_channels"], *source["input_size"])
    space = build_space(dense, example, source.get("frozen", ()), source.get("min_width", 1), source.get("divisor", 1))
    model = prune(dense, space, profile, "l1")
    model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval()
