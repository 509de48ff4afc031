"""The fused MergOPT step as one multi-tensor Triton kernel.

One launch handles every tensor of a (param group, device, dtype) bucket: a tensor table holds
each tensor's addresses and metadata, a block table maps each program to (tensor, first group).
Blocks are aligned on the noise stream's four-element groups of the *global* element index, so
a shard that starts mid-group (uneven FSDP shards) is handled by masking.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import noise
from . import triton_noise

# Columns of the tensor table (int64): one row per tensor.
F_PARAM = tl.constexpr(0)
F_GRAD = tl.constexpr(1)
F_EXP_AVG = tl.constexpr(2)
F_EXP_AVG_SQ = tl.constexpr(3)
F_MAX_EXP_AVG_SQ = tl.constexpr(4)
F_MASTER = tl.constexpr(5)
F_STEP = tl.constexpr(6)
F_NUMEL = tl.constexpr(7)
F_PARAM_ID = tl.constexpr(8)
F_INDEX_BASE = tl.constexpr(9)
F_HAS_GRAD = tl.constexpr(10)
NUM_FIELDS = tl.constexpr(11)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreted() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _groups_per_block(largest_numel: int) -> int:
    """Four-element groups per program: 256 on a GPU (1024 elements, 4 warps). The interpreter
    pays per program instead, so there a block is as large as the largest tensor (capped)."""
    if not interpreted():
        return 256
    return min(1 << 14, max(16, triton.next_power_of_2((largest_numel + 3) // 4 + 1)))


@triton.jit
def _power(base, exponent):
    """base ** exponent for an fp64 [1] base and a non-negative int32 exponent, by squaring."""
    result = tl.full([1], 1.0, tl.float64)
    for bit in tl.static_range(31):
        result = tl.where(((exponent >> bit) & 1) == 1, result * base, result)
        base = base * base
    return result


@triton.jit
def _round_to_bf16_nearest_even(x):
    """fp32 values rounded to the nearest bf16 (ties to even), still as fp32; NaN unchanged.
    Triton's interpreter casts fp32 to bf16 by truncation, a GPU by rounding to nearest even:
    rounding first makes the cast exact, so both give the bf16 value torch gives."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit(do_not_specialize=["seed", "lr", "beta1", "beta2", "eps", "weight_decay",
                               "noise_loc", "noise_scale", "n_alphas", "k_max"])
