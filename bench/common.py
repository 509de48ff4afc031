"""What the benchmarks share: the mode (sizes, device, rounds), device sync, copy bandwidth.

The mode comes from ``BENCH_MODE`` (or pytest's ``--bench-mode``, which sets it): ``smoke``
(default: tiny sizes, every row once, for CI), ``cpu``, ``gpu``, or ``gpu-dry`` (the GPU run's
code path on CPU tensors at small sizes, to check it end to end without a GPU). ``BENCH_DEVICE``
overrides the device (e.g. ``smoke`` on ``cuda``). Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

BYTES_PER_PARAM = 28  # fp32 AdamW: read p, g, m, v; write p, m, v.


@dataclass(frozen=True)
class Mode:
    name: str
    device: str
    step_sizes: tuple[str, ...]
    # (model config, batch, sequence length, parameter dtypes)
    e2e_models: tuple[tuple[str, int, int, tuple[str, ...]], ...]
    slow_max_params: int          # rows of peers.is_slow are skipped above this size
    target_s: float = 20.0        # timed seconds per group; 0: one round (smoke)
    min_rounds: int = 5
    max_rounds: int = 50
    copy_mib: int = 256
    autocast: bool = False
    large_params: float = float("inf")  # above this many params only large_rows run
    large_rows: tuple[str, ...] = ()


# Above 200M params a GPU run keeps the rows the targets are about, so that every row of a
# group fits in memory at once (1B: 16 GB of parameters, gradients and state per row).
_GPU_LARGE_ROWS = ("adamw_fused", "fused[triton]", "fused[cuda]")

MODES = {
    "smoke": Mode("smoke", "cpu", ("tiny",), (("tiny", 2, 32, ("float32", "bfloat16")),),
                  slow_max_params=10**6, target_s=0.0, copy_mib=8),
    # bf16 matmuls run ~10x slower than fp32 on CPUs without bf16 units: bf16 on the 1M model.
    "cpu": Mode("cpu", "cpu", ("1M", "10M", "20x1M", "100M"),
                (("10M", 4, 128, ("float32",)), ("1M", 2, 64, ("bfloat16",))),
                slow_max_params=25 * 10**6, target_s=20.0, copy_mib=256),
    "gpu": Mode("gpu", "cuda", ("10M", "100M", "1B"), (("125M", 8, 1024, ("float32", "bfloat16")),),
                slow_max_params=2 * 10**6, target_s=8.0, min_rounds=10, max_rounds=100,
                copy_mib=2048, autocast=True, large_params=2e8, large_rows=_GPU_LARGE_ROWS),
    "gpu-dry": Mode("gpu-dry", "cpu", ("tiny", "1M"), (("tiny", 2, 32, ("float32", "bfloat16")),),
                    slow_max_params=2 * 10**6, target_s=0.5, min_rounds=3, max_rounds=5,
                    copy_mib=8, autocast=True, large_params=5e5,
                    large_rows=_GPU_LARGE_ROWS + ("fused[native]",)),  # the CPU's stand-in for them
}


def mode() -> Mode:
    """The mode named by ``BENCH_MODE`` (default smoke), on ``BENCH_DEVICE`` if that is set."""
    name = os.environ.get("BENCH_MODE", "smoke")
    if name not in MODES:
        raise ValueError(f"BENCH_MODE must be one of {sorted(MODES)}, got {name!r}")
    chosen = MODES[name]
    device = os.environ.get("BENCH_DEVICE")
    return chosen if device is None else Mode(**{**chosen.__dict__, "device": device})


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device):
    """The clock timings are read from: on the CPU with one torch thread, the calling thread's CPU
    time (the op runs in that thread, and time the scheduler gives to other processes on a shared
    machine is not counted); elsewhere wall time (after synchronize on GPUs)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def clock_name(device: torch.device) -> str:
    return "thread CPU time" if clock(device) is time.thread_time else "wall time"


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Measured device copy bandwidth in GB/s (read + write counted), median of 10 copies of
    ``mib`` MiB after 2 warm-up copies, timed with ``clock(device)``."""
    src = torch.empty(mib * 2**18, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times, now = [], clock(device)
    for _ in range(12):
        synchronize(device)
        start = now()
        dst.copy_(src)
        synchronize(device)
        times.append(now() - start)
    return 2 * src.numel() * 4 / statistics.median(times[2:]) / 1e9
