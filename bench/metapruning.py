"""MetaPruning on the bench base (cifar_resnet20, cifar10-5k) at a FLOPs budget: PruningNet cost, BN
recalibration, and how well the generated-weight score ranks profiles against their retrained accuracy.

Stages (each resumable; run them in any order, the `rank` table uses whatever has finished):

* `retrain`: the profile set at the budget (default 0.5): the fidelity bench's profiles at that budget
  (uniform, global, random; bench/fidelity.py, so their retrain cells are shared) and more profiles
  of the `random` searcher (seed 500), 24 in all; extra ones first. Each is pruned to the channels a
  metapruning row keeps (the l1 order's best ``w`` per group, which is what l1 pruning keeps) and
  retrained with the bench recipe (bench/common.py retrain_cell: 20 epochs, lr 0.05, cached in
  bench/results/retrain/). One JSON per profile in bench/results/metapruning/profiles/.
* `nets`: PruningNets trained for each ``--nets`` spec ``STEPS[:LR[:LO-HI]]`` (steps of 128 images,
  learning rate (default 0.01), training profiles' FLOPs range (default all); hidden 32, l1 channel
  order; 0 = the untrained net, i.e. the base weights of the kept channels), cached in bench/cache/;
  their training seconds, and a base SGD step against a PruningNet step timed back to back, go to
  bench/results/metapruning/nets.json.
* `score`: every finished profile scored with every net (generated weights, BN recalibrated on
  ``--bn-batches`` batches of 128, val accuracy), written into its JSON.
* `bn`: the BN recalibration study: the first ``--bn-profiles`` profiles scored with the last net of
  ``--nets`` after 1 to 80 recalibration batches, 3 seeds each -> bench/results/metapruning/bn.json.
* `rank` (also printed after `score`): Spearman of each net's score against the retrained test
  accuracy over the profiles finished so far.

    python -m bench.metapruning STAGE [--quick] [--data npz:PATH] [--budget 0.5] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from bench import common
from bench.common import (
    CACHE,
    DEFAULT_DATA,
    RESULTS,
    RETRAIN_EPOCHS,
    base_checkpoint,
    bench_data,
    machine_load,
    profile_key,
    retrain_cell,
)
from searchers import make_searcher
from trainables.metapruning import score_widths, train_pruningnet
from widthsearch import CostModel, build_space, load_model, prune
from widthsearch.pruningnet import PruningNet, channel_order, keep_channels
from widthsearch.storage import Storage
from widthsearch.training import TrainConfig, set_threads, train

MODEL = "cifar_resnet20"
BATCH = 128
LR = 0.01
NETS = ("0", "500", "1500")
HIDDEN = 32
PROFILES = 24
BN_COUNTS = (1, 2, 5, 10, 20, 40, 80)  # the train split is 32 batches of 128
BN_SEEDS = (0, 1, 2)


class Bench:
    """The base model, its space and l1 channel order, and where this bench keeps its files."""

    def __init__(self, data: str, budget: float, quick: bool):
        self.quick, self.budget = quick, budget
        self.ckpt, self.info = base_checkpoint(MODEL, data, 3 if quick else None)
        self.data = bench_data(data)
        self.base = load_model(MODEL, self.data.num_classes, self.ckpt, in_channels=self.data.in_channels).eval()
        self.space = build_space(self.base, self.data.example_input)
        self.cost = CostModel(self.space, self.base)
        self.order = channel_order(self.base, self.space, "l1")
        self.folder = RESULTS / ("metapruning-quick" if quick else "metapruning")
        (self.folder / "profiles").mkdir(parents=True, exist_ok=True)

    def profiles(self, count: int) -> list[dict]:
        """{"widths", "source"}: extra random profiles first, then the fidelity bench's at this budget."""
        from bench.fidelity import profiles as fidelity_profiles

        shared = [p for p in fidelity_profiles(self.base, self.space, self.cost, self.quick)
                  if p["target"] == self.budget]
        seen = {tuple(p["widths"]) for p in shared}
        extra, rand = [], make_searcher("random", self.space, self.cost, budget=self.budget, seed=500)
        while len(extra) < count - len(shared):
            widths = tuple(rand.suggest(f"r{len(extra)}")["widths"])
            if widths not in seen:
                seen.add(widths)
                extra.append({"widths": list(widths), "source": "random"})
        return extra + [{"widths": p["widths"], "source": p["source"]} for p in shared]

    def path(self, widths) -> Path:
        return self.folder / "profiles" / f"{MODEL}-{profile_key(widths)}.json"

    def finished(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.folder / "profiles").glob("*.json"))]

    def net_store(self) -> Storage:
        return Storage(str(CACHE / f"{self.ckpt.stem}-pruningnet"))

    def load_net(self, spec: NetSpec) -> PruningNet:
        net = PruningNet(self.base, self.space, HIDDEN, self.order)
        if spec.steps:
            net.load_state_dict(self.net_store().load_torch(spec.file)["net"])
        return net.eval()

    def available(self, specs: list[NetSpec]) -> list[NetSpec]:
        """The specs whose net exists (the untrained one always does)."""
        return [s for s in specs if s.steps == 0 or self.net_store().has(s.file)]


