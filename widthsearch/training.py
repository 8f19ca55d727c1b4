"""Training utilities: train or fine-tune, evaluate, adaptive BN recalibration, thread control."""

from __future__ import annotations

import math
import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import DataSplits
from .models import load_model


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum and a learning-rate schedule: cosine annealing to 0 over the run, or constant."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    label_smoothing: float = 0.0
    schedule: str = "cosine"          # "cosine" or "constant"
    channels_last: bool = True        # on an AVX-512 CPU, train conv models in channels-last format (faster; fast_format)


def channels_last_safe() -> bool:
    """Whether this CPU trains channels-last tensors safely: one with AVX-512 kernels (see fast_format)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@contextlib.contextmanager
def fast_format(model: nn.Module, device: torch.device | str,
                channels_last: bool = True) -> Iterator[torch.memory_format]:
    """Run a block with `model` in the memory format its inputs should take (yielded): channels-last for a model
    with 2-D convolutions on a CPU with AVX-512, where PyTorch's convolutions run about 1.2-1.6x faster in it
    (measured on cifar_resnet20, 1 thread), else contiguous. The model is converted in place and converted back
    after, so callers (latency measurement, export) see the format they gave.

    Not on other CPUs (`channels_last_safe`): on an AVX2-only AMD EPYC (torch 2.14.1), the backward pass of a
    pruned cifar_resnet20 in channels-last corrupted the heap ("double free or corruption", or SIGSEGV) whenever
    a residual stream's width was not a multiple of 8 (5, 11, 23 or 4, 12, 20; 8, 16, 24 ran), so every trial of
    a search crashed; contiguous tensors ran."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not (channels_last and convs and torch.device(device).type == "cpu" and channels_last_safe()):
        yield torch.contiguous_format
        return
    weight = convs[0].weight
    was = torch.channels_last if not weight.is_contiguous() and weight.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    model.to(memory_format=torch.channels_last)
    try:
        yield torch.channels_last
    finally:
        model.to(memory_format=was)


def set_threads(n: int | float | None) -> None:
    """Limit torch's intra-op threads to the CPUs a trial was given (at least 1)."""
    if n:
        torch.set_num_threads(max(1, int(n)))


def pick_device(gpus: float = 0) -> torch.device:
    """CUDA when the caller was given a GPU and one is visible, else CPU."""
    return torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")


