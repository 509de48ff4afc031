"""Pieces of the Triton step against independent references: the fp32 bias corrections against
float64, and one bucket mixing full blocks, edge blocks, a misaligned tensor, a shard starting
mid-group and a parameter without gradient against the torch backend."""

import math
from functools import partial

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from mergopt_kernels.ops import torch_step, triton_step
from mergopt_kernels.ops.step_args import FusedStepArgs

EPS32 = 2.0**-23


@triton.jit
def _one_minus_pow_kernel(steps_ptr, out_ptr, ln_base, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    steps = tl.load(steps_ptr + offsets)
    tl.store(out_ptr + offsets, triton_step._one_minus_pow(tl.cast(ln_base, tl.float32), steps))


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.999999])
def test_bias_correction_against_float64(beta):
    steps = np.unique(np.concatenate([np.arange(1, 4097), np.geomspace(4097, 1e7, 4095).astype(np.int64)]))
    steps = np.concatenate([steps, np.full(8192 - len(steps), steps[-1])]).astype(np.float32)
    out = torch.empty(len(steps))
    ln_base = -math.inf if beta == 0.0 else math.log(beta)
    _one_minus_pow_kernel[(1,)](torch.from_numpy(steps), out, ln_base, BLOCK=len(steps))
    exact = 1.0 - beta ** steps.astype(np.float64)
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    # ln(beta) rounded to fp32 and the product t ln(beta) carry 2**-24 each, the series rounds:
    # the quotient torch takes in double and rounds once stays within 3 ulps.
    assert (np.abs(out.double().numpy() - exact) <= 3 * ulp).all()


def _bucket(generator, dtype=torch.float32):
    """Tensors of one bucket: (param, grad or None, index base)."""
    def randn(n):
        return torch.randn(n, generator=generator).to(dtype)

    misaligned = torch.empty(302, dtype=dtype)[1:]            # 4 (or 2) bytes past an aligned address
    misaligned.copy_(randn(301))
    return [(randn(5003), randn(5003), 0),                    # full blocks, then an edge block
            (misaligned, randn(301), 0),                      # edge blocks only
            (randn(77), randn(77), 4 * 1000 + 3),             # a shard starting mid-group
            (randn(10), None, 8)]                              # noise only


@pytest.mark.parametrize("distribution", ["laplace", "gaussian"])
def test_mixed_bucket_matches_the_torch_backend(fresh_seed, distribution):
    generator = torch.Generator().manual_seed(fresh_seed & 0x7FFFFFFF)
    bucket = _bucket(generator)
    results, cache = {}, {}
    for name, backend in (("triton", partial(triton_step.fused_step, cache=cache)),
                          ("torch", torch_step.fused_step)):
        params = [p.clone() for p, _, _ in bucket]
        grads = [g for _, g, _ in bucket]
        exp_avgs = [torch.rand(p.numel(), generator=torch.Generator().manual_seed(1)) for p in params]
        exp_avg_sqs = [torch.rand(p.numel(), generator=torch.Generator().manual_seed(2)) for p in params]
        backend(FusedStepArgs(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=[],
                masters=[], steps=[torch.tensor(3.0) for _ in params], param_ids=[0, 1, 2, 3],
                index_bases=[b for _, _, b in bucket], seed=fresh_seed, noise_step=torch.tensor([3]),
                lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
                noise_loc=0.0, noise_scale=1e-2, alphas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), k_max=7,
                distribution=distribution, restore=True, apply_offset=1))
        results[name] = params + exp_avgs + exp_avg_sqs
    tables = cache["tables"]
    assert set(tables.full_blocks[:, 0].tolist()) == {0}  # only the aligned tensor has full blocks
    assert set(tables.edge_blocks[:, 0].tolist()) == {0, 1, 2, 3}
    for ours, reference in zip(results["triton"], results["torch"]):
        # A few fp32 roundings apart: the noise transform, the bias corrections, the update.
        torch.testing.assert_close(ours, reference, rtol=4 * EPS32, atol=4 * EPS32)
