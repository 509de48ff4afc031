"""The arguments of the fused step, defined once: ``FusedStepArgs``.

Every backend takes one (``torch_step.fused_step``, ``triton_step.fused_step``,
``native.fused_step``). The custom ops need flat schemas: theirs are the fields in order
(``op_schema``), called with ``op_arguments`` and read back with ``from_op_arguments``. The C++
side has the same fields under the same names in ``csrc/include/mergopt/step_args.h``
(``StepArgs``, and ``TensorArgs`` per tensor with the singular of each list's name).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from .. import noise


def _field(schema_type: str):
    """A field whose custom-op schema type is ``schema_type``."""
    return dataclasses.field(metadata={"schema": schema_type})


@dataclasses.dataclass
class FusedStepArgs:
    """One fused MergOPT/AdamW pass over a bucket of tensors of one device and one dtype, in
    place: restore the perturbation of step t, AdamW, write the perturbation of step u.

    Per parameter (lists in the order of ``params``; every tensor contiguous, on the
    parameters' device, shaped like its parameter unless said otherwise):

    - params: float32, bfloat16 or float16, one dtype; each holds theta_t + s_t z_t when
      ``restore`` (theta_t otherwise) and theta + s_u z_u (or theta) on exit.
    - grads: the gradient in the parameters' dtype, or None: no AdamW for that parameter (its
      moments and step are then not read and may be placeholders).
    - exp_avgs, exp_avg_sqs: fp32 AdamW moments.
    - max_exp_avg_sqs: fp32, one per parameter when ``amsgrad``, else empty.
    - masters: fp32 copies of theta for low-precision parameters, else empty.
    - steps: fp32 1-element tensors, each parameter's AdamW step count, already incremented.
    - param_ids: the noise identity of each parameter, in [0, 2**32 - 1).
    - index_bases: index of each local tensor's first element in the whole parameter (0 unless
      the tensor is a shard of a larger parameter).

    Per step:

    - seed: the 64-bit noise seed (its int64 two's complement accepted).
    - noise_step: int64 1-element tensor on the parameters' device holding t.
    - lr (a float, or a 1-element tensor on the device: the Triton backend reads it there, the
      others on the host), beta1, beta2, eps, weight_decay, amsgrad, maximize: AdamW's options,
      as in ``torch.optim.AdamW``.
    - noise_loc, noise_scale, alphas, k_max, distribution: the noise options (``noise_scale``
      0: no noise; ``distribution`` "laplace" or "gaussian").
    - restore: subtract s_t z_t before the update (ignored with masters: they hold theta).
    - apply_offset: -1 writes theta; 0 or 1 writes theta + s_u z_u with u = t + apply_offset.
    """

    params: Sequence[torch.Tensor] = _field("Tensor(a!)[]")
    grads: Sequence[Optional[torch.Tensor]] = _field("Tensor?[]")
    exp_avgs: Sequence[torch.Tensor] = _field("Tensor(b!)[]")
    exp_avg_sqs: Sequence[torch.Tensor] = _field("Tensor(c!)[]")
    max_exp_avg_sqs: Sequence[torch.Tensor] = _field("Tensor(d!)[]")
    masters: Sequence[torch.Tensor] = _field("Tensor(e!)[]")
    steps: Sequence[torch.Tensor] = _field("Tensor[]")
    param_ids: Sequence[int] = _field("int[]")
    index_bases: Sequence[int] = _field("int[]")
    seed: int = _field("int")
    noise_step: torch.Tensor = _field("Tensor")
    lr: Union[float, torch.Tensor] = _field("float")
    beta1: float = _field("float")
    beta2: float = _field("float")
    eps: float = _field("float")
    weight_decay: float = _field("float")
    amsgrad: bool = _field("bool")
    maximize: bool = _field("bool")
    noise_loc: float = _field("float")
    noise_scale: float = _field("float")
    alphas: Sequence[float] = _field("float[]")
    k_max: int = _field("int")
    distribution: str = _field("str")
    restore: bool = _field("bool")
    apply_offset: int = _field("int")


_FIELDS = dataclasses.fields(FusedStepArgs)
NAMES = tuple(f.name for f in _FIELDS)
# The fields the step writes (alias-annotated in the schema).
MUTATED = tuple(f.name for f in _FIELDS if "!" in f.metadata["schema"])


def op_schema(*, lr_tensor: bool = False) -> str:
    """The custom ops' schema, ``"(Tensor(a!)[] params, ..., int apply_offset) -> ()"``: the
    fields in order. With ``lr_tensor``, ``float lr`` is followed by ``Tensor? lr_tensor``."""
    parts = []
    for f in _FIELDS:
        parts.append(f"{f.metadata['schema']} {f.name}")
        if lr_tensor and f.name == "lr":
            parts.append("Tensor? lr_tensor")
    return f"({', '.join(parts)}) -> ()"


def op_arguments(args: FusedStepArgs, *, lr_tensor: bool = False) -> list:
    """``args`` as the positional arguments of an op with ``op_schema(lr_tensor=...)``: seed as
    its int64 (``noise.seed_as_int64``), grads as a list; lr as a float, read from a tensor on
    the host unless ``lr_tensor``, where a tensor lr goes in ``lr_tensor`` (and lr is 0.0)."""
    values = []
    for name in NAMES:
        value = getattr(args, name)
        if name == "seed":
            value = noise.seed_as_int64(value)
        elif name == "grads":
            value = list(value)
        elif name == "lr":
            is_tensor = isinstance(value, torch.Tensor)
            if lr_tensor:
                values.append(0.0 if is_tensor else float(value))
                value = value if is_tensor else None
            else:
                value = float(value)
        values.append(value)
    return values


def from_op_arguments(values: Sequence, *, lr_tensor: bool = False) -> FusedStepArgs:
    """The ``FusedStepArgs`` that ``op_arguments(..., lr_tensor=lr_tensor)`` flattened."""
    values = list(values)
    if lr_tensor:
        at = NAMES.index("lr")
        lr, tensor = values[at], values.pop(at + 1)
        values[at] = lr if tensor is None else tensor
    return FusedStepArgs(*values)
