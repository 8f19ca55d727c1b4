"""Shared by the benchmarks: base models trained once with a fixed recipe and cached."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from widthsearch import load_data, load_model, save_checkpoint
from widthsearch.training import TrainConfig, evaluate, train

CACHE = Path(__file__).resolve().parent / "cache"
RESULTS = Path(__file__).resolve().parent / "results"  # JSON figures that bench/report.py turns into RESULTS.md
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-5k.npz"


def base_checkpoint(model: str, data: str, epochs: int, lr: float = 0.1, seed: int = 0) -> tuple[Path, dict]:
    """Train (once) and cache a base model; returns its checkpoint and {test_acc, val_acc, train_s}."""
    CACHE.mkdir(exist_ok=True)
    stem = f"{model}-{Path(data.split(':', 1)[-1]).stem}-e{epochs}-s{seed}"
    ckpt, info_path = CACHE / f"{stem}.pt", CACHE / f"{stem}.json"
    if ckpt.is_file() and info_path.is_file():
        return ckpt, json.loads(info_path.read_text())
    splits = load_data(data, seed=seed)
    torch.manual_seed(seed)
    net = load_model(model, splits.num_classes, in_channels=splits.in_channels)
    start = time.time()
    train(net, splits, epochs=epochs, config=TrainConfig(lr=lr), seed=seed, progress=f"base {model}")
    info = {"model": model, "data": data, "epochs": epochs, "train_s": time.time() - start,
            "val_acc": evaluate(net, splits, "val")[0], "test_acc": evaluate(net, splits, "test")[0]}
    save_checkpoint(net, ckpt, **{k: v for k, v in info.items() if k != "model"}, model_source=model)
    info_path.write_text(json.dumps(info, indent=1))
    return ckpt, info
