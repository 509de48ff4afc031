"""The optimizers our fused step is measured against, as importable constructors.

Every entry of ``STEP_OPTIMIZERS`` / ``E2E_OPTIMIZERS`` maps a row name to
``build(params, device) -> optimizer`` whose ``step(closure=None)`` is one training step's
optimizer work (with a closure: the forward/backward too, as many times as the method needs).

- ``adamw_foreach``, ``adamw_fused``: ``torch.optim.AdamW``; ``adamw_fused`` is the baseline
  every ratio is taken against.
- ``fused[<backend>]``: ``FusedMergOptAdamW`` on each backend of ``mergopt_kernels.ops.BACKENDS``
  that runs on the device (a new backend becomes a new row).
- ``mergopt(adamw_fused)``: ``MergOpt`` around ``torch.optim.AdamW(fused=True)``.
- ``reference``: ``mergopt_kernels.reference.ReferenceMergOpt`` (stores z and a backup).
- ``published``: the published MergOPT pattern (``PublishedMergOpt``).
- ``sam``: SAM with two forward/backward passes per step, as SAFT-Merge (``SAM``).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from mergopt_kernels import FusedMergOptAdamW, MergOpt, ops
from mergopt_kernels.reference import ReferenceMergOpt

LR = 1e-4
WEIGHT_DECAY = 1e-2
NOISE_SCALE = 5e-4
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
K_MAX = 7
SEED = 1234
BASELINE = "adamw_fused"


class PublishedMergOpt:
    """The published reference code's step, per tensor in Python (MISSION.md, "Facts").

    ``step(closure)``: draw (alpha, K) from numpy's global RNG, then per tensor back up the
    weights and add ``(K alpha - 1) z`` with ``z`` Laplace by the inverse CDF of ``torch.rand``;
    run the closure (if any) at those weights; copy every backup back; ``base.step()``.
    Without a closure (how HF Trainer calls it) the noise is added and removed with nothing
    evaluated in between: that is the cost of its step, and the run is plain AdamW.
    ``base`` defaults to ``torch.optim.AdamW`` with torch's default implementation, as there.
    """

    def __init__(self, params, base: Optional[torch.optim.Optimizer] = None, *,
                 noise_scale=NOISE_SCALE, noise_loc=0.0, alphas=ALPHAS, k_max=K_MAX):
        self.params = list(params)
        self.base = base or torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.noise_scale, self.noise_loc = noise_scale, noise_loc
        self.alphas, self.k_max = alphas, k_max
        self.peak_extra_bytes = 0

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        scale = float(np.random.choice(self.alphas)) * int(np.random.randint(1, self.k_max + 1)) - 1.0
        backups = []
        for p in self.params:
            backups.append(p.detach().clone())
            u = torch.rand_like(p) - 0.5
            z = self.noise_loc - self.noise_scale * torch.sign(u) * torch.log1p(-2.0 * u.abs())
            p.add_(z, alpha=scale)
        self.peak_extra_bytes = max(self.peak_extra_bytes, tensor_bytes(backups))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, backup in zip(self.params, backups):
            p.copy_(backup)
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)


class SAM:
    """SAM as SAFT-Merge uses it: two forward/backward passes per step, old weights stored.

    ``step(closure)``: gradient at theta (first pass), move to ``theta + rho g / ||g||``,
    gradient there (second pass), restore theta from the stored copy, ``base.step()``.
    """

    def __init__(self, params, base: Optional[torch.optim.Optimizer] = None, rho: float = 0.05):
        self.params = list(params)
        self.base = base or torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        self.rho = rho
        self.peak_extra_bytes = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]):
        with torch.enable_grad():
            closure()
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        old = [p.detach().clone() for p in params]
        self.peak_extra_bytes = max(self.peak_extra_bytes, tensor_bytes(old))
        torch._foreach_add_(params, torch._foreach_mul(grads, self.rho / (norm + 1e-12)))
        with torch.enable_grad():
            loss = closure()
        torch._foreach_copy_(params, old)
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)


class ReferenceStep:
    """``ReferenceMergOpt`` driven as a step: ``perturb()``, the closure, ``step()``."""

    def __init__(self, params):
        self.ref = ReferenceMergOpt(list(params), lr=LR, weight_decay=WEIGHT_DECAY,
                                    noise_scale=NOISE_SCALE, alphas=ALPHAS, k_max=K_MAX, seed=SEED)
        self.state = self.ref.base.state
        self.peak_extra_bytes = 0

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        self.ref.perturb()
        self.peak_extra_bytes = max(self.peak_extra_bytes, tensor_bytes([self.ref._backup, self.ref.z]))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.ref.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.ref.base.zero_grad(set_to_none=set_to_none)


def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensors reachable through dicts, lists and tuples."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.data_ptr() not in seen:
                seen.add(item.data_ptr())
                total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def state_bytes(opt) -> int:
    """The optimizer's persistent state plus the peak of what a peer holds during a step."""
    state = getattr(opt, "state", None)
    if state is None:
        state = opt.base.state
    return tensor_bytes(dict(state)) + getattr(opt, "peak_extra_bytes", 0)