def _fused_step_kernel(
    # Pointers
    tensor_table_ptr, block_table_ptr, noise_step_ptr, alphas_ptr, lr_ptr,
    # Scalars
    seed, lr, beta1, beta2, eps, weight_decay, noise_loc, noise_scale, n_alphas, k_max,
    # Meta-parameters
    PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, NOISY: tl.constexpr, RESTORE: tl.constexpr,
    APPLY_OFFSET: tl.constexpr, GAUSSIAN: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
    ROUND_BF16_FIRST: tl.constexpr, BLOCK_G: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_table_ptr + 2 * block)
    first_group = tl.load(block_table_ptr + 2 * block + 1)
    row = tensor_table_ptr + tensor * NUM_FIELDS
    param_ptr = tl.load(row + F_PARAM).to(tl.pointer_type(PARAM_DTYPE))
    numel = tl.load(row + F_NUMEL)
    param_id = tl.load(row + F_PARAM_ID)
    index_base = tl.load(row + F_INDEX_BASE)
    has_grad = tl.load(row + F_HAS_GRAD)

    local = 4 * first_group + tl.arange(0, 4 * BLOCK_G).to(tl.int64) - index_base
    mask = (local >= 0) & (local < numel)
    noise_step = tl.load(noise_step_ptr)

    if HAS_MASTER:
        master_ptr = tl.load(row + F_MASTER).to(tl.pointer_type(tl.float32))
        theta = tl.load(master_ptr + local, mask=mask)
    else:
        theta = tl.load(param_ptr + local, mask=mask).to(tl.float32)
        if NOISY and RESTORE:
            scale_now = triton_noise.step_scale(seed, noise_step, alphas_ptr, n_alphas, k_max)
            theta -= scale_now * triton_noise.element_noise(
                seed, param_id, noise_step, first_group, noise_loc, noise_scale, BLOCK_G, GAUSSIAN)

    if has_grad != 0:
        grad_ptr = tl.load(row + F_GRAD).to(tl.pointer_type(PARAM_DTYPE))
        exp_avg_ptr = tl.load(row + F_EXP_AVG).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(row + F_EXP_AVG_SQ).to(tl.pointer_type(tl.float32))
        step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.float32))).to(tl.int32)
        if LR_IS_TENSOR:
            lr_value = tl.load(lr_ptr).to(tl.float64)
        else:
            lr_value = tl.cast(lr, tl.float64)
        beta1_64 = tl.cast(beta1, tl.float64)
        beta2_64 = tl.cast(beta2, tl.float64)
        bias_correction1 = 1.0 - _power(tl.full([1], 1.0, tl.float64) * beta1_64, step)
        bias_correction2_sqrt = tl.sqrt(1.0 - _power(tl.full([1], 1.0, tl.float64) * beta2_64, step))
        step_size = (lr_value / bias_correction1).to(tl.float32)
        decay = (1.0 - lr_value * tl.cast(weight_decay, tl.float64)).to(tl.float32)
        weight1 = (1.0 - beta1_64).to(tl.float32)
        beta2_32 = tl.cast(beta2, tl.float32)
        weight2 = (1.0 - beta2_64).to(tl.float32)

        grad = tl.load(grad_ptr + local, mask=mask).to(tl.float32)
        if MAXIMIZE:
            grad = -grad
        exp_avg = tl.load(exp_avg_ptr + local, mask=mask)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + local, mask=mask)
        theta = theta * decay
        # torch's lerp: start + w (end - start) for w < 0.5, else end - (end - start)(1 - w).
        exp_avg = tl.where(weight1 < 0.5, exp_avg + weight1 * (grad - exp_avg),
                           grad - (grad - exp_avg) * (1.0 - weight1))
        exp_avg_sq = exp_avg_sq * beta2_32 + weight2 * grad * grad
        tl.store(exp_avg_ptr + local, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + local, exp_avg_sq, mask=mask)
        second_moment = exp_avg_sq
        if AMSGRAD:
            max_exp_avg_sq_ptr = tl.load(row + F_MAX_EXP_AVG_SQ).to(tl.pointer_type(tl.float32))
            second_moment = tl.maximum(tl.load(max_exp_avg_sq_ptr + local, mask=mask), exp_avg_sq)
            tl.store(max_exp_avg_sq_ptr + local, second_moment, mask=mask)
        denom = tl.sqrt(second_moment) / bias_correction2_sqrt.to(tl.float32) + tl.cast(eps, tl.float32)
        theta = theta + (-step_size) * (exp_avg / denom)

    if HAS_MASTER:
        tl.store(master_ptr + local, theta, mask=mask)
    if NOISY and APPLY_OFFSET >= 0:
        apply_step = noise_step + APPLY_OFFSET
        scale_next = triton_noise.step_scale(seed, apply_step, alphas_ptr, n_alphas, k_max)
        theta += scale_next * triton_noise.element_noise(
            seed, param_id, apply_step, first_group, noise_loc, noise_scale, BLOCK_G, GAUSSIAN)
    if ROUND_BF16_FIRST:
        theta = _round_to_bf16_nearest_even(theta)
    tl.store(param_ptr + local, theta.to(PARAM_DTYPE), mask=mask)


class _Tables:
    """Tensor and block tables of one bucket, rebuilt only when an address or size changes."""

    def __init__(self):
        self._key = None
        self.tensor_table: Optional[torch.Tensor] = None
        self.block_table: Optional[torch.Tensor] = None

    def get(self, rows: list[tuple[int, ...]], groups_per_block: int, device: torch.device):
        key = (tuple(rows), groups_per_block, device)
        if key != self._key:
            blocks = []
            for index, row in enumerate(rows):
                numel, base = row[F_NUMEL], row[F_INDEX_BASE]
                first, last = base >> 2, (base + numel - 1) >> 2
                blocks.extend((index, group) for group in range(first, last + 1, groups_per_block))
            self.tensor_table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
            self.block_table = torch.tensor(blocks, dtype=torch.int64).to(device, non_blocking=True)
            self._key = key
        return self.tensor_table, self.block_table


_ALPHAS: dict = {}


def _device_alphas(alphas: Sequence[float], device: torch.device) -> torch.Tensor:
    key = (tuple(alphas), device)
    if key not in _ALPHAS:
        _ALPHAS[key] = torch.tensor(key[0], dtype=torch.float32, device=device)
    return _ALPHAS[key]


