"""Pieces of the Triton step against independent references: the fp32 bias corrections against
float64, and one bucket mixing full blocks, edge blocks, a misaligned tensor, a shard starting
mid-group and a parameter without gradient against the torch backend. The address tables the
launcher keeps: reused while a bucket's tensors stay, rebuilt when they move, bounded."""

import dataclasses
import math
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
    results = {}
    for name, backend in (("triton", triton_step.fused_step), ("torch", torch_step.fused_step)):
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
        if name == "triton":
            tables = _latest_tables()
    assert set(tables.full_blocks[:, 0].tolist()) == {0}  # only the aligned tensor has full blocks
    assert set(tables.edge_blocks[:, 0].tolist()) == {0, 1, 2, 3}
    for ours, reference in zip(results["triton"], results["torch"]):
        # A few fp32 roundings apart: the noise transform, the bias corrections, the update.
        torch.testing.assert_close(ours, reference, rtol=4 * EPS32, atol=4 * EPS32)


def _latest_tables():
    return next(reversed(triton_step._TABLES._entries.values()))


def _step_args(params, grads, seed, alphas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)):
    """One noisy AdamW step's arguments over fp32 ``params`` (moments and steps made here)."""
    return FusedStepArgs(
        params=params, grads=grads, exp_avgs=[torch.zeros_like(p) for p in params],
        exp_avg_sqs=[torch.zeros_like(p) for p in params], max_exp_avg_sqs=[], masters=[],
        steps=[torch.tensor(1.0) for _ in params], param_ids=list(range(len(params))), index_bases=[0] * len(params),
        seed=seed, noise_step=torch.tensor([1]), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
        amsgrad=False, maximize=False, noise_loc=0.0, noise_scale=1e-2, alphas=alphas, k_max=7,
        distribution="laplace", restore=True, apply_offset=1)


@pytest.fixture
def small_table_cache(monkeypatch):
    cache = triton_step._TableCache(capacity=3)
    monkeypatch.setattr(triton_step, "_TABLES", cache)
    return cache


def test_tables_are_reused_rebuilt_when_a_tensor_moves_and_bounded(small_table_cache, fresh_seed):
    generator = torch.Generator().manual_seed(fresh_seed & 0x7FFFFFFF)
    params = [torch.randn(n, generator=generator) for n in (5, 9)]
    args = _step_args(params, [torch.randn(p.numel(), generator=generator) for p in params], fresh_seed)
    triton_step.fused_step(args)
    first = _latest_tables()
    triton_step.fused_step(args)
    assert _latest_tables() is first and len(small_table_cache) == 1
    # The custom op (what compiled steps call) shares the cache.
    triton_step.fused_step_op(args)
    assert _latest_tables() is first and len(small_table_cache) == 1
    # Gradients allocated at new addresses, other alphas: the bucket's tables are replaced.
    moved = [g.clone() for g in args.grads]
    triton_step.fused_step(dataclasses.replace(args, grads=moved, alphas=(0.25, 0.5)))
    replaced = _latest_tables()
    assert replaced is not first and len(small_table_cache) == 1
    assert replaced.tensor_table[:, triton_step.F_GRAD.value].tolist() == [g.data_ptr() for g in moved]
    assert replaced.alphas.tolist() == [0.25, 0.5]
    # The same bucket without gradients (a noise-only pass) keeps its own entry.
    triton_step.fused_step(dataclasses.replace(args, grads=[None, None]))
    assert len(small_table_cache) == 2
    # More buckets than the capacity: the least recently used ones go.
    for _ in range(4):
        other = [torch.randn(3, generator=generator)]
        triton_step.fused_step(_step_args(other, [torch.randn(3, generator=generator)], fresh_seed))
    assert len(small_table_cache) == 3
    assert all(tables is not replaced for tables in small_table_cache._entries.values())


def test_a_launch_reusing_tables_matches_one_building_them_bit_for_bit(monkeypatch, fresh_seed):
    generator = torch.Generator().manual_seed(fresh_seed & 0x7FFFFFFF)
    start = [torch.randn(n, generator=generator) for n in (4099, 7)]
    grads = [torch.randn(p.numel(), generator=generator) for p in start]
    results = []
    for reuse in (True, False):
        monkeypatch.setattr(triton_step, "_TABLES", triton_step._TableCache(capacity=3))
        params = [p.clone() for p in start]
        args = _step_args(params, grads, fresh_seed)
        for step in range(1, 4):
            if not reuse:  # an empty cache: every launch builds its tables
                monkeypatch.setattr(triton_step, "_TABLES", triton_step._TableCache(capacity=3))
            args.noise_step.fill_(step)
            triton_step.fused_step(args)
        assert len(triton_step._TABLES) == 1
        results.append([t.clone() for t in params + list(args.exp_avgs) + list(args.exp_avg_sqs)])
    for reused, rebuilt in zip(*results):
        assert torch.equal(reused.view(torch.int32), rebuilt.view(torch.int32))
