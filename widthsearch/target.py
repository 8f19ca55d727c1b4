"""Where and how latency is measured (`LatencyTarget`), and the names its settings take; light to import (no
torch until a target is checked against this machine or described), so that configurations are checked and listed
without loading the latency model (`widthsearch.latency`)."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")
RUNTIMES = ("eager", "onnxruntime")
CLOCKS = ("wall", "cpu")
MEASURED = "latency/measured.json"  # under EXP/widthsearch: the best profiles of a search, timed whole after it


@dataclass(frozen=True)
class LatencyTarget:
    """Where and how latency is measured: device (cpu, cuda), threads, batch, dtype, runtime, clock (wall, cpu)."""

    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    dtype: str = "fp32"
    runtime: str = "eager"
    clock: str = "wall"

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, value, what: str) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r} must be {what}, got {value!r}")

        need(self.device in DEVICES, "latency_device", self.device, f"one of: {', '.join(DEVICES)}")
        need(self.dtype in DTYPES, "latency_dtype", self.dtype, f"one of: {', '.join(DTYPES)}")
        need(self.runtime in RUNTIMES, "latency_runtime", self.runtime, f"one of: {', '.join(RUNTIMES)}")
        need(isinstance(self.threads, int) and self.threads >= 1, "latency_threads", self.threads, "at least 1")
        need(isinstance(self.batch, int) and self.batch >= 1, "latency_batch", self.batch, "at least 1")
        need(self.dtype == "fp32" or self.device == "cuda", "latency_dtype", self.dtype,
             "fp32 on latency_device cpu (fp16 and bf16 are measured on cuda only)")
        need(self.runtime == "eager" or (self.device == "cpu" and self.dtype == "fp32"), "latency_runtime",
             self.runtime, "eager for cuda or fp16/bf16 (onnxruntime is measured on the CPU in fp32)")
        need(self.clock in CLOCKS, "latency_clock", self.clock, f"one of: {', '.join(CLOCKS)}")
        need(self.clock == "wall" or (self.device == "cpu" and self.threads == 1), "latency_clock", self.clock,
             "wall unless latency_device is cpu with latency_threads 1 (CPU time measures one thread)")

    def check_present(self) -> None:
        """ConfigError when this machine cannot measure the target (no CUDA GPU, no onnxruntime)."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("latency_device is 'cuda' but this machine has no CUDA GPU; measure on the CPU "
                              "(latency_device cpu) or where the trials run (a cluster with gpus_per_trial > 0)")
        if self.runtime == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                raise ConfigError("latency_runtime is 'onnxruntime' but onnxruntime is not installed") from None

    def environment(self) -> dict:
        """What the timings depend on besides the model: this target, the device's name, library versions."""
        import torch

        env = {**asdict(self), "device_name": device_name(self.device), "torch": torch.__version__,
               "platform": platform.machine()}
        if self.runtime == "onnxruntime":
            import onnxruntime

            env["onnxruntime"] = onnxruntime.__version__
        return env


def device_name(device: str) -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one) or the CUDA GPU's name."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
