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
from widthsearch.target import device_name as target_device_name
from widthsearch.training import TrainConfig, evaluate, train, train_base

BENCH = Path(__file__).resolve().parent
# Where cells go: bench/cache and bench/results of this checkout, unless BENCH_CACHE / BENCH_RESULTS name other
# folders (a pinned worktree that runs cells while the main checkout changes writes into the main one's).
CACHE = Path(os.environ.get("BENCH_CACHE", BENCH / "cache"))
# Bases kept in git (`python -m bench.bases --keep`), found before CACHE: a base trained again on another CPU, or in
# a new checkout's empty cache, is another model, whose cells would not pair with the ones already measured.
KEPT = BENCH / "checkpoints"
RESULTS = Path(os.environ.get("BENCH_RESULTS", BENCH / "results"))  # JSON figures bench/report.py turns into RESULTS.md
DEFAULT_DATA = BENCH.parents[1] / "shared" / "datasets" / "cifar10-5k.npz"
VAL_FRACTION = 0.2
SPLIT_SEED = 0
BASE_EPOCHS = {"cifar_resnet20": 80, "cifar_resnet56": 80, "cifar_vgg16": 30}  # vgg16: 80 epochs are ~2.5 h on one core
BASE_LR = 0.1
DEVICE = "cpu"  # where bases, retrains and scores run (bench scripts' --device); CPU latency stays on the CPU


def use_device(name: str) -> str:
    """Run the bench's training and evaluation on `name` ("cpu" or "cuda"); refuses a CUDA that is not there."""
    global DEVICE
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device on this machine")
    DEVICE = name
    return device_name()


def device_name() -> str:
    """What the figures ran on, recorded in every cell (a GPU's name, or "cpu")."""
    return torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else "cpu"


def bench_data(data: str):
    """The bench split of `data` (20% val, split seed 0)."""
    return load_data(data, val_fraction=VAL_FRACTION, seed=SPLIT_SEED)


def machine_load() -> float:
    """1-minute load average (recorded with every timing: timings under load are not comparable)."""
    return os.getloadavg()[0]


def base_stem(model: str, data: str, epochs: int, seed: int = 0) -> str:
    """The file name (without suffix) of a base's checkpoint and info."""
    return f"{model}-{Path(data.split(':', 1)[-1]).stem}-v{VAL_FRACTION}-e{epochs}-s{seed}"


def base_checkpoint(model: str, data: str, epochs: int | None = None, lr: float = BASE_LR,
                    seed: int = 0) -> tuple[Path, dict]:
    """Train (once) and cache a base model on the bench split; returns its checkpoint and its info
    (val/test accuracy, training seconds, load average). The checkpoint records its split. A base kept in git
    (bench/checkpoints/) is used before the cache."""
    epochs = epochs or BASE_EPOCHS[model]
    stem = base_stem(model, data, epochs, seed)
    found = stored_base(stem)
    if found:
        return found
    ckpt, info_path = CACHE / f"{stem}.pt", CACHE / f"{stem}.json"
    CACHE.mkdir(exist_ok=True)
    splits = bench_data(data)
    start, cpu_start = time.time(), time.process_time()
    net = train_base(model, splits, epochs=epochs, config=TrainConfig(lr=lr, channels_last=False), seed=seed,
                     device=DEVICE, progress=f"base {model}")
    info = {"model": model, "data": data, "epochs": epochs, "lr": lr, "train_s": time.time() - start,
            "cpu_s": time.process_time() - cpu_start, "threads": torch.get_num_threads(),
            "loadavg_1m": machine_load(), "device": device_name(), "cpu": target_device_name("cpu"),
            "val_acc": evaluate(net, splits, "val", device=DEVICE)[0],
            "test_acc": evaluate(net, splits, "test", device=DEVICE)[0], "split": splits.split}
    net.cpu()
    save_checkpoint(net, ckpt, model_source=model, data=data, epochs=epochs, val_acc=info["val_acc"],
                    split=splits.split)
    info_path.write_text(json.dumps(info, indent=1))
    return ckpt, {**info, "base_id": base_id(ckpt)}


def base_id(ckpt: Path) -> str:
    """A base's identity: the first 10 hex digits of its checkpoint file's SHA-256 (cells pair within one base)."""
    import hashlib

    return hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]


def stored_base(stem: str) -> tuple[Path, dict] | None:
    """The base `stem` kept in git or cached (checkpoint, info with its base_id), None where there is none."""
    for folder in (KEPT, CACHE):
        ckpt, info_path = folder / f"{stem}.pt", folder / f"{stem}.json"
        if ckpt.is_file() and info_path.is_file():
            return ckpt, {**json.loads(info_path.read_text()), "base_id": base_id(ckpt)}
    return None


def current_base_id(model: str) -> str | None:
    """The base_id of the base the bench would use now for `model` (default data, epochs, seed), None where it
    would have to train one."""
    found = stored_base(base_stem(model, f"npz:{DEFAULT_DATA}", BASE_EPOCHS[model]))
    return found[1]["base_id"] if found else None


