"""Export a pruned model (weights, profile, model source, metrics, TorchScript, latency) and load it back."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .errors import WidthSearchError
from .models import load_model
from .space import build_space
from .surgery import prune

FILES = ("weights.pt", "profile.json", "model.json", "metrics.json", "model.torchscript.pt", "latency.json")


@torch.no_grad()
def measure_latency(model: nn.Module, example: torch.Tensor, batch_sizes=(1, 64), repeats: int = 20) -> dict:
    """Median forward time in milliseconds per batch size, eval mode, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for bs in batch_sizes:
        x = example[:1].to(device).expand(bs, *example.shape[1:]).contiguous()
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        out[f"batch{bs}_ms"] = statistics.median(times)
    return out


def export(pruned: nn.Module, dense: nn.Module, out_dir: str | Path, *, profile: Mapping[str, int],
           source: Mapping, metrics: Mapping, example_input: torch.Tensor) -> Path:
    """Write the export folder atomically (a temp folder renamed into place); refuse to overwrite.

    `source` = {"model": model source, "num_classes", "in_channels", "frozen", "min_width", "divisor"}:
    enough for `load_exported` to rebuild the architecture.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise WidthSearchError(f"export folder {out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    pruned, dense = pruned.cpu().eval(), dense.cpu().eval()
    example = example_input.cpu()
    latency = {"device": "cpu", "dense": measure_latency(dense, example), "pruned": measure_latency(pruned, example)}
    latency["speedup_batch1"] = latency["dense"]["batch1_ms"] / latency["pruned"]["batch1_ms"]
    latency["speedup_batch64"] = latency["dense"]["batch64_ms"] / latency["pruned"]["batch64_ms"]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        folder = Path(tmp)
        torch.save(pruned.state_dict(), folder / "weights.pt")
        (folder / "profile.json").write_text(json.dumps(dict(profile), indent=1))
        (folder / "model.json").write_text(json.dumps(dict(source), indent=1))
        (folder / "metrics.json").write_text(json.dumps(dict(metrics), indent=1))
        (folder / "latency.json").write_text(json.dumps(latency, indent=1))
        torch.jit.trace(pruned, example).save(str(folder / "model.torchscript.pt"))
        if out.exists():
            out.rmdir()
        shutil.move(str(folder), str(out))
        folder.mkdir()  # let TemporaryDirectory clean up its (now empty) name
    return out


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
