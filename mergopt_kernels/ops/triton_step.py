"""The fused MergOPT step as one multi-tensor Triton kernel.

Two launches handle every tensor of a (param group, device, dtype) bucket: a tensor table holds
each tensor's addresses and metadata, a block table maps each program to (tensor, first group).
With noise, a one-program launch before them computes the step's two scales s_t and s_u on the
device, which every block then reads instead of running the scale's Philox call per thread.
Blocks are aligned on the noise stream's four-element groups of the *global* element index, so
a shard that starts mid-group (uneven FSDP shards) is handled by masking. Full blocks (inside
an aligned tensor) run a kernel variant without masks and with 128-bit accesses; the rest (each
tensor's last partial block, misaligned tensors) run the masked variant in smaller blocks.
``bench/kernel_cost.py`` reports the compiled code's instructions per byte.
"""

from __future__ import annotations

import collections
import math
import os

import torch
import triton
import triton.language as tl

from .. import noise
from . import step_args, triton_noise
from .step_args import FusedStepArgs

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
_POINTER_FIELDS = (F_PARAM, F_GRAD, F_EXP_AVG, F_EXP_AVG_SQ, F_MAX_EXP_AVG_SQ, F_MASTER)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreted() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _groups_per_block(largest_numel: int) -> tuple[int, int]:
    """Four-element groups per program of full blocks and of edge blocks.

    On a GPU 512 and 128 (4 warps: 16 elements per thread in full blocks, which spreads the
    per-block scalars thinly at about 126 registers; 4 in the masked edge blocks, whose int32
    masks would otherwise need about 250 registers). The interpreter pays per program instead,
    so there both are half the largest tensor (capped), which still sends that tensor's leading
    blocks through the full-block path.
    """
    if not interpreted():
        return 512, 128
    groups = min(1 << 14, max(16, triton.next_power_of_2((largest_numel + 3) // 4) // 2))
    return groups, groups


@triton.jit
def _one_minus_pow(ln_base, exponent):
    """1 - base**exponent = -expm1(exponent * ln(base)) in fp32 for ln(base) <= 0 (-inf for a
    zero base), without the cancellation of 1 - pow: a Taylor series of expm1 where
    |x| < 1 (truncation below 2**-28), 1 - exp(x) beyond (result above 0.63)."""
    x = exponent * ln_base
    s = tl.maximum(x, -1.0)                             # the series' branch only: no overflow
    series = s * (1.0 / 39916800) + 1.0 / 3628800      # sum of s**j / (j + 1)!, j = 0..10
    series = series * s + 1.0 / 362880
    series = series * s + 1.0 / 40320
    series = series * s + 1.0 / 5040
    series = series * s + 1.0 / 720
    series = series * s + 1.0 / 120
    series = series * s + 1.0 / 24
    series = series * s + 1.0 / 6
    series = series * s + 0.5
    series = series * s + 1.0
    return tl.where(x > -1.0, -(s * series), 1.0 - tl.exp(x))


@triton.jit
def _round_to_bf16_nearest_even(x):
    """fp32 values rounded to the nearest bf16 (ties to even), still as fp32; NaN unchanged.
    Triton's interpreter casts fp32 to bf16 by truncation, a GPU by rounding to nearest even:
    rounding first makes the cast exact, so both give the bf16 value torch gives."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def _column(row, column, dtype: tl.constexpr, start, FULL: tl.constexpr):
    """Pointer to ``dtype`` at local element ``start`` of the tensor whose address is in
    ``column`` of the tensor table; aligned for four-element accesses in full blocks (the
    launcher sends only 16-byte aligned tensors there, and start is a multiple of the block)."""
    pointer = tl.load(row + column).to(tl.pointer_type(dtype)) + start
    if FULL:
        # On the pointer (a hint on the int64 is lost in the cast). Four elements per access
        # whatever the dtype, so that fp32 and 16-bit tensors share one register layout (eight
        # 16-bit elements per 128-bit access would need a shuffle through shared memory).
        pointer = tl.multiple_of(pointer, 4 * dtype.primitive_bitwidth // 8)
    return pointer


@triton.jit(do_not_specialize=["seed", "n_alphas", "k_max", "apply_offset"])
def _step_scales_kernel(noise_step_ptr, alphas_ptr, scales_ptr, seed, n_alphas, k_max, apply_offset):
    """scales[0] = s_t and scales[1] = s_(t + apply_offset) (fp32), t = noise_step[0]."""
    noise_step = tl.load(noise_step_ptr)
    at = tl.arange(0, 1)
    tl.store(scales_ptr + at, triton_noise.step_scale(seed, noise_step, alphas_ptr, n_alphas, k_max))
    tl.store(scales_ptr + 1 + at, triton_noise.step_scale(seed, noise_step + apply_offset, alphas_ptr, n_alphas, k_max))


@triton.jit(do_not_specialize=["seed", "lr", "beta1", "weight1", "beta2", "weight2", "ln_beta1",
                               "ln_beta2", "eps", "weight_decay", "noise_loc", "noise_scale"])
def _fused_step_kernel(
    # Pointers
    tensor_table_ptr, block_table_ptr, noise_step_ptr, scales_ptr, lr_ptr,
    # Scalars
    seed, lr, beta1, weight1, beta2, weight2, ln_beta1, ln_beta2, eps, weight_decay,
    noise_loc, noise_scale,
    # Meta-parameters
    PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, NOISY: tl.constexpr, RESTORE: tl.constexpr,
    APPLY_OFFSET: tl.constexpr, GAUSSIAN: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
    ROUND_BF16_FIRST: tl.constexpr, FULL: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """One block of 4 * BLOCK_G elements of one tensor. FULL blocks lie inside their tensor,
    start at a local index that is a multiple of 4 * BLOCK_G and have 16-byte aligned
    addresses: no masks, 128-bit accesses. Other blocks are masked element by element.
    scales_ptr: s_t and s_(t + APPLY_OFFSET) from ``_step_scales_kernel`` (read when NOISY)."""
    block = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_table_ptr + 2 * block)
    first_group = tl.load(block_table_ptr + 2 * block + 1)
    row = tensor_table_ptr + tensor * NUM_FIELDS
    param_id = tl.load(row + F_PARAM_ID)
    has_grad = tl.load(row + F_HAS_GRAD)
    # Local index of the block's first element (negative for a shard starting mid-group); the
    # pointers below point there, so that the per-element offsets fit in int32.
    start = 4 * first_group - tl.load(row + F_INDEX_BASE)
    param_ptr = _column(row, F_PARAM, PARAM_DTYPE, start, FULL)
    offsets = tl.arange(0, 4 * BLOCK_G)
    if FULL:
        mask = None
    else:
        first = tl.minimum(tl.maximum(-start, 0), 4 * BLOCK_G).to(tl.int32)
        stop = tl.minimum(tl.load(row + F_NUMEL) - start, 4 * BLOCK_G).to(tl.int32)
        mask = (offsets >= first) & (offsets < stop)
    noise_step = tl.load(noise_step_ptr)

    if HAS_MASTER:
        master_ptr = _column(row, F_MASTER, tl.float32, start, FULL)
        theta = tl.load(master_ptr + offsets, mask=mask)
    else:
        theta = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
        if NOISY and RESTORE:
            scale_now = tl.load(scales_ptr)
            theta -= scale_now * triton_noise.element_noise(
                seed, param_id, noise_step, first_group, noise_loc, noise_scale, BLOCK_G, GAUSSIAN)

    if has_grad != 0:
        grad_ptr = _column(row, F_GRAD, PARAM_DTYPE, start, FULL)
        exp_avg_ptr = _column(row, F_EXP_AVG, tl.float32, start, FULL)
        exp_avg_sq_ptr = _column(row, F_EXP_AVG_SQ, tl.float32, start, FULL)
        step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.float32)))
        if LR_IS_TENSOR:
            lr_value = tl.load(lr_ptr)
        else:
            lr_value = tl.cast(lr, tl.float32)
        # Per-block scalars in fp32, as torch rounds them: step size, decay, sqrt(1 - beta2^t).
        step_size = tl.div_rn(lr_value, _one_minus_pow(tl.cast(ln_beta1, tl.float32), step))
        # torch divides by sqrt(1 - beta2^t); one reciprocal per block and a multiply per element
        # differ from that by at most an ulp of the quotient.
        inv_bias_correction2_sqrt = tl.div_rn(1.0, tl.sqrt_rn(_one_minus_pow(tl.cast(ln_beta2, tl.float32), step)))
        decay = 1.0 - lr_value * tl.cast(weight_decay, tl.float32)
        weight1_32 = tl.cast(weight1, tl.float32)

        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        if MAXIMIZE:
            grad = -grad
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
        theta = theta * decay
        # torch's lerp: start + w (end - start) for w < 0.5, else end - (end - start)(1 - w).
        if weight1_32 < 0.5:
            exp_avg = exp_avg + weight1_32 * (grad - exp_avg)
        else:
            exp_avg = grad - (grad - exp_avg) * tl.cast(beta1, tl.float32)
        exp_avg_sq = exp_avg_sq * tl.cast(beta2, tl.float32) + tl.cast(weight2, tl.float32) * grad * grad
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
        second_moment = exp_avg_sq
        if AMSGRAD:
            max_exp_avg_sq_ptr = _column(row, F_MAX_EXP_AVG_SQ, tl.float32, start, FULL)
            second_moment = tl.maximum(tl.load(max_exp_avg_sq_ptr + offsets, mask=mask), exp_avg_sq)
            tl.store(max_exp_avg_sq_ptr + offsets, second_moment, mask=mask)
        # IEEE square root and division, as torch's fused AdamW computes them (tl.sqrt and /
        # compile to sqrt.approx.ftz.f32 and div.full.f32, a few ulps off).
        denom = tl.sqrt_rn(second_moment) * inv_bias_correction2_sqrt + tl.cast(eps, tl.float32)
        theta = theta + (-step_size) * tl.div_rn(exp_avg, denom)

    if HAS_MASTER:
        tl.store(master_ptr + offsets, theta, mask=mask)
    if NOISY and APPLY_OFFSET >= 0:
        apply_step = noise_step + APPLY_OFFSET
        scale_next = tl.load(scales_ptr + 1)
        theta += scale_next * triton_noise.element_noise(
            seed, param_id, apply_step, first_group, noise_loc, noise_scale, BLOCK_G, GAUSSIAN)
    if ROUND_BF16_FIRST:
        theta = _round_to_bf16_nearest_even(theta)
    tl.store(param_ptr + offsets, theta.to(PARAM_DTYPE), mask=mask)


class _Tables:
    """The device tensors a bucket's launches read besides its own: the tensor table, the two
    block tables (full blocks, edge blocks) and the alphas, built from ``key`` =
    (rows, block groups, alphas, device).

    A block is full when it lies inside its tensor, its tensor's index base is a multiple of 4
    (so the block starts at a local index that is a multiple of the block) and every address of
    the tensor is 16-byte aligned; the kernel then drops the masks and uses 128-bit accesses.
    Every other block (a tensor's partial last block, misaligned tensors, shards starting
    mid-group) goes through the masked edge path.
    """

    def __init__(self, key: tuple):
        rows, (full_g, edge_g), alphas, device = key
        full, edge = [], []
        for index, row in enumerate(rows):
            numel, base = row[F_NUMEL], row[F_INDEX_BASE]
            group, stop = base >> 2, ((base + numel - 1) >> 2) + 1
            if base % 4 == 0 and all(row[f] % 16 == 0 for f in _POINTER_FIELDS):
                while 4 * (group + full_g) <= base + numel:
                    full.append((index, group))
                    group += full_g
            edge.extend((index, g) for g in range(group, stop, edge_g))
        self.key = key
        self.tensor_table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        self.full_blocks, self.edge_blocks = (
            torch.tensor(blocks, dtype=torch.int64).reshape(-1, 2).to(device, non_blocking=True)
            for blocks in (full, edge))
        self.alphas = torch.tensor(alphas, dtype=torch.float32).to(device, non_blocking=True)


class _TableCache:
    """The ``_Tables`` of the last ``capacity`` buckets launched, least recently used dropped
    first; a bucket's tables are rebuilt when anything they hold changes (a gradient allocated
    at a new address, a tensor moved), replacing the old ones.

    A bucket is told apart by (device, dtype, its first parameter's address, its number of
    tensors, which have a gradient): the optimizers' passes over one bucket with and without
    gradients keep one entry each. A CUDA graph that captured a launch reads its tables at their
    addresses: they stay alive while the same bucket is launched with the same tensors, or until
    ``capacity`` other buckets are launched after it.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict[tuple, _Tables] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, bucket: tuple, key: tuple) -> _Tables:
        """The tables of ``bucket`` built from ``key`` (see ``_Tables``)."""
        tables = self._entries.pop(bucket, None)
        if tables is None or tables.key != key:
            tables = _Tables(key)
            while len(self._entries) >= self.capacity:
                self._entries.popitem(last=False)
        self._entries[bucket] = tables
        return tables


# One cache for the eager launches and those of the custom op (compiled steps).
_TABLES = _TableCache(capacity=64)


def fused_step(args: FusedStepArgs) -> None:
    """Launch the fused step of ``args`` (see ``FusedStepArgs``; in place) over contiguous
    tensors of one device and dtype. A tensor ``args.lr`` is read on the device. The address
    tables are kept between steps in this module (``_TableCache``, bounded).
    """
    params, grads = args.params, args.grads
    if not params:
        return
    device = params[0].device
    rows = []
    for i, param in enumerate(params):
        grad = grads[i]
        rows.append((
            param.data_ptr(),
            grad.data_ptr() if grad is not None else 0,
            args.exp_avgs[i].data_ptr() if grad is not None else 0,
            args.exp_avg_sqs[i].data_ptr() if grad is not None else 0,
            args.max_exp_avg_sqs[i].data_ptr() if args.amsgrad and grad is not None else 0,
            args.masters[i].data_ptr() if args.masters else 0,
            args.steps[i].data_ptr() if grad is not None else 0,
            param.numel(), args.param_ids[i], args.index_bases[i], int(grad is not None),
        ))
    block_groups = _groups_per_block(max(p.numel() for p in params))
    bucket = (device, params[0].dtype, rows[0][F_PARAM], len(rows), tuple(row[F_HAS_GRAD] for row in rows))
    tables = _TABLES.get(bucket, (tuple(rows), block_groups, tuple(map(float, args.alphas)), device))
    lr = args.lr
    lr_is_tensor = isinstance(lr, torch.Tensor)
    beta1, beta2 = float(args.beta1), float(args.beta2)
    # Host scalars in double, rounded once to the fp32 the kernel takes (as torch rounds them).
    ln_beta1, ln_beta2 = (math.log(b) if b > 0.0 else -math.inf for b in (beta1, beta2))
    # Options that change nothing (noise off; a restore with masters, which hold theta) are
    # passed as one value each: fewer kernel variants to compile.
    noisy = args.noise_scale != 0.0
    seed = noise.seed_as_int64(args.seed)
    if noisy:
        scales = torch.empty(2, dtype=torch.float32, device=device)
        _step_scales_kernel[(1,)](args.noise_step, tables.alphas, scales, seed, tables.alphas.numel(),
                                  int(args.k_max), max(int(args.apply_offset), 0))
    for blocks, full, groups in ((tables.full_blocks, True, block_groups[0]),
                                 (tables.edge_blocks, False, block_groups[1])):
        if blocks.shape[0] == 0:
            continue
        _fused_step_kernel[(blocks.shape[0],)](
            # Slots that are never read (lr without a tensor lr, the scales without noise) take
            # any valid pointer.
            tables.tensor_table, blocks, args.noise_step, scales if noisy else tables.alphas,
            lr if lr_is_tensor else tables.alphas,
            seed, 0.0 if lr_is_tensor else float(lr), beta1, 1.0 - beta1,
            beta2, 1.0 - beta2, ln_beta1, ln_beta2, float(args.eps), float(args.weight_decay),
            float(args.noise_loc), float(args.noise_scale),
            PARAM_DTYPE=_TL_DTYPES[params[0].dtype], HAS_MASTER=bool(args.masters), AMSGRAD=bool(args.amsgrad),
            MAXIMIZE=bool(args.maximize), NOISY=noisy, RESTORE=noisy and bool(args.restore) and not args.masters,
            APPLY_OFFSET=int(args.apply_offset) if noisy else -1,
            GAUSSIAN=noisy and args.distribution == "gaussian", LR_IS_TENSOR=lr_is_tensor,
            ROUND_BF16_FIRST=interpreted() and params[0].dtype == torch.bfloat16,
            FULL=full, BLOCK_G=groups,
            enable_fp_fusion=True,  # contracted multiply-adds, stated: triton 3.9 warns when it is left implicit
            # A register budget above what the kernel takes (at most 128): without one, the
            # ptxas of triton 3.6 holds variants with calls into the IEEE slow paths at 96
            # registers and spills; 128 exactly schedules the fp32 step with 2 more
            # instructions per element (measured on triton 3.6 and 3.9).
            maxnreg=160,
        )


# torch.compile cannot trace fused_step (it reads data pointers to build the tables), so
# compiled code calls it through this opaque custom op: one node in the graph, no graph break.
@torch.library.custom_op("mergopt_triton::fused_step", mutates_args=step_args.MUTATED,
                         schema=step_args.op_schema(lr_tensor=True))
def _fused_step_op(*values) -> None:
    fused_step(step_args.from_op_arguments(values, lr_tensor=True))


@_fused_step_op.register_fake
def _fused_step_fake(*args, **kwargs) -> None:
    return None


def fused_step_op(args: FusedStepArgs) -> None:
    """``fused_step`` through the custom op ``mergopt_triton::fused_step`` (for torch.compile)."""
    if not args.params:
        return
    torch.ops.mergopt_triton.fused_step(*step_args.op_arguments(args, lr_tensor=True))
