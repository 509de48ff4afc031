"""The parameters a MergOPT optimizer takes: their collection and the checks the kernels need."""

from __future__ import annotations

import torch

from .layouts import layout_of, local_tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def param_list(params) -> list:
    """A group's ``params`` as a list: a tensor or an ordered collection of tensors (a set is
    refused, as by torch: its order, hence the noise identities, would vary between runs)."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError("params: parameters must be an ordered collection (list or tuple), not a set")
    return list(params)


def check_params(params: list, seen: set) -> None:
    """Reject parameters the fused kernels cannot update; ``seen`` collects ids across groups."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"params of one group must share a device, got {sorted(map(str, devices))}")
    for p in params:
        if id(p) in seen:
            raise ValueError("params: a parameter is listed more than once")
        seen.add(id(p))
        if p.is_meta:
            raise ValueError("params: a parameter is on the meta device, which holds no values to perturb; "
                             "materialise the model first (module.to_empty(device=...) and load its weights), "
                             "then build the optimizer")
        if p.is_sparse:
            raise TypeError("params: sparse parameters are not supported")
        if p.is_complex():
            raise TypeError("params: complex parameters are not supported")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"params: dtype {p.dtype} is not supported (float32, bfloat16, float16)")
        if not p.is_contiguous() or not local_tensor(p).is_contiguous():
            raise ValueError(f"params: parameters must be contiguous, got strides {p.stride()}")
        layout_of(p).check(p)
