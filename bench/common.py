"""Shared by the benchmarks: the bench data split and base models trained once with a fixed recipe and cached.

Bench protocol (every script): CIFAR-10 subset `../shared/datasets/cifar10-5k.npz`, validation split
= 20% of train carved with split seed 0 (4,068 train, 1,017 val images), test = the file's 1,017 test
images, used only for final numbers. Bases: SGD momentum 0.9, nesterov, weight decay 5e-4, batch 128,
lr 0.1 with a cosine schedule, crop + flip, `BASE_EPOCHS` epochs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from widthsearch import load_data, load_model, save_checkpoint
from widthsearch.training import TrainConfig, evaluate, train

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / "cache"
RESULTS = BENCH / "results"  # JSON figures that bench/report.py turns into RESULTS.md
DEFAULT_DATA = BENCH.parents[1] / "shared" / "datasets" / "cifar10-5k.npz"
VAL_FRACTION = 0.2
SPLIT_SEED = 0
BASE_EPOCHS = {"cifar_resnet20": 80, "cifar_resnet56": 80}
BASE_LR = 0.1


def bench_data(data: str):
    """The bench split of `data` (20% val, split seed 0)."""
    return load_data(data, val_fraction=VAL_FRACTION, seed=SPLIT_SEED)


def machine_load() -> float:
    """1-minute load average (recorded with every timing: timings under load are not comparable)."""
    return os.getloadavg()[0]


def base_checkpoint(model: str, data: str, epochs: int | None = None, lr: float = BASE_LR,
                    seed: int = 0) -> tuple[Path, dict]:
    """Train (once) and cache a base model on the bench split; returns its checkpoint and its info
    (val/test accuracy, training seconds, load average). The checkpoint records its split."""
    epochs = epochs or BASE_EPOCHS[model]
    CACHE.mkdir(exist_ok=True)
    stem = f"{model}-{Path(data.split(':', 1)[-1]).stem}-v{VAL_FRACTION}-e{epochs}-s{seed}"
    ckpt, info_path = CACHE / f"{stem}.pt", CACHE / f"{stem}.json"
    if ckpt.is_file() and info_path.is_file():
        return ckpt, json.loads(info_path.read_text())
    splits = bench_data(data)
    torch.manual_seed(seed)
    net = load_model(model, splits.num_classes, in_channels=splits.in_channels)
    start = time.time()
    train(net, splits, epochs=epochs, config=TrainConfig(lr=lr), seed=seed, progress=f"base {model}")
    info = {"model": model, "data": data, "epochs": epochs, "lr": lr, "train_s": time.time() - start,
            "loadavg_1m": machine_load(), "val_acc": evaluate(net, splits, "val")[0],
            "test_acc": evaluate(net, splits, "test")[0], "split": splits.split}
    save_checkpoint(net, ckpt, model_source=model, data=data, epochs=epochs, val_acc=info["val_acc"],
                    split=splits.split)
    info_path.write_text(json.dumps(info, indent=1))
    return ckpt, info
