"""What the benchmark tests share: the mode (sizes, device, rounds), timing, copy bandwidth.

The mode comes from ``BENCH_MODE`` (or pytest's ``--bench-mode``, which sets it):
``smoke`` (default: tiny sizes, every row once, for CI), ``cpu`` or ``gpu``. ``BENCH_DEVICE``
overrides the device (e.g. ``smoke`` on ``cuda``). Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

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
    slow_rounds: dict = field(default_factory=dict)  # max params -> rounds for slow rows
    target_s: float = 2.0         # time per fast benchmark, rounds chosen to fill it
    copy_mib: int = 256
    autocast: bool = False


MODES = {
    "smoke": Mode("smoke", "cpu", ("tiny",), (("tiny", 2, 32, ("float32", "bfloat16")),),
                  slow_max_params=10**6, slow_rounds={10**6: 1}, target_s=0.0, copy_mib=8),
    # bf16 matmuls run ~10x slower than fp32 on CPUs without bf16 units: bf16 on the 1M model.
    "cpu": Mode("cpu", "cpu", ("1M", "10M", "20x1M", "100M"),
                (("10M", 4, 128, ("float32",)), ("1M", 2, 64, ("bfloat16",))),
                slow_max_params=25 * 10**6, slow_rounds={2 * 10**6: 5, 11 * 10**6: 3, 25 * 10**6: 2},
                target_s=2.0, copy_mib=256),
    "gpu": Mode("gpu", "cuda", ("1M", "10M", "100M", "1B"),
                (("125M", 8, 1024, ("float32", "bfloat16")), ("1B", 4, 1024, ("float32", "bfloat16"))),
                slow_max_params=2 * 10**6, slow_rounds={2 * 10**6: 3}, target_s=2.0,
                copy_mib=2048, autocast=True),
}


def mode() -> Mode:
    name = os.environ.get("BENCH_MODE", "smoke")
    if name not in MODES:
        raise ValueError(f"BENCH_MODE must be one of {sorted(MODES)}, got {name!r}")
    chosen = MODES[name]
    device = os.environ.get("BENCH_DEVICE")
    return chosen if device is None else Mode(**{**chosen.__dict__, "device": device})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slow_rounds(m: Mode, numel: int) -> int:
    """Rounds for a slow row of ``numel`` parameters (no warm-up: its builder ran the code)."""
    return next(r for limit, r in sorted(m.slow_rounds.items()) if numel <= limit)


def run_timed(benchmark, fn: Callable[[], object], device: torch.device, *, slow: bool,
              numel: int) -> None:
    """Time ``fn`` (synchronised inside) with pytest-benchmark: medians over rounds, warm-up
    excluded. Fast rows: 2 warm-up calls, then rounds to fill ``target_s`` (5 to 50).
    Slow rows: ``slow_rounds`` rounds without warm-up. Disabled benchmarks run ``fn`` once."""
    m = mode()

    def timed():
        fn()
        synchronize(device)

    if not getattr(benchmark, "enabled", True) or m.target_s == 0.0:
        benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
        return
    if slow:
        benchmark.pedantic(timed, rounds=slow_rounds(m, numel), iterations=1, warmup_rounds=0)
        return
    timed()
    start = time.perf_counter()
    timed()
    once = time.perf_counter() - start
    rounds = max(5, min(50, int(m.target_s / max(once, 1e-6))))
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


_COPY_GBPS: dict = {}


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Measured device copy bandwidth in GB/s (read + write counted), median of 10 copies."""
    key = (str(device), mib)
    if key not in _COPY_GBPS:
        src = torch.empty(mib * 2**18, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        times = []
        for _ in range(12):
            synchronize(device)
            start = time.perf_counter()
            dst.copy_(src)
            synchronize(device)
            times.append(time.perf_counter() - start)
        _COPY_GBPS[key] = 2 * src.numel() * 4 / statistics.median(times[2:]) / 1e9
        del src, dst
    return _COPY_GBPS[key]


def peak_memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def record(benchmark, *, device: torch.device, numel: int, n_tensors: int, memory_bytes: int,
           memory_kind: str, **extra) -> None:
    """Attach sizes, bytes moved, GB/s (also as % of the measured copy bandwidth) and memory."""
    m = mode()
    copy_gbps = copy_bandwidth(device, m.copy_mib)
    info = dict(mode=m.name, device=str(device), params=numel, tensors=n_tensors,
                bytes_moved=BYTES_PER_PARAM * numel, copy_gbps=copy_gbps,
                memory_bytes=memory_bytes, memory_kind=memory_kind, **extra)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.data:
        median = stats.stats.median
        info["gbps"] = BYTES_PER_PARAM * numel / median / 1e9
        info["pct_copy"] = 100.0 * info["gbps"] / copy_gbps
    benchmark.extra_info.update(info)
