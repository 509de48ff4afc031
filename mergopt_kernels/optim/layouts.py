"""Tensor layouts: which elements of a parameter this rank updates, and where they sit in it.

Every element draws the noise of its (parameter, index in the whole flattened parameter), so a
sharded run follows the 1-process run. Each layout says, for a parameter, the tensor the kernels
update here (``local``: an alias, writing it writes the parameter) and the index of its first
element in the whole parameter (``first_index``):

- ``WHOLE``: an ordinary tensor, updated whole (index 0);
- ``FSDP2_SHARD``: a DTensor placed ``Shard(0)``/``Replicate()`` (FSDP2): its local shard;
- ``ZERO3_SLICE``: a DeepSpeed ZeRO-3 parameter not gathered now: this rank's slice of it.

The fourth layout, DeepSpeed's flat partitions (stages 1 to 3 once DeepSpeed took the
optimizer), is ``_deepspeed.ZeroLayout``: one tensor made of segments of several parameters.
``kernel_tensors`` turns a bucket of parameters into what one launch updates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _deepspeed
from .launch import KernelTensors

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None


def zero3_slice(p: torch.Tensor) -> Optional[tuple[torch.Tensor, int]]:
    """For a parameter partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` or
    ``deepspeed.initialize``) and not gathered now, (this rank's slice of it without the
    padding, as a 1-D alias; the index of its first element in the whole parameter), else None."""
    if not hasattr(p, "ds_tensor") or p.numel() == getattr(p, "ds_numel", 0):
        return None
    _, start, length = _deepspeed.zero3_range(p)
    return p.ds_tensor.view(-1).narrow(0, 0, length), start


class _Whole:
    """An ordinary tensor: updated whole."""

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def first_index(self, p: torch.Tensor) -> int:
        return 0

    def check(self, p: torch.Tensor) -> None:
        pass


class _Fsdp2Shard:
    """A DTensor (FSDP2): its local shard, a contiguous range of the flattened parameter."""

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local()

    def first_index(self, p: torch.Tensor) -> int:
        """Its row offset times the row size (sharded on dim 0)."""
        if p.dim() == 0:
            return 0
        # Public in effect (FSDP2 and DCP use it); present in torch 2.11 to 2.14.
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return int(offset[0]) * math.prod(p.shape[1:])

    def check(self, p: torch.Tensor) -> None:
        """Every placement must be Replicate or Shard(0) (FSDP2's default), so that one index
        describes where the local shard starts."""
        from torch.distributed.tensor import Replicate, Shard

        for placement in p.placements:
            if type(placement) is Replicate or (type(placement) is Shard and placement.dim == 0):
                continue
            raise ValueError(f"params: DTensor placements {tuple(p.placements)} are not supported; "
                             "each mesh dimension must be Replicate() or Shard(0) (FSDP2's default)")


class _Zero3Slice:
    """A ZeRO-3 parameter not gathered now: this rank's slice (``_deepspeed.zero3_range``)."""

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return zero3_slice(t)[0]

    def first_index(self, p: torch.Tensor) -> int:
        return zero3_slice(p)[1]

    def check(self, p: torch.Tensor) -> None:
        pass


WHOLE, FSDP2_SHARD, ZERO3_SLICE = _Whole(), _Fsdp2Shard(), _Zero3Slice()


def layout_of(t: torch.Tensor):
    """The layout of ``t`` now (a ZeRO-3 parameter is ``WHOLE`` while gathered)."""
    if DTensor is not None and isinstance(t, DTensor):
        return FSDP2_SHARD
    if zero3_slice(t) is not None:
        return ZERO3_SLICE
    return WHOLE


def local_tensor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor of ``t``'s elements this rank updates (an alias), or None for None."""
    return None if t is None else layout_of(t).local(t)


def index_base(p: torch.Tensor) -> int:
    """The index, in the whole flattened parameter, of the first element of ``local_tensor(p)``."""
    return layout_of(p).first_index(p)


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` holds only part of its elements here (FSDP2's DTensor, ZeRO-3)."""
    return layout_of(p) is not WHOLE


def state_shape(p: torch.Tensor) -> torch.Size:
    """The shape of ``p``'s per-element optimizer state: ``p``'s, or its ZeRO-3 slice's."""
    return local_tensor(p).shape if layout_of(p) is ZERO3_SLICE else p.shape


def kernel_tensors(params: list, grads: list, masters: list, adam: Optional[dict],
                   noise_ids: dict) -> Optional[KernelTensors]:
    """A bucket of parameters (one device and dtype) as one launch's tensors: their local
    tensors, each with its parameter's noise identity (``noise_ids``) and first index; the
    parameters with no element here are left out. None when no element is left."""
    layouts = [layout_of(p) for p in params]
    if all(layout is WHOLE for layout in layouts):
        return KernelTensors(params, grads, masters, adam, [noise_ids[p] for p in params], [0] * len(params))
    keep = [i for i, (p, layout) in enumerate(zip(params, layouts)) if layout.local(p).numel() > 0]
    if not keep:
        return None

    def local(tensors: list) -> list:
        return [local_tensor(tensors[i]) for i in keep] if tensors else tensors

    if adam is not None:
        adam = dict(adam)
        for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
            adam[name] = local(adam[name])
    return KernelTensors(
        params=local(params), grads=[g if g is None or g.is_contiguous() else g.contiguous() for g in local(grads)],
        masters=local(masters), adam=adam, param_ids=[noise_ids[params[i]] for i in keep],
        index_bases=[layouts[i].first_index(params[i]) for i in keep])
