"""Masters: the exact fp32 copy of theta that bfloat16/float16 parameters keep.

A low-precision parameter holding ``theta + s z`` cannot give theta back by subtracting
``s z`` (the sum was rounded); its master can. Where a master lives is the optimizer's choice,
given as ``holder(p)``: the dict whose ``"master"`` entry is ``p``'s (``FusedMergOptAdamW``:
its state, saved with it; ``MergOpt``: its own, since a base optimizer fills its state lazily).
A ZeRO-3 parameter's master covers this rank's slice only.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .layouts import ZERO3_SLICE, layout_of, local_tensor

Holder = Callable[[torch.Tensor], dict]


def needs_master(p: torch.Tensor) -> bool:
    """Whether ``p`` keeps an fp32 master copy of theta (bfloat16 and float16 parameters)."""
    return p.dtype != torch.float32


def master_of(p: torch.Tensor, holder: Holder) -> Optional[torch.Tensor]:
    return holder(p).get("master")


def make_masters(params: list, holder: Holder) -> None:
    """Give each low-precision parameter of ``params`` that has none a master: a copy of what
    it holds (clean theta, when the parameters have just been given to the optimizer)."""
    for p in params:
        if needs_master(p) and "master" not in holder(p):
            source = local_tensor(p) if layout_of(p) is ZERO3_SLICE else p
            holder(p)["master"] = source.detach().float()


@torch.no_grad()
def take_theta(p: torch.Tensor, holder: Holder) -> None:
    """``p`` holds clean theta written from outside: its master (if any) takes it."""
    master = master_of(p, holder)
    if master is not None:
        local_tensor(master).copy_(local_tensor(p))


@torch.no_grad()
def follow_cast(p: torch.Tensor, old_dtype: torch.dtype, holder: Holder) -> bool:
    """After ``p`` was moved or cast: its master moves along, a parameter cast to another dtype
    takes theta from its master, and the master is made or dropped as the new dtype needs.
    Returns whether ``p`` was given clean theta from its master."""
    master = master_of(p, holder)
    cleaned = False
    if master is not None:
        master = master.to(p.device)
        if p.dtype != old_dtype:  # theta is exact in the master: the parameter takes it, clean
            local_tensor(p).copy_(local_tensor(master))
            cleaned = True
    if needs_master(p):
        holder(p)["master"] = master if master is not None else p.detach().float()
    else:
        holder(p).pop("master", None)
    return cleaned
