"""MetaPruning on cifar_resnet20 / cifar10-5k at a FLOPs budget: PruningNet ranking quality and cost.

Trains a PruningNet from the (cached) base model, draws random profiles with FLOPs ratio in
[0.8 x budget, budget], scores each with generated weights + recalibrated BN (what the
search ranks by), then scores the same profiles the standard way (l1 prune, adaptive BN,
fine-tune, val accuracy; the trainables/score.py pieces) and reports the Spearman rank
correlation between the two. Cost: PruningNet training time against one base training,
both as measured seconds and as a per-step ratio timed back to back in this process.

    python bench/metapruning.py [--quick] [--data npz:PATH] [--budget 0.5] [--steps N] [--profiles N] [--finetune N]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import DEFAULT_DATA, base_checkpoint  # noqa: E402

from trainables.metapruning import score_widths, train_pruningnet  # noqa: E402
from widthsearch import CostModel, build_space, load_data, load_model, prune  # noqa: E402
from widthsearch.pruningnet import PruningNet, sample_widths  # noqa: E402
from widthsearch.training import TrainConfig, evaluate, recalibrate_bn, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--steps", type=int, help="PruningNet steps (default 40 with --quick, else 1500)")
    parser.add_argument("--profiles", type=int, help="profiles compared (default 6 with --quick, else 24)")
    parser.add_argument("--finetune", type=int, help="fine-tune steps per profile (default 10 with --quick, else 150)")
    args = parser.parse_args()
    epochs, steps, profiles, finetune, batch, bn = (3, 40, 6, 10, 64, 5) if args.quick else (15, 1500, 24, 150, 128, 20)
    steps, profiles, finetune = args.steps or steps, args.profiles or profiles, args.finetune or finetune
    ckpt, info = base_checkpoint("cifar_resnet20", args.data, epochs)
    data = load_data(args.data, seed=0)
    model = load_model("cifar_resnet20", data.num_classes, ckpt, in_channels=data.in_channels).eval()
    space = build_space(model, data.example_input)
    cost = CostModel(space, model)
    base_steps = epochs * math.ceil(len(data.train) / 128)
    print(f"base cifar_resnet20 ({epochs} epochs, {base_steps} steps of 128): val acc {info['val_acc']:.4f}, "
          f"trained in {info['train_s']:.0f}s")

    # per-step cost, timed back to back (the machine may be shared): base SGD step vs PruningNet step
    probe = load_model("cifar_resnet20", data.num_classes, ckpt, in_channels=data.in_channels)
    train(probe, data, steps=1, config=TrainConfig(lr=0.01, batch_size=batch))  # warm-up
    start = time.time()
    train(probe, data, steps=4, config=TrainConfig(lr=0.01, batch_size=batch))
    base_step = (time.time() - start) / 4
    train_pruningnet(PruningNet(model, space, hidden=32), data, cost, steps=1, lr=0.01, batch_size=batch, seed=1)
    meta_step = train_pruningnet(PruningNet(model, space, hidden=32), data, cost, steps=4, lr=0.01,
                                 batch_size=batch, seed=1)["train_s"] / 4
    net = PruningNet(model, space, hidden=32)

    trained = train_pruningnet(net, data, cost, steps=steps, lr=0.01, batch_size=batch, seed=0)
    print(f"PruningNet: {steps} steps of {batch} in {trained['train_s']:.0f}s (final loss {trained['loss']:.3f}); "
          f"per step {meta_step:.2f}s vs base {base_step:.2f}s (x{meta_step / base_step:.2f})")
    print(f"cost vs one base training: {steps * meta_step / (base_steps * base_step * 128 / batch):.3f}x "
          f"(steps x per-step time, base at batch 128 scaled from batch {batch}); in seconds "
          f"{trained['train_s']:.0f}s vs {info['train_s']:.0f}s (not timed back to back)")

    rng = np.random.default_rng(0)
    drawn = sample_widths(space, rng, profiles, cost, (0.8 * args.budget, args.budget))
    meta, tuned = [], []
    print("\n| # | flops ratio | PruningNet score | pruned + fine-tuned val acc |")
    print("|---|---|---|---|")
    for i, widths in enumerate(drawn):
        meta.append(score_widths(net.eval(), widths, data, bn_batches=bn, batch_size=batch, seed=0)[0])
        pruned = prune(model, space, space.from_vector(widths), "l1")
        recalibrate_bn(pruned, data, bn, batch, seed=0)
        train(pruned, data, steps=finetune, config=TrainConfig(lr=0.01, batch_size=batch), seed=i)
        tuned.append(evaluate(pruned, data, "val")[0])
        print(f"| {i} | {cost.flops_ratio(space.from_vector(widths)):.3f} | {meta[-1]:.4f} | {tuned[-1]:.4f} |",
              flush=True)
    rho, p = spearmanr(meta, tuned)
    print(f"\nSpearman rank correlation over {profiles} profiles at budget {args.budget:g}: rho = {rho:.3f} "
          f"(p = {p:.3g}); fine-tune {finetune} steps of {batch}")


if __name__ == "__main__":
    main()