@dataclass(frozen=True)
class NetSpec:
    """A PruningNet training run: steps, learning rate, FLOPs range of its training profiles."""

    steps: int
    lr: float = LR
    flops: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def parse(cls, text: str) -> "NetSpec":
        """STEPS[:LR[:LO-HI]]"""
        parts = text.split(":")
        flops = tuple(float(x) for x in parts[2].split("-")) if len(parts) > 2 else (0.0, 1.0)
        return cls(int(parts[0]), float(parts[1]) if len(parts) > 1 else LR, flops)

    @property
    def key(self) -> str:
        """The score key in a profile's JSON (net0 for the untrained net)."""
        if self.steps == 0:
            return "net0"
        return f"net{self.steps}-lr{self.lr:g}" + ("" if self.flops == (0.0, 1.0) else f"-f{self.flops[0]:g}-{self.flops[1]:g}")

    @property
    def file(self) -> str:
        rng = "" if self.flops == (0.0, 1.0) else f"-f{self.flops[0]:g}-{self.flops[1]:g}"
        return f"l1-h{HIDDEN}-lr{self.lr:g}-b{BATCH}-{self.steps}{rng}.pt"


def stage_retrain(b: Bench, count: int) -> None:
    todo = b.profiles(count)
    print(f"{len(todo)} profiles at budget {b.budget:g}; {sum(b.path(p['widths']).is_file() for p in todo)} done",
          flush=True)
    for i, p in enumerate(todo):
        path = b.path(p["widths"])
        if path.is_file():
            continue
        model = prune(b.base, b.space, keep=keep_channels(b.space, b.order, p["widths"]))
        cell = retrain_cell(b.ckpt.stem, model, b.data, seed=0, epochs=1 if b.quick else RETRAIN_EPOCHS,
                            label=f"metapruning {p['source']} {b.budget:g}")
        row = {**p, "budget": b.budget, "model": MODEL, "base": b.ckpt.stem,
               "flops_ratio": b.cost.flops_ratio(b.space.from_vector(p["widths"])), "retrain_key": cell["key"],
               "retrain_epochs": cell["epochs"], "retrain_s": cell["train_s"], "test_acc": cell["test_acc"],
               "retrain_val_acc": cell["val_acc"], "scores": {}, "date": time.strftime("%Y-%m-%d")}
        path.write_text(json.dumps(row, indent=1))
        print(f"{i}: {p['source']} flops {row['flops_ratio']:.3f} -> test {row['test_acc']:.4f} "
              f"(retrain {row['retrain_s']:.0f}s, load {machine_load():.1f})", flush=True)