def check_same_base(cell: dict, info: dict, path: Path) -> None:
    """Refuse to resume or extend a cell (`path`, its JSON `cell`) measured on another base than `info`'s: cells of
    two bases do not pair. A base trained again with the same recipe on another CPU is another model (other
    kernels, other rounding), and bench/cache is not in git, so a new checkout trains its bases afresh."""
    old = cell.get("base_info")
    if not old or (old.get("base_id", info["base_id"]) == info["base_id"]
                   and (old.get("val_acc"), old.get("test_acc")) == (info["val_acc"], info["test_acc"])):
        return
    raise SystemExit(f"{path} was measured on another {info['model']} base (val {old['val_acc']:.4f}, test "
                     f"{old['test_acc']:.4f}, trained on {old.get('cpu') or 'an earlier machine'}) than the one in "
                     f"{KEPT} or {CACHE} (val {info['val_acc']:.4f}, test {info['test_acc']:.4f}): their cells do not "
                     "pair. Put that base's checkpoint there, or write this base's cells elsewhere (BENCH_RESULTS).")


def bench_base(model: str, data: str):
    """The cached base of `model` with everything a bench script needs: (checkpoint, info, splits, model,
    width space, cost model)."""
    from widthsearch import CostModel, build_space

    ckpt, info = base_checkpoint(model, data)
    splits = bench_data(data)
    base = load_model(model, splits.num_classes, checkpoint=str(ckpt), in_channels=splits.in_channels)
    space = build_space(base, splits.example_input)
    return ckpt, info, splits, base, space, CostModel(space)


# ----------------------------------------------------------------------------- retrain cells
RETRAIN_EPOCHS = 20
RETRAIN_LR = 0.05  # and contiguous (NCHW) tensors, as the first cells were retrained (channels-last came later)
# The quality table's recipe (bench/quality.py --recipe): 40 epochs, because at FLOPs 0.1 the 20-epoch retrain
# left the pruned cifar_resnet20 models 4-9 points short of what they reach and its seed noise (pooled std 3.1 val /
# 2.7 test points over three profiles x 5 seeds) hid differences the table must decide; 40 epochs: 1.4 / 1.5
# (bench/results/retrain_noise/, 2026-12-07). Cells of two recipes do not pair: each recipe has its own folder.
QUALITY_RECIPE = "40x0.05"


def parse_recipe(text: str) -> tuple[int, float]:
    """'20x0.05' -> (20 epochs, lr 0.05); a ValueError naming `text` unless epochs >= 1 and lr > 0."""
    try:
        epochs_text, lr_text = text.split("x")
        epochs, lr = int(epochs_text), float(lr_text)
    except ValueError:
        epochs, lr = 0, 0.0
    if epochs < 1 or not lr > 0:
        raise ValueError(f"recipe {text!r}: expected EPOCHSxLR with EPOCHS >= 1 and LR > 0, like 20x0.05")
    return epochs, lr


def recipe_name(epochs: int, lr: float) -> str:
    """The inverse of parse_recipe: (40, 0.05) -> '40x0.05' (a quality cell's recipe folder)."""
    return f"{epochs}x{lr:g}"


def cell_recipe(cell: dict) -> tuple[int, float]:
    """A quality cell's retrain (epochs, lr); cells from before the recipe became an option: 20 epochs at 0.05."""
    return cell.get("retrain_epochs", RETRAIN_EPOCHS), cell.get("retrain_lr", RETRAIN_LR)


def profile_key(widths, keep: dict | None = None) -> str:
    """A short stable id of a width profile (and of the exact channels kept, when given)."""
    import hashlib

    text = json.dumps({"widths": [int(w) for w in widths], "keep": keep}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def correct_mask(model, data, split: str = "test") -> str:
    """Which images of `split` the model classifies correctly, as a hex string of bits (in split order)."""
    import numpy as np

    model.eval()
    hits = []
    with torch.no_grad():
        for x, y in data.batches(split, 512, shuffle=False, device=DEVICE):
            hits.append((model(x).argmax(1) == y).cpu().numpy())
    return np.packbits(np.concatenate(hits)).tobytes().hex()


def unpack_mask(text: str, n: int):
    """The boolean array written by correct_mask."""
    import numpy as np

    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def retrain_cell(base_name: str, model: torch.nn.Module, data, *, seed: int, epochs: int = RETRAIN_EPOCHS,
                 lr: float = RETRAIN_LR, label: str = "") -> dict:
    """Retrain an already pruned `model` (in place) with the bench's fixed recipe; cached as one JSON per
    (base, architecture, weights digest, epochs, lr, seed) under bench/results/retrain/.

    Returns val/test accuracy, the per-image test correctness (for paired statistics), seconds and load.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    key = f"{base_name}-{digest.hexdigest()[:16]}-e{epochs}-lr{lr:g}-s{seed}"
    path = RESULTS / "retrain" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    start = time.time()
    torch.manual_seed(seed)
    train(model, data, epochs=epochs, config=TrainConfig(lr=lr, channels_last=False), seed=seed, device=DEVICE)
    cell = {"key": key, "label": label, "base": base_name, "epochs": epochs, "lr": lr, "seed": seed,
            "train_s": time.time() - start, "loadavg_1m": machine_load(), "threads": torch.get_num_threads(),
            "device": device_name(), "val_acc": evaluate(model, data, "val", device=DEVICE)[0],
            "test_acc": evaluate(model, data, "test", device=DEVICE)[0],
            "test_correct": correct_mask(model, data, "test"), "date": time.strftime("%Y-%m-%d")}
    model.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell, indent=1))
    return cell
