"""FusedStepArgs, the one definition of the fused step's arguments, and the flat form the custom
ops take (ops/step_args.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mergopt_kernels import noise
from mergopt_kernels.ops import step_args, triton_step  # noqa: F401  (registers mergopt_triton::fused_step)
from mergopt_kernels.ops.step_args import FusedStepArgs


def make_args(seed: int, lr) -> FusedStepArgs:
    gen = torch.Generator().manual_seed(seed & 0xFFFF)
    sizes = (7, 1, 4099)
    params = [torch.randn(n, generator=gen) for n in sizes]
    return FusedStepArgs(
        params=params, grads=(torch.randn(7, generator=gen), None, torch.randn(4099, generator=gen)),
        exp_avgs=[torch.zeros(n) for n in sizes], exp_avg_sqs=[torch.zeros(n) for n in sizes],
        max_exp_avg_sqs=[torch.zeros(n) for n in sizes], masters=[], steps=[torch.tensor(1.0)] * 3,
        param_ids=[0, 5, 9], index_bases=[0, 0, 12], seed=seed, noise_step=torch.tensor([3]), lr=lr,
        beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=True, maximize=False, noise_loc=0.25,
        noise_scale=5e-4, alphas=(0.1, 0.2), k_max=7, distribution="gaussian", restore=True, apply_offset=1)


def same_field(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_field(x, y) for x, y in zip(a, b))
    return a is b if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("lr_tensor", [False, True])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_op_arguments_round_trip(fresh_seed, lr_tensor, lr_kind):
    """Flattened for an op and read back, every field is the one given (the same tensors), the
    seed as its int64 and a tensor lr, without lr_tensor, as the float it holds."""
    lr = torch.tensor([1e-3]) if lr_kind == "tensor" else 1e-3
    args = make_args(fresh_seed, lr)
    values = step_args.op_arguments(args, lr_tensor=lr_tensor)
    assert len(values) == len(step_args.NAMES) + lr_tensor
    back = step_args.from_op_arguments(values, lr_tensor=lr_tensor)
    assert back.seed == noise.seed_as_int64(fresh_seed) and back.seed & (2**64 - 1) == fresh_seed
    if lr_kind == "tensor" and lr_tensor:
        assert back.lr is lr
    else:
        assert type(back.lr) is float and back.lr == float(lr)
    for name in step_args.NAMES:
        if name not in ("seed", "lr"):
            assert same_field(getattr(back, name), getattr(args, name)), name


def test_schema_lists_the_fields_in_order():
    names = [f.name for f in dataclasses.fields(FusedStepArgs)]
    schema = torch._C.parse_schema("ns::op" + step_args.op_schema())
    assert [a.name for a in schema.arguments] == names
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert tuple(written) == step_args.MUTATED == ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters")


def test_triton_op_schema_is_derived_from_the_fields():
    schema = str(torch.ops.mergopt_triton.fused_step.default._schema)
    assert schema == "mergopt_triton::fused_step" + step_args.op_schema(lr_tensor=True)
