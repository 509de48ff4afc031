"""FusedMergOptAdamW: MergOPT with AdamW as base, one fused pass per step."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _perturbation as pt


class FusedMergOptAdamW(pt.PerturbationMixin, torch.optim.Optimizer):
    """AdamW whose every gradient is taken at ``theta_t + (K_t alpha_t - 1) z_t`` (MergOPT).

    Building the optimizer writes the first perturbation into the parameters, so the first
    forward/backward already sees it. Each ``step()`` is one fused pass per (group, device,
    dtype): regenerate ``z_t`` from the Philox stream and remove it, apply AdamW exactly as
    ``torch.optim.AdamW`` does, write ``theta_{t+1} + s_{t+1} z_{t+1}``. The noise is never
    stored. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (fp32) and, with
    ``amsgrad``, ``max_exp_avg_sq``; bfloat16/float16 parameters also keep ``master``, an fp32
    copy of theta that makes their restore exact (their moments are fp32 too).

    Distributed training: FSDP2-sharded parameters (DTensors placed ``Shard(0)`` or
    ``Replicate()`` on every mesh dimension) are updated shard by shard, each element with the
    noise of its index in the whole parameter, so a sharded run follows the 1-process run.
    When torch.distributed is initialised, building the optimizer is a collective call (every
    rank of the default group must build it) that makes all ranks use one seed.

    Args:
        params: iterable of parameters (float32, bfloat16, float16; contiguous) or param groups.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``; ``lr`` may be
            a 1-element tensor on the parameters' device.
        noise_scale: ``b`` of Laplace(loc, b), or the std for ``distribution="gaussian"``;
            0 turns the noise off (per group: e.g. for norms and biases).
        noise_loc: ``mu`` of the noise.
        alphas: merge coefficients ``alpha`` is drawn from, uniformly, once per step.
        k_max: the number of merged models ``K`` is drawn uniformly from ``1..k_max``.
        distribution: ``"laplace"`` or ``"gaussian"``.
        seed: 64-bit seed of the noise stream; None draws one from torch's default generator
            (rank 0's under torch.distributed). A given seed must be equal on every rank, else
            ``ValueError``.
        backend: ``"auto"`` (Triton on GPUs; on the CPU the native C++ op when built, else
            torch ops), ``"triton"``, ``"native"``, ``"cuda"`` or ``"torch"`` (see ``ops``).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, *, noise_scale=5e-4, noise_loc=0.0,
                 alphas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), k_max=7, distribution="laplace",
                 seed: Optional[int] = None, backend: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, noise_scale=noise_scale, noise_loc=noise_loc,
                        alphas=alphas, k_max=k_max, distribution=distribution)
        self._seen_params: set = set()
        self._ready = False
        super().__init__(params, defaults)
        self._start_perturbation(seed, backend, self._init_state)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (checked first); after construction its params get the current noise."""
        group = dict(param_group)
        group["params"] = pt.param_list(group["params"])
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and group["params"] and lr.device != group["params"][0].device:
            raise ValueError(f"lr: a tensor lr must be on the parameters' device "
                             f"{group['params'][0].device}, got {lr.device}")
        _check_adam_options(group)
        pt.check_noise_options(group)
        pt.check_params(group["params"], set(self._seen_params))
        super().add_param_group(group)
        self._seen_params.update(id(p) for p in group["params"])
        if self._ready:
            with torch.no_grad():
                self._init_state(group["params"])
                self._perturb_group(len(self.param_groups) - 1)

    def _init_state(self, params: list) -> None:
        amsgrad_params = {p for g in self.param_groups if g["amsgrad"] for p in g["params"]}
        for p in params:
            state = self.state[p]
            if "step" in state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if p in amsgrad_params:
                state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        self._init_masters(params)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One MergOPT step. The closure, if given, runs first (at the perturbed weights)."""
        loss = self._begin_step(closure)
        buckets = list(self._buckets())
        for _, _, params in buckets:
            for p in params:
                if p.grad is not None and p.grad.is_sparse:
                    raise TypeError("FusedMergOptAdamW does not support sparse gradients")
        written: dict[int, dict] = {}  # group index -> the noise options this step applies
        for index, group, params in buckets:
            grads = [p.grad if p.grad is None or p.grad.is_contiguous() else p.grad.contiguous()
                     for p in params]
            applied = self._applied_noise.get(index) if self._perturbed else None
            noise = pt.noise_options(group)
            if noise is not None:
                written[index] = noise
            if applied is not None and applied != noise:  # options changed since: restore apart
                self._launch(index, params, [None] * len(params), applied, restore=True, apply_offset=-1)
            if noise is None:
                params, grads = _with_grads(params, grads)
                if not params:
                    continue
            stepped = [self.state[p]["step"] for p, g in zip(params, grads) if g is not None]
            if stepped:
                torch._foreach_add_(stepped, 1.0)
            with_grad = [g is not None for g in grads]
            adam = dict(
                exp_avgs=[self.state[p]["exp_avg"] for p in params],
                exp_avg_sqs=[self.state[p]["exp_avg_sq"] for p in params],
                max_exp_avg_sqs=[self.state[p]["max_exp_avg_sq"] for p in params] if group["amsgrad"] else [],
                steps=[self.state[p]["step"] for p in params], lr=group["lr"],
                beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                maximize=group["maximize"])
            self._launch(index, params, grads, noise, restore=applied is not None and applied == noise,
                         apply_offset=1, adam=adam if any(with_grad) else None)
        self._advance_noise_step()
        self._perturbed = True
        self._applied_noise = written
        return loss

    def state_dict(self) -> dict:
        """torch's optimizer state plus ``"mergopt": {"seed", "noise_step"}``.

        The same two numbers are also in every param group (``mergopt_seed``,
        ``mergopt_noise_step``), so ``torch.distributed.checkpoint``'s optimizer state dicts,
        which keep only "state" and "param_groups", carry them too.
        """
        return self._with_mergopt_state(super().state_dict())

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()``; the parameters must hold the clean weights
        that were saved with it (or the current perturbed ones: they are restored first).

        Moments and masters stay fp32 whatever the parameters' dtype.
        """
        mergopt_state, state_dict = self._split_mergopt_state(state_dict, "FusedMergOptAdamW")
        self._check_loadable_groups(state_dict["param_groups"], _check_adam_options)
        # Converted before anything changes: a bad entry raises with the optimizer untouched.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        new_state = {p: _fp32_state(state_dict["state"].get(saved_id, {}), p) for saved_id, p in zip(saved_ids, params)}
        self.remove_perturbation()
        without_state = {k: v for k, v in state_dict.items() if k != "state"}
        super().load_state_dict({**without_state, "state": {}})
        for p, entry in new_state.items():
            self.state[p] = entry
        for group in self.param_groups:
            pt.check_noise_options(group)
            self._init_state(group["params"])
        self._load_mergopt_state(mergopt_state)
        self._noise_pass(restore=False, apply_offset=0)
        self._perturbed = True


def _fp32_state(entry: dict, p: torch.Tensor) -> dict:
    """A saved state entry as fp32 tensors on ``p``'s device (numbers, e.g. a float step, too)."""
    converted = {}
    for name, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
            raise ValueError(f"state_dict['state'] entry {name!r} must be a tensor or a number, "
                             f"got {type(value).__name__}")
        converted[name] = torch.as_tensor(value).to(device=p.device, dtype=torch.float32, copy=True)
    return converted


def _with_grads(params: list, grads: list) -> tuple[list, list]:
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    return [p for p, _ in pairs], [g for _, g in pairs]


def _check_adam_options(group: dict) -> None:
    pt._finite_number("lr", group["lr"], 0.0)
    pt._finite_number("eps", group["eps"], 0.0)
    pt._finite_number("weight_decay", group["weight_decay"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for name, beta in zip(("betas[0]", "betas[1]"), betas):
        pt._finite_number(name, beta)
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    for flag in ("amsgrad", "maximize"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {group[flag]!r}")
