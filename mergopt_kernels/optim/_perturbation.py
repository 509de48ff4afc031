"""What FusedMergOptAdamW and MergOpt share: noise options, checks, and the perturbation's life.

The parameters hold ``theta_t + s_t z_t`` between steps (``perturbed``), where ``t`` is the
noise step kept in an int64 device tensor per device, so that no step needs the host to read it.
Low-precision parameters keep ``theta_t`` exactly in an fp32 ``master`` entry of their state.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Iterator, Optional

import torch

from .. import noise, ops

NOISE_DEFAULTS = dict(noise_scale=5e-4, noise_loc=0.0, alphas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
                      k_max=7, distribution="laplace")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK64 = (1 << 64) - 1


def _finite_number(name: str, value, minimum: Optional[float] = None) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a 1-element float tensor, got shape {tuple(value.shape)}")
        value = float(value.detach().cpu())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_noise_options(group: dict) -> None:
    """Validate and normalise a param group's noise options in place (alphas become a tuple)."""
    _finite_number("noise_scale", group["noise_scale"], 0.0)
    _finite_number("noise_loc", group["noise_loc"])
    alphas = group["alphas"]
    if isinstance(alphas, (int, float)) or not hasattr(alphas, "__iter__"):
        raise TypeError(f"alphas must be a sequence of positive numbers, got {alphas!r}")
    alphas = tuple(float(a) for a in alphas)
    if not alphas or any(not math.isfinite(a) or a <= 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty sequence of positive finite numbers, got {alphas}")
    group["alphas"] = alphas
    k_max = group["k_max"]
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be an integer >= 1, got {k_max!r}")
    if group["distribution"] not in noise.DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {noise.DISTRIBUTIONS}, got {group['distribution']!r}")


def check_params(params: list, seen: set) -> None:
    """Reject parameters the fused kernels cannot update; ``seen`` collects ids across groups."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"params of one group must share a device, got {sorted(map(str, devices))}")
    for p in params:
        if id(p) in seen:
            raise ValueError("params: a parameter is listed more than once")
        seen.add(id(p))
        if p.is_sparse:
            raise TypeError("params: sparse parameters are not supported")
        if p.is_complex():
            raise TypeError("params: complex parameters are not supported")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"params: dtype {p.dtype} is not supported (float32, bfloat16, float16)")
        if not p.is_contiguous():
            raise ValueError(f"params: parameters must be contiguous, got strides {p.stride()}")


def resolve_seed(seed: Optional[int]) -> int:
    """A 64-bit seed: the one given, or one drawn from torch's default generator."""
    if seed is None:
        return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) & MASK64
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")
    return seed


def needs_master(p: torch.Tensor) -> bool:
    return p.dtype != torch.float32


