"""One optimizer step (no forward/backward) of every row of ``peers.step_optimizers`` over a
GPT-style parameter list, per size of the mode; plus the device copy bandwidth."""

from __future__ import annotations

import pytest
import torch

from bench import common, models, peers

MODE = common.mode()
ROWS = list(peers.step_optimizers(torch.device(MODE.device)))


def device_or_skip() -> torch.device:
    device = torch.device(MODE.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("not measured: no CUDA device here")
    return device


def memory_used(device: torch.device, opt) -> tuple[int, str]:
    """Peak allocated bytes on a GPU; the optimizer's state tensor bytes on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return peers.state_bytes(opt), "state_bytes"


def test_copy_bandwidth(benchmark):
    device = device_or_skip()
    src = torch.empty(MODE.copy_mib * 2**18, device=device).uniform_()
    dst = torch.empty_like(src)
    benchmark.group = "copy"
    common.run_timed(benchmark, lambda: dst.copy_(src), device, slow=False, numel=src.numel())
    benchmark.extra_info.update(mode=MODE.name, device=str(device), kind="copy",
                                copy_bytes=2 * src.numel() * 4,
                                copy_gbps=common.copy_bandwidth(device, MODE.copy_mib))


@pytest.mark.parametrize("size", MODE.step_sizes)
@pytest.mark.parametrize("name", ROWS)
def test_step(benchmark, name, size):
    device = device_or_skip()
    build, reason = peers.step_optimizers(device)[name]
    if build is None:
        pytest.skip(f"not available on {device.type}: {reason}")
    shapes = models.shapes_for(size)
    numel = models.num_params(shapes)
    slow = peers.is_slow(name, device)
    if slow and numel > MODE.slow_max_params:
        pytest.skip(f"not measured: torch-op noise costs seconds per 1M params; "
                    f"capped at {MODE.slow_max_params / 1e6:g}M in mode {MODE.name}")
    common.peak_memory_start(device)
    params = models.make_params(shapes, device)
    opt = build(params, device)
    benchmark.group = f"step {size}"
    common.run_timed(benchmark, opt.step, device, slow=slow, numel=numel)
    memory, kind = memory_used(device, opt)
    common.record(benchmark, device=device, numel=numel, n_tensors=len(shapes), memory_bytes=memory,
                  memory_kind=kind, kind="step", row=name, size=size, dtype="float32")