def fused_backends(device: torch.device) -> dict[str, Optional[str]]:
    """backend -> None if it runs tensors on ``device`` here, else the reason it does not."""
    available = {}
    for backend in ops.BACKENDS:
        if backend == "auto":
            continue
        try:
            ops.resolve_backend(backend, device)
            available[backend] = None
        except (ValueError, ImportError, RuntimeError) as error:
            available[backend] = str(error)
        if backend == "torch" and device.type != "cpu":
            # ops/torch_step.py draws the noise as CPU tensors: it is the CPU path only.
            available[backend] = "the torch backend generates its noise on the host (CPU path)"
    return available


def is_slow(name: str, device: torch.device) -> bool:
    """Rows whose noise runs as torch tensor ops (the CPU torch backend, the reference's host
    noise): seconds per million parameters, so they get fewer rounds and a size cap."""
    if name == "reference":
        return True
    if name == "fused[torch]":
        return True
    if name.startswith("mergopt"):
        return ops.resolve_backend("auto", device) == "torch"
    return False


def _adamw(**kwargs):
    return lambda params, device: torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **kwargs)


def _fused(backend: str):
    return lambda params, device: FusedMergOptAdamW(
        params, lr=LR, weight_decay=WEIGHT_DECAY, noise_scale=NOISE_SCALE, alphas=ALPHAS,
        k_max=K_MAX, seed=SEED, backend=backend)


def _mergopt(params, device):
    base = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    return MergOpt(base, noise_scale=NOISE_SCALE, alphas=ALPHAS, k_max=K_MAX, seed=SEED)


def step_optimizers(device: torch.device) -> dict[str, tuple[Optional[Callable], Optional[str]]]:
    """Row name -> (builder, None) or (None, reason it is skipped on ``device``)."""
    rows = {"adamw_fused": (_adamw(fused=True), None), "adamw_foreach": (_adamw(foreach=True), None)}
    for backend, reason in fused_backends(device).items():
        rows[f"fused[{backend}]"] = (_fused(backend), None) if reason is None else (None, reason)
    rows["mergopt(adamw_fused)"] = (_mergopt, None)
    rows["reference"] = (lambda params, device: ReferenceStep(params), None)
    rows["published"] = (lambda params, device: PublishedMergOpt(params), None)
    return rows


def e2e_optimizers(device: torch.device) -> dict[str, tuple[Optional[Callable], Optional[str]]]:
    """The end-to-end rows: AdamW, every fused backend, the published pattern, SAM."""
    rows = {name: row for name, row in step_optimizers(device).items()
            if name == BASELINE or name.startswith("fused[") or name == "published"}
    rows["sam"] = (lambda params, device: SAM(params), None)
    return rows