class PerturbationMixin:
    """Noise bookkeeping for an optimizer whose ``param_groups`` carry the noise options."""

    def _init_perturbation(self, seed: Optional[int], backend: str) -> None:
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            ops.resolve_backend(backend, device)
        self._backend = backend
        self._seed = resolve_seed(seed)
        self._noise_steps: dict[torch.device, torch.Tensor] = {}
        self._noise_step_start = 1
        self._perturbed = False
        self._launch_caches: dict = {}

    def _param_ids(self) -> dict:
        """The parameters' identities in the noise stream: positions in the optimizer's list."""
        params = [p for group in self.param_groups for p in group["params"]]
        cached = getattr(self, "_param_id_cache", None)
        if cached is None or len(cached) != len(params):
            cached = {p: i for i, p in enumerate(params)}
            self._param_id_cache = cached
        return cached

    def _noise_step(self, device: torch.device) -> torch.Tensor:
        if device not in self._noise_steps:
            start = next(iter(self._noise_steps.values())).to(device) if self._noise_steps else \
                torch.tensor([self._noise_step_start], dtype=torch.int64)
            self._noise_steps[device] = start.to(device)
        return self._noise_steps[device]

    def _advance_noise_step(self) -> None:
        for step in self._noise_steps.values():
            step.add_(1)

    def _buckets(self) -> Iterator[tuple[int, dict, list]]:
        """(group index, group, params) per group, device and dtype: one launch each."""
        for index, group in enumerate(self.param_groups):
            split = defaultdict(list)
            for p in group["params"]:
                split[(p.device, p.dtype)].append(p)
            for params in split.values():
                yield index, group, params

    @torch.no_grad()
    def _launch(self, index: int, group: dict, params: list, grads: list, *, restore: bool,
                apply_offset: int, adam: Optional[dict] = None) -> None:
        """One fused pass over a bucket. ``adam`` holds the AdamW state lists when grads are given."""
        device = params[0].device
        ids = self._param_ids()
        masters = [self.state[p]["master"] for p in params] if needs_master(params[0]) else []
        noise_only = adam is None
        if noise_only:  # no moment is read: placeholders fill the lists
            placeholders = [torch.empty(0, device=device)] * len(params)
            adam = dict(exp_avgs=placeholders, exp_avg_sqs=placeholders, max_exp_avg_sqs=[],
                        steps=placeholders, lr=0.0, beta1=0.0, beta2=0.0, eps=0.0,
                        weight_decay=0.0, amsgrad=False, maximize=False)
        ops.fused_step(
            ops.resolve_backend(self._backend, device), params=params, grads=grads,
            masters=masters, param_ids=[ids[p] for p in params], index_bases=[0] * len(params),
            seed=self._seed, noise_step=self._noise_step(device), noise_loc=group["noise_loc"],
            noise_scale=float(group["noise_scale"]), alphas=group["alphas"], k_max=group["k_max"],
            distribution=group["distribution"], restore=restore, apply_offset=apply_offset,
            cache=self._launch_caches.setdefault((index, device, params[0].dtype, noise_only), {}),
            **adam)

    def _perturb_group(self, index: int) -> None:
        """Write the current perturbation into group ``index`` (a group added while perturbed)."""
        group = self.param_groups[index]
        if self._perturbed and group["noise_scale"] != 0:
            for _, _, params in (b for b in self._buckets() if b[0] == index):
                self._launch(index, group, params, [None] * len(params), restore=False, apply_offset=0)

    def _noise_pass(self, *, restore: bool, apply_offset: int) -> None:
        """Restore and/or write the perturbation of every noisy parameter, without updating."""
        for index, group, params in self._buckets():
            if group["noise_scale"] != 0:
                self._launch(index, group, params, [None] * len(params), restore=restore,
                             apply_offset=apply_offset)

    def _init_masters(self, params: list) -> None:
        for p in params:
            if needs_master(p) and "master" not in self.state[p]:
                self.state[p]["master"] = p.detach().float()

    @contextlib.contextmanager
    def clean_weights(self):
        """Inside, the parameters hold exactly theta_t; the same perturbation returns on exit.

        For evaluating or saving the model mid-training::

            with opt.clean_weights():
                torch.save(model.state_dict(), path)

        Weights written into the parameters inside (e.g. a checkpoint loaded into the model)
        are kept: masters of low-precision parameters take the elements that changed.
        """
        was_perturbed = self._perturbed
        self.remove_perturbation()
        try:
            yield self
        finally:
            self._sync_masters_with_params()
            if was_perturbed:
                self._noise_pass(restore=False, apply_offset=0)
                self._perturbed = True

    @torch.no_grad()
    def _sync_masters_with_params(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                master = self.state[p].get("master")
                if master is not None:
                    changed = master.to(p.dtype) != p
                    master.copy_(torch.where(changed, p.float(), master))

    @torch.no_grad()
    def remove_perturbation(self) -> None:
        """Leave theta_t in the parameters from now on (idempotent); step() resumes training."""
        if self._perturbed:
            self._noise_pass(restore=True, apply_offset=-1)
            self._perturbed = False

    @property
    def seed(self) -> int:
        """The 64-bit seed of the noise stream."""
        return self._seed

    def noise_step(self) -> int:
        """t: the step whose perturbation the parameters hold (reads a device tensor: syncs)."""
        if not self._noise_steps:
            return self._noise_step_start
        return int(next(iter(self._noise_steps.values())).item())

    def _mergopt_state(self) -> dict:
        return {"seed": self._seed, "noise_step": self.noise_step()}

    def _load_mergopt_state(self, saved: dict) -> None:
        if not isinstance(saved, dict) or set(saved) != {"seed", "noise_step"}:
            raise ValueError("state_dict['mergopt'] must hold 'seed' and 'noise_step'")
        self._seed = resolve_seed(saved["seed"])
        step = int(saved["noise_step"])
        self._noise_step_start = step
        for tensor in self._noise_steps.values():
            tensor.fill_(step)
