"""One training step (forward, backward, optimizer) of a GPT-style model per row of
``peers.e2e_optimizers``: the ratio to AdamW is the paper's 1.17x (MergOPT) / 2.04x (SAM) axis.

float32 parameters run under bf16 autocast on GPUs; bfloat16 parameters take the fused
optimizer's fp32 master-weight path (peers keep them in bf16)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench import common, models, peers
from bench.test_bench_step import MODE, device_or_skip, memory_used

SPECS = {f"{cfg}-b{batch}-s{seq}-{dtype}": (cfg, batch, seq, dtype)
         for cfg, batch, seq, dtypes in MODE.e2e_models for dtype in dtypes}
ROWS = list(peers.e2e_optimizers(torch.device(MODE.device)))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", ROWS)
def test_train_step(benchmark, name, spec):
    device = device_or_skip()
    cfg_name, batch, seq, dtype_name = SPECS[spec]
    build, reason = peers.e2e_optimizers(device)[name]
    if build is None:
        pytest.skip(f"not available on {device.type}: {reason}")
    cfg = models.CONFIGS[cfg_name]
    numel = models.num_params([shape for _, shape in models.param_shapes(cfg)])
    slow = peers.is_slow(name, device)
    if slow and numel > MODE.slow_max_params:
        pytest.skip(f"not measured: torch-op noise costs seconds per 1M params; "
                    f"capped at {MODE.slow_max_params / 1e6:g}M in mode {MODE.name}")
    dtype = getattr(torch, dtype_name)
    common.peak_memory_start(device)
    torch.manual_seed(0)
    with device:  # build on the device: a 1B model initialised on the host takes minutes
        model = models.GPT(cfg).to(dtype=dtype)
    idx, targets = models.make_batch(cfg, batch, seq, device)
    autocast = MODE.autocast and device.type == "cuda" and dtype == torch.float32

    def closure():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model(idx, targets)
        loss.backward()
        return loss

    opt = build(list(model.parameters()), device)
    benchmark.group = f"e2e {spec}"
    common.run_timed(benchmark, lambda: opt.step(closure), device, slow=slow, numel=numel)
    memory, kind = memory_used(device, opt)
    common.record(benchmark, device=device, numel=numel, n_tensors=len(list(model.parameters())),
                  memory_bytes=memory, memory_kind=kind, kind="e2e", row=name, size=spec,
                  dtype=dtype_name, autocast=autocast, tokens=batch * seq)