class Progress:
    """A progress bar of `total` steps on stderr (tqdm); silent when disabled or when stderr is not a terminal."""

    def __init__(self, total: int, label: str, enabled: bool = True, initial: int = 0, unit: str = "step"):
        self.bar = tqdm(total=total, initial=initial, desc=label, unit=unit, disable=None if enabled else True)

    def update(self, done: int, info: str = "") -> None:
        """Move the bar to `done` steps, showing `info`; at the total it is finished (closed)."""
        if info:
            self.bar.set_postfix_str(info, refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= self.bar.total:
            self.bar.close()

    def close(self) -> None:
        """Finish the bar where it stands (e.g. a run that ended early)."""
        self.bar.close()


def make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    """SGD + the config's schedule: cosine annealing over `total_steps` steps, or a constant rate."""
    if config.schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown learning-rate schedule {config.schedule!r}; expected cosine or constant")
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    if config.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    return opt, sched


class StepTrainer:
    """A fine-tune of `total` SGD steps with one cosine schedule and one momentum buffer, run in chunks.

    However `run` is called (all at once, or a chunk per report as promotion schedules do), the
    learning rate, momentum and batch order are those of a single `total`-step run.
    """

    def __init__(self, model: nn.Module, data: DataSplits, total: int, config: TrainConfig = TrainConfig(),
                 seed: int = 0, device: torch.device | str = "cpu"):
        self.model, self.total, self.done = model, int(total), 0
        self.device = torch.device(device)
        self.channels_last = config.channels_last
        self.optimizer, self.scheduler = make_optimizer(model, config, max(1, self.total))
        self.stream = data.stream("train", config.batch_size, seed=seed, device=self.device)
        self.label_smoothing = config.label_smoothing

    def run(self, steps: int, progress: "Progress | None" = None) -> float:
        """Take the next `steps` steps (at most the remaining ones); the mean training loss (nan for none)."""
        steps = min(int(steps), self.total - self.done)
        self.model.to(self.device).train()
        losses = []
        with fast_format(self.model, self.device, self.channels_last) as fmt:
            for _ in range(steps):
                x, y = next(self.stream)
                losses.append(_sgd_step(self.model, self.optimizer, self.scheduler, x.contiguous(memory_format=fmt), y,
                                        self.label_smoothing))
                self.done += 1
                if progress is not None:
                    progress.update(self.done, f"loss {losses[-1]:.3f}")
        return sum(losses) / len(losses) if losses else float("nan")


def _sgd_step(model: nn.Module, optimizer, scheduler, x: torch.Tensor, y: torch.Tensor,
              label_smoothing: float) -> float:
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def train(model: nn.Module, data: DataSplits, *, steps: int | None = None, epochs: int | None = None,
          config: TrainConfig = TrainConfig(), seed: int = 0, device: torch.device | str = "cpu",
          progress: bool | str = False, start_epoch: int = 0, state: dict | None = None,
          on_epoch: Callable[[int, float, dict], None] | None = None) -> float:
    """Train in place for `steps` optimiser steps or `epochs` epochs; return the mean training loss.

    With epochs, `on_epoch(epoch, mean_loss, state)` runs after each epoch, where `state`
    holds the optimiser and scheduler state for resuming (pass it back with `start_epoch`).
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    label = progress if isinstance(progress, str) else "train"
    if steps is not None:
        if steps <= 0:
            return float("nan")
        trainer = StepTrainer(model, data, steps, config, seed, device)
        return trainer.run(steps, Progress(steps, label, enabled=bool(progress)))
    device = torch.device(device)
    model.to(device).train()
    with fast_format(model, device, config.channels_last) as fmt:
        return _train_epochs(model, data, epochs, config, seed, device, fmt, label, progress, start_epoch, state,
                             on_epoch)


def _train_epochs(model, data, epochs, config, seed, device, fmt, label, progress, start_epoch, state,
                  on_epoch) -> float:
    """The epochs of `train`, inputs in memory format `fmt`."""
    per_epoch = math.ceil(len(data.train) / config.batch_size)
    total = epochs * per_epoch
    if total <= 0:
        return float("nan")
    opt, sched = make_optimizer(model, config, total)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    losses: list[float] = []
    done = start_epoch * per_epoch
    bar = Progress(total, label, enabled=bool(progress), initial=done)
    for epoch in range(start_epoch, epochs):
        epoch_losses = []
        for x, y in data.batches("train", config.batch_size, seed=seed + epoch, device=device):
            epoch_losses.append(_sgd_step(model, opt, sched, x.contiguous(memory_format=fmt), y,
                                          config.label_smoothing))
            done += 1
            bar.update(done, f"loss {epoch_losses[-1]:.3f}")
        losses += epoch_losses
        if on_epoch is not None:
            mean = sum(epoch_losses) / max(1, len(epoch_losses))
            on_epoch(epoch, mean, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    return sum(losses) / max(1, len(losses))



def train_base(source: str, data: DataSplits, *, epochs: int, config: TrainConfig = TrainConfig(), seed: int = 0,
               device: torch.device | str = "cpu", progress: bool | str = False) -> nn.Module:
    """A base model: `source` (a model source, see widthsearch.models) initialised with torch seed `seed`, then
    trained `epochs` epochs on `data`'s train split (batch order seeded by `seed`). The one recipe behind a
    search's own base model, `widthsearch train-base` and the bench's bases."""
    torch.manual_seed(seed)
    model = load_model(source, data.num_classes, in_channels=data.in_channels)
    train(model, data, epochs=epochs, config=config, seed=seed, device=device, progress=progress)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: DataSplits, split: str = "val", batch_size: int = 512,
             device: torch.device | str = "cpu") -> tuple[float, float]:
    """Accuracy and mean cross-entropy loss on `split` (eval mode; mode restored after)."""
    was_training = model.training
    model.to(device).eval()
    correct, loss_sum, n = 0, 0.0, 0
    with fast_format(model, device) as fmt:
        for x, y in data.batches(split, batch_size, shuffle=False, device=device):
            logits = model(x.contiguous(memory_format=fmt))
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
    model.train(was_training)
    return correct / max(1, n), loss_sum / max(1, n)


def bn_statistics_share(model: nn.Module, steps: int) -> float:
    """The largest share that BatchNorm running statistics estimated now keep after `steps` train-mode steps.

    Each train-mode step moves a BatchNorm layer's running statistics by its momentum m, so statistics set before
    `steps` steps weigh (1 - m)^steps in them afterwards (1.0 for a cumulative average, momentum None, and for a
    model without BatchNorm layers, whose evaluation nothing re-estimates). Training itself normalises with each
    batch's own statistics, so the running ones matter only to the evaluations that follow.
    """
    shares = [1.0 if bn.momentum is None else (1.0 - bn.momentum) ** steps
              for bn in model.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    return max(shares, default=1.0)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: DataSplits, num_batches: int = 20, batch_size: int = 128,
                   seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """Adaptive BN (EagleEye): re-estimate BatchNorm running statistics on `num_batches` train batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or num_batches <= 0:
        return model
    was_training = model.training
    model.to(device).train()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches seen
    stream = data.stream("train", batch_size, seed=seed, augment=False, device=device)
    with fast_format(model, device) as fmt:
        for _ in range(num_batches):
            x, _ = next(stream)
            model(x.contiguous(memory_format=fmt))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)
    return model
