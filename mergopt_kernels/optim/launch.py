"""The launch step: one bucket's tensors and options as ``FusedStepArgs``, run on a backend.

It holds no caches: the Triton backend keeps its own address tables (bounded), the other
backends need none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops
from .noise_clock import NoiseClock
from .noise_options import NOISE_OFF


@dataclass
class KernelTensors:
    """What one launch updates: ``params`` (contiguous tensors of one device and dtype) with
    their ``grads`` (None: no AdamW update), fp32 ``masters`` (empty for fp32), the AdamW state
    lists and options ``adam`` (None: a noise-only pass), and per tensor its noise identity
    (``param_ids``) and the index of its first element in its whole parameter (``index_bases``)."""
    params: list
    grads: list
    masters: list
    adam: Optional[dict]
    param_ids: list
    index_bases: list


@torch.no_grad()
def launch(backend: str, clock: NoiseClock, tensors: KernelTensors, noise: Optional[dict], *,
           restore: bool, apply_offset: int) -> None:
    """One fused pass over ``tensors`` with the ``noise`` options (None: noise off) at the
    clock's step: restore the perturbation of step t (``restore``), apply AdamW (when
    ``tensors.adam`` is given) and write that of step t + ``apply_offset``. ``backend`` is
    the optimizer's choice, resolved for the tensors' device."""
    device = tensors.params[0].device
    adam = tensors.adam
    if adam is None:  # no moment is read: placeholders fill the lists
        placeholders = [torch.empty(0, device=device)] * len(tensors.params)
        adam = dict(exp_avgs=placeholders, exp_avg_sqs=placeholders, max_exp_avg_sqs=[],
                    steps=placeholders, lr=0.0, beta1=0.0, beta2=0.0, eps=0.0,
                    weight_decay=0.0, amsgrad=False, maximize=False)
    args = ops.FusedStepArgs(
        params=tensors.params, grads=tensors.grads, masters=tensors.masters, param_ids=tensors.param_ids,
        index_bases=tensors.index_bases, seed=clock.seed, noise_step=clock.tensor(device), restore=restore,
        apply_offset=apply_offset, **(noise or NOISE_OFF), **adam)
    ops.fused_step(ops.resolve_backend(backend, device), args)