def fused_step(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
               max_exp_avg_sqs: Sequence[torch.Tensor], masters: Sequence[torch.Tensor],
               steps: Sequence[torch.Tensor], param_ids: Sequence[int], index_bases: Sequence[int],
               seed: int, noise_step: torch.Tensor, lr, beta1: float, beta2: float,
               eps: float, weight_decay: float, amsgrad: bool, maximize: bool, noise_loc: float,
               noise_scale: float, alphas: Sequence[float], k_max: int, distribution: str,
               restore: bool, apply_offset: int, cache: Optional[dict] = None) -> None:
    """Launch the fused step over contiguous same-device, same-dtype tensors (in place).

    Same arguments and semantics as ``ops.torch_step.fused_step``, except: ``lr`` may be a
    float or a 1-element tensor on the device, and ``cache`` (a dict the caller keeps per
    bucket) holds the address tables between steps.
    Grads must be contiguous and of the parameters' dtype.
    """
    if not params:
        return
    device = params[0].device
    rows = []
    for i, param in enumerate(params):
        grad = grads[i]
        rows.append((
            param.data_ptr(),
            grad.data_ptr() if grad is not None else 0,
            exp_avgs[i].data_ptr() if grad is not None else 0,
            exp_avg_sqs[i].data_ptr() if grad is not None else 0,
            max_exp_avg_sqs[i].data_ptr() if amsgrad and grad is not None else 0,
            masters[i].data_ptr() if masters else 0,
            steps[i].data_ptr() if grad is not None else 0,
            param.numel(), param_ids[i], index_bases[i], int(grad is not None),
        ))
    groups_per_block = _groups_per_block(max(p.numel() for p in params))
    tables = cache.setdefault("tables", _Tables()) if cache is not None else _Tables()
    tensor_table, block_table = tables.get(rows, groups_per_block, device)
    alphas = _device_alphas(alphas, device)
    lr_is_tensor = isinstance(lr, torch.Tensor)
    _fused_step_kernel[(block_table.shape[0],)](
        # Without a tensor lr, lr_ptr is never read: any valid pointer fills the slot.
        tensor_table, block_table, noise_step, alphas, lr if lr_is_tensor else alphas,
        noise.seed_as_int64(seed), 0.0 if lr_is_tensor else float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), float(noise_loc), float(noise_scale), alphas.numel(), int(k_max),
        PARAM_DTYPE=_TL_DTYPES[params[0].dtype], HAS_MASTER=bool(masters), AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize), NOISY=noise_scale != 0.0, RESTORE=bool(restore),
        APPLY_OFFSET=int(apply_offset), GAUSSIAN=distribution == "gaussian",
        LR_IS_TENSOR=lr_is_tensor,
        ROUND_BF16_FIRST=interpreted() and params[0].dtype == torch.bfloat16,
        BLOCK_G=groups_per_block,
    )


# torch.compile cannot trace fused_step (it reads data pointers to build the tables), so
# compiled code calls it through this opaque custom op: one node in the graph, no graph break.
# Its tables live here, one per bucket (device, dtype, first parameter's address, size).
_COMPILED_TABLES: dict = {}
_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters")


@torch.library.custom_op("mergopt_triton::fused_step", mutates_args=_MUTATED)
def _fused_step_op(params: list[torch.Tensor], grads: list[Optional[torch.Tensor]],
                   exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                   max_exp_avg_sqs: list[torch.Tensor], masters: list[torch.Tensor],
                   steps: list[torch.Tensor], param_ids: list[int], index_bases: list[int],
                   seed: int, noise_step: torch.Tensor, lr: float, lr_tensor: Optional[torch.Tensor],
                   beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
                   maximize: bool, noise_loc: float, noise_scale: float, alphas: list[float],
                   k_max: int, distribution: str, restore: bool, apply_offset: int) -> None:
    key = (params[0].device, params[0].dtype, params[0].data_ptr(), len(params),
           tuple(g is None for g in grads))
    fused_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, param_ids,
               index_bases, seed, noise_step, lr if lr_tensor is None else lr_tensor,
               beta1, beta2, eps, weight_decay, amsgrad, maximize, noise_loc, noise_scale, alphas,
               k_max, distribution, restore, apply_offset, cache=_COMPILED_TABLES.setdefault(key, {}))


@_fused_step_op.register_fake
def _fused_step_fake(*args, **kwargs) -> None:
    return None


def fused_step_op(**kwargs) -> None:
    """``fused_step``'s keyword arguments, through the custom op (for torch.compile)."""
    kwargs.pop("cache", None)
    if not kwargs["params"]:
        return
    lr = kwargs.pop("lr")
    lr_is_tensor = isinstance(lr, torch.Tensor)
    kwargs["grads"] = list(kwargs["grads"])
    torch.ops.mergopt_triton.fused_step(
        **kwargs, seed=noise.seed_as_int64(kwargs.pop("seed")),
        lr=0.0 if lr_is_tensor else float(lr), lr_tensor=lr if lr_is_tensor else None)
