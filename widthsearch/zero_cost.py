"""Scores of an architecture that need no training (zero-cost proxies).

Source: synaptic flow (Tanaka et al., "Pruning neural networks without any data by iteratively conserving synaptic
flow", NeurIPS 2020) used to rank whole architectures (Abdelfattah et al., "Zero-Cost Proxies for Lightweight
NAS", ICLR 2021; the authors' SamsungLabs/zero-cost-nas, measure `synflow`): the sum over every conv and linear
weight of |w * dR/dw|, R the sum of the outputs of the network with every weight made positive, on an all-ones
input, in double precision. Deviation: BN stays in the network, in eval mode with fresh statistics (the identity),
where the authors build the network without BN; the weights are PyTorch's default init (`reinitialise`), so the
score is the architecture's alone, not its inherited weights'.

Measured as a ranker of pruned cifar_resnet20 profiles against their 40-epoch retrain (bench/fidelity.py, 24
profiles per budget, 2026-12-07): Spearman 0.55 with test accuracy at FLOPs 0.1 (the 50-step trial score: 0.27),
the best of the free scores there (parameter count 0.07, NASWOT negative); 0.27 at FLOPs 0.05 (parameter count 0.53,
every trained score below 0).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """`model` with fresh weights (in place; the architecture stays): PyTorch's default init of every layer that
    has one (`reset_parameters`: convs, linears, BN statistics and affine), torch's global generator seeded with
    `seed`."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def synflow(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> float:
    """Synaptic flow of `model`'s architecture (higher = predicted to train better; see the module): computed on a
    re-initialised double-precision copy, so `model` itself is left as it was. `input_shape`: one input's shape
    without the batch dimension, e.g. (3, 32, 32)."""
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        net = reinitialise(copy.deepcopy(model), seed).double().eval()
    device = next(net.parameters()).device
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    net.zero_grad()
    net(torch.ones(1, *input_shape, dtype=torch.float64, device=device)).sum().backward()
    with torch.no_grad():
        return sum((m.weight * m.weight.grad).abs().sum().item() for m in net.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear)))
