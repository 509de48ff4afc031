"""The benchmark groups, timed interleaved: every row of one group (one size) is built first,
then the rows take turns in one loop, so a burst of load from another process lands on every
row of a round alike instead of on whichever row was being timed.

A group is ``("step", size)`` (one optimizer step over a GPT-style parameter list, rows of
``peers.step_optimizers``) or ``("e2e", spec)`` (forward, backward and step of ``models.GPT``,
rows of ``peers.e2e_optimizers``). ``run_group`` returns one JSON-ready entry per row: the median
time over rounds and the ratio to ``adamw_fused`` as the median of per-round ratios, with its
quartiles as the spread. The pytest smoke tests run the same functions with one round.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bench import common, models, peers


@dataclass
class Row:
    """One built row: ``run()`` is what is timed; ``memory()`` -> (bytes, kind) after the runs."""
    name: str
    run: Callable[[], object]
    memory: Callable[[], tuple[int, str]]


def _row(name: str, device: torch.device, opt, run: Callable[[], object], before: int) -> Row:
    """A built row. Memory on CUDA: the peak of one solo call (run here, which also warms the row
    up) above what was allocated before the row was built: its parameters, state and transients,
    the shared gradients excluded. On the CPU: the optimizer's state tensors plus the peak of
    what a peer holds during a step."""
    if device.type != "cuda":
        return Row(name, run, lambda: (peers.state_bytes(opt), "state_bytes"))
    common.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    common.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    return Row(name, run, lambda: (peak, "cuda_peak_above_shared"))


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _rows_for(mode: common.Mode, table: dict, numel: int, device: torch.device) -> tuple[list, dict]:
    """(names to build, {name: reason skipped}) of a group of ``numel`` parameters."""
    build, skipped = [], {}
    for name, (builder, reason) in table.items():
        if builder is None:
            skipped[name] = f"not available on {device.type}: {reason}"
        elif peers.is_slow(name, device) and numel > mode.slow_max_params:
            skipped[name] = (f"not measured: torch-op noise costs seconds per 1M params; "
                             f"capped at {mode.slow_max_params / 1e6:g}M in mode {mode.name}")
        elif numel > mode.large_params and name not in mode.large_rows:
            skipped[name] = f"not measured above {mode.large_params / 1e6:g}M params in mode {mode.name}"
        else:
            build.append(name)
    return build, skipped


def build_step_group(mode: common.Mode, size: str, device: torch.device) -> tuple[list[Row], dict, dict]:
    """(rows, skipped, info) of the step group of ``size``: every row gets its own copy of the
    same parameters; the gradients are shared (read only)."""
    shapes = models.shapes_for(size)
    numel = models.num_params(shapes)
    table = peers.step_optimizers(device)
    names, skipped = _rows_for(mode, table, numel, device)
    template = models.make_params(shapes, device)
    rows = []
    for name in names:
        before = _allocated(device)
        params = []
        for p in template:
            copy = nn.Parameter(p.detach().clone())
            copy.grad = p.grad
            params.append(copy)
        opt = table[name][0](params, device)
        rows.append(_row(name, device, opt, opt.step, before))
    info = dict(kind="step", size=size, params=numel, tensors=len(shapes),
                bytes_moved=common.BYTES_PER_PARAM * numel, dtype="float32")
    return rows, skipped, info


def build_e2e_group(mode: common.Mode, spec: str, device: torch.device) -> tuple[list[Row], dict, dict]:
    """(rows, skipped, info) of the training-step group ``spec`` (a key of ``e2e_specs``):
    every row trains its own copy of the same model on the same batch."""
    cfg_name, batch, seq, dtype_name = e2e_specs(mode)[spec]
    cfg = models.CONFIGS[cfg_name]
    numel = models.num_params([shape for _, shape in models.param_shapes(cfg)])
    table = peers.e2e_optimizers(device)
    names, skipped = _rows_for(mode, table, numel, device)
    dtype = getattr(torch, dtype_name)
    idx, targets = models.make_batch(cfg, batch, seq, device)
    autocast = mode.autocast and device.type == "cuda" and dtype == torch.float32
    rows = []
    for name in names:
        before = _allocated(device)
        torch.manual_seed(0)
        with device:  # build on the device: a 1B model initialised on the host takes minutes
            model = models.GPT(cfg).to(dtype=dtype)

        def closure(model=model):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                loss = model(idx, targets)
            loss.backward()
            return loss

        opt = table[name][0](list(model.parameters()), device)
        rows.append(_row(name, device, opt, lambda opt=opt, closure=closure: opt.step(closure), before))
    info = dict(kind="e2e", size=spec, params=numel, tensors=len(models.param_shapes(cfg)),
                dtype=dtype_name, autocast=autocast, tokens=batch * seq)
    return rows, skipped, info


def e2e_specs(mode: common.Mode) -> dict[str, tuple[str, int, int, str]]:
    """``"<config>-b<batch>-s<seq>-<dtype>"`` -> (config, batch, seq, dtype) of the mode."""
    return {f"{cfg}-b{batch}-s{seq}-{dtype}": (cfg, batch, seq, dtype)
            for cfg, batch, seq, dtypes in mode.e2e_models for dtype in dtypes}


def time_interleaved(rows: list[Row], device: torch.device, rounds: int) -> dict[str, list[float]]:
    """Seconds of each row per round. Round r gives every row one turn, starting at row r mod n,
    so no row always follows the same neighbour. A turn is an untimed call, then the timed one:
    the timed call finds the row's own data in the caches, as when a row is timed on its own,
    instead of what the previous row left there (at 1M parameters the whole step fits in L3).
    Read from ``common.clock(device)``."""
    times, now = {row.name: [] for row in rows}, common.clock(device)
    for r in range(rounds):
        for row in rows[r % len(rows):] + rows[:r % len(rows)]:
            row.run()
            common.synchronize(device)
            start = now()
            row.run()
            common.synchronize(device)
            times[row.name].append(now() - start)
    return times


def rounds_for(mode: common.Mode, round_s: float) -> int:
    """Rounds to fill ``mode.target_s`` at ``round_s`` per round (two calls of each row), within
    [min_rounds, max_rounds]."""
    if mode.target_s == 0.0:
        return 1
    return max(mode.min_rounds, min(mode.max_rounds, int(mode.target_s / max(round_s, 1e-9))))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3); all three the value itself for a single value."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def run_group(mode: common.Mode, kind: str, size: str, device: torch.device) -> dict:
    """Build and time one group; ``{"group", "info", "rows": [...], "skipped": {row: reason}}``.

    Each row entry: name, per-round seconds, median, rounds, memory, and (when ``adamw_fused``
    ran) ratio / ratio_q1 / ratio_q3 of the per-round ratios to it."""
    build = build_step_group if kind == "step" else build_e2e_group
    rows, skipped, info = build(mode, size, device)
    start = time.perf_counter()
    for row in rows:  # warm-up, timed as a whole to choose the number of rounds
        row.run()
    common.synchronize(device)
    times = time_interleaved(rows, device, rounds_for(mode, 2 * (time.perf_counter() - start)))
    base = times.get(peers.BASELINE)
    entries = []
    for row in rows:
        seconds = times[row.name]
        memory, memory_kind = row.memory()
        entry = dict(row=row.name, times=seconds, median=statistics.median(seconds), rounds=len(seconds),
                     memory_bytes=memory, memory_kind=memory_kind)
        if base is not None:
            entry["ratio_q1"], entry["ratio"], entry["ratio_q3"] = quartiles(
                [t / b for t, b in zip(seconds, base)])
        entries.append(entry)
    return dict(group=f"{kind} {size}", info=info, rows=entries, skipped=skipped)


def machine_info(mode: common.Mode) -> dict:
    """Versions, threads, CPU, load and the device, written with every result."""
    import triton

    cpu_model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    info = dict(torch=torch.__version__, triton=triton.__version__, python_version=platform.python_version(),
                threads=torch.get_num_threads(), cores=os.cpu_count(), cpu_model=cpu_model,
                loadavg=list(os.getloadavg()), bench_mode=mode.name,
                clock=common.clock_name(torch.device(mode.device)))
    if mode.device.startswith("cuda"):
        info["device"] = torch.cuda.get_device_name(torch.device(mode.device))
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({cpu_model or platform.processor()})"
    return info