def stage_nets(b: Bench, specs: list[NetSpec]) -> None:
    out = b.folder / "nets.json"
    record = json.loads(out.read_text()) if out.is_file() else {"nets": {}}
    store = b.net_store()
    # one base SGD step against one PruningNet step, timed back to back (the machine is shared)
    probe = load_model(MODEL, b.data.num_classes, b.ckpt, in_channels=b.data.in_channels)
    timing = PruningNet(b.base, b.space, HIDDEN, b.order)
    base_s, meta_s = [], []
    for rep in range(3 if b.quick else 10):
        start = time.time()
        train(probe, b.data, steps=2, config=TrainConfig(lr=LR, batch_size=BATCH), seed=rep, device=common.DEVICE)
        base_s.append((time.time() - start) / 2)
        meta_s.append(train_pruningnet(timing, b.data, b.cost, steps=2, lr=LR, batch_size=BATCH,
                                       seed=rep, device=common.DEVICE)["train_s"] / 2)
    steps_per_epoch = math.ceil(len(b.data.train) / BATCH)
    record["timing"] = {"base_step_s": float(np.median(base_s)), "pruningnet_step_s": float(np.median(meta_s)),
                        "ratio": float(np.median(meta_s) / np.median(base_s)), "steps_per_epoch": steps_per_epoch,
                        "batch": BATCH, "threads": torch.get_num_threads(), "loadavg_1m": machine_load(),
                        "device": common.device_name()}
    print(f"base step {record['timing']['base_step_s']:.3f}s, PruningNet step "
          f"{record['timing']['pruningnet_step_s']:.3f}s (x{record['timing']['ratio']:.2f}); "
          f"one base epoch = {steps_per_epoch} steps", flush=True)
    out.write_text(json.dumps(record, indent=1))
    for spec in specs:
        if spec in b.available(specs):
            continue
        net = PruningNet(b.base, b.space, HIDDEN, b.order)
        info = train_pruningnet(net, b.data, b.cost, steps=spec.steps, lr=spec.lr, batch_size=BATCH, seed=0,
                                flops=spec.flops, store=store, name=spec.file, every=50, device=common.DEVICE)
        net.cpu()
        record["nets"][spec.key] = {**info, "base_epochs_of_steps": spec.steps / steps_per_epoch,
                                    "loadavg_1m": machine_load(), "device": common.device_name(),
                                    "date": time.strftime("%Y-%m-%d")}
        out.write_text(json.dumps(record, indent=1))
        print(f"PruningNet {spec.key}: {info['train_s']:.0f}s, final loss {info['loss']:.3f}", flush=True)


def stage_score(b: Bench, specs: list[NetSpec], bn_batches: int) -> None:
    nets = {s: b.load_net(s) for s in b.available(specs)}
    for path in sorted((b.folder / "profiles").glob("*.json")):
        row = json.loads(path.read_text())
        for spec, net in nets.items():
            key = f"{spec.key}-bn{bn_batches}"
            if key not in row["scores"]:
                start = time.time()
                acc, loss = score_widths(net, row["widths"], b.data, bn_batches=bn_batches, batch_size=BATCH, seed=0,
                                         device=common.DEVICE)
                row["scores"][key] = {"val_acc": acc, "val_loss": loss, "seconds": time.time() - start,
                                      "device": common.device_name()}
                path.write_text(json.dumps(row, indent=1))


def stage_bn(b: Bench, specs: list[NetSpec], count: int) -> None:
    spec = b.available(specs)[-1]
    net = b.load_net(spec)
    rows = b.profiles(PROFILES)[:count]
    out = b.folder / "bn.json"
    record = json.loads(out.read_text()) if out.is_file() else {}
    if record.get("net") != spec.key:
        record = {"net": spec.key, "batch": BATCH, "profiles": [r["widths"] for r in rows], "scores": {}}
    for n in (BN_COUNTS[:3] if b.quick else BN_COUNTS):
        for seed in BN_SEEDS:
            key = f"{n}-s{seed}"
            if key in record["scores"]:
                continue
            start = time.time()
            accs = [score_widths(net, r["widths"], b.data, bn_batches=n, batch_size=BATCH, seed=seed,
                                 device=common.DEVICE)[0] for r in rows]
            record["scores"][key] = {"val_acc": accs, "seconds": time.time() - start, "loadavg_1m": machine_load(),
                                     "device": common.device_name()}
            out.write_text(json.dumps(record, indent=1))
    print_bn(record)


def print_bn(record: dict) -> None:
    """Per batch count: mean score, spread over seeds, and rank agreement with the largest count."""
    by_n: dict[int, np.ndarray] = {}
    for key, cell in record["scores"].items():
        n = int(key.split("-")[0])
        by_n.setdefault(n, []).append(cell["val_acc"])
    ref = np.mean(by_n[max(by_n)], axis=0)
    print(f"\nBN recalibration, PruningNet {record['net']}, {len(ref)} profiles, batches of "
          f"{record['batch']}\n| batches | images | mean val acc | mean std over seeds | max std | "
          f"Spearman vs {max(by_n)} batches (per seed, mean) |\n|---|---|---|---|---|---|")
    for n in sorted(by_n):
        accs = np.array(by_n[n])  # seeds x profiles
        rho = np.mean([spearmanr(a, ref)[0] for a in accs])
        print(f"| {n} | {n * record['batch']} | {accs.mean():.4f} | {accs.std(axis=0).mean():.4f} | "
              f"{accs.std(axis=0).max():.4f} | {rho:.3f} |")


def stage_rank(b: Bench) -> None:
    rows = b.finished()
    keys = sorted({k for r in rows for k in r["scores"]})
    print(f"\nSpearman of the PruningNet score against the retrained test accuracy ({RETRAIN_EPOCHS}-epoch retrain), "
          f"budget {b.budget:g}\n| net (steps, BN batches) | profiles | Spearman | p |\n|---|---|---|---|")
    for key in keys:
        scored = [r for r in rows if key in r["scores"]]
        if len(scored) >= 3:
            rho, p = spearmanr([r["scores"][key]["val_acc"] for r in scored], [r["test_acc"] for r in scored])
            print(f"| {key} | {len(scored)} | {rho:.3f} | {p:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("retrain", "nets", "score", "bn", "rank"))
    parser.add_argument("--quick", action="store_true", help="3-epoch base, 1-epoch retrains, short nets (smoke test)")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--profiles", type=int, default=PROFILES)
    parser.add_argument("--nets", nargs="+", help=f"PruningNets, STEPS[:LR[:LO-HI]] (default {' '.join(NETS)})")
    parser.add_argument("--bn-batches", type=int, default=20, help="recalibration batches for `score`")
    parser.add_argument("--bn-profiles", type=int, default=8, help="profiles in the `bn` study")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: base, retrains, PruningNet training and scores")
    args = parser.parse_args()
    set_threads(args.threads)
    common.use_device(args.device)
    b = Bench(args.data, args.budget, args.quick)
    specs = [NetSpec.parse(t) for t in args.nets or (["0", "20", "40"] if args.quick else NETS)]
    print(f"base {MODEL}: val {b.info['val_acc']:.4f}, test {b.info['test_acc']:.4f}; load {machine_load():.1f}",
          flush=True)
    if args.stage == "retrain":
        stage_retrain(b, 4 if args.quick else args.profiles)
    elif args.stage == "nets":
        stage_nets(b, specs)
    elif args.stage == "score":
        stage_score(b, specs, args.bn_batches)
        stage_rank(b)
    elif args.stage == "bn":
        stage_bn(b, specs, 3 if args.quick else args.bn_profiles)
    else:
        stage_rank(b)


if __name__ == "__main__":
    main()
