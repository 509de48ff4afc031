"""FusedMergOptAdamW: MergOPT with AdamW as base, one fused pass per step."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import validation
from . import checkpoint
from .layouts import ZERO3_SLICE, layout_of, local_tensor
from .masters import make_masters
from .noise_options import check_noise_options, noise_options
from .params import check_params, param_list
from .perturbed_optimizer import PerturbedOptimizer


class FusedMergOptAdamW(PerturbedOptimizer):
    """AdamW whose every gradient is taken at ``theta_t + (K_t alpha_t - 1) z_t`` (MergOPT).

    Building the optimizer writes the first perturbation into the parameters, so the first
    forward/backward already sees it. Each ``step()`` is one fused pass per (group, device,
    dtype): regenerate ``z_t`` from the Philox stream and remove it, apply AdamW exactly as
    ``torch.optim.AdamW`` does, write ``theta_{t+1} + s_{t+1} z_{t+1}``. The noise is never
    stored. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (fp32) and, with
    ``amsgrad``, ``max_exp_avg_sq``; bfloat16/float16 parameters also keep ``master``, an fp32
    copy of theta that makes their restore exact (their moments are fp32 too).

    The parameters are the user's: a parameter written from outside since the optimizer last
    wrote it (its version counter changed: ``load_state_dict``, ``copy_``, DCP's
    ``set_state_dict``) holds clean theta, from which no noise is subtracted; writes through
    ``p.data`` or between compiled steps are declared with ``weights_written()``. Parameters
    that do not require grad are never perturbed (read at every step). Moved or cast
    parameters take their state along. See README "The parameters are yours".

    Distributed training: FSDP2-sharded parameters (DTensors placed ``Shard(0)`` or
    ``Replicate()`` on every mesh dimension) are updated shard by shard, each element with the
    noise of its index in the whole parameter, so a sharded run follows the 1-process run.
    When torch.distributed is initialised, building the optimizer is a collective call (every
    rank of the default group must build it) that makes all ranks use one seed.

    DeepSpeed ZeRO (stages 1 to 3, fp32 or bf16): given to ``deepspeed.initialize`` as the
    client optimizer, it updates DeepSpeed's flat fp32 partitions, each element with the noise
    of its (parameter, index), and advances the noise once per engine step; under ZeRO,
    ``clean_weights()``, ``remove_perturbation()`` and ``apply_perturbation()`` are collective
    calls that also write the module's weights. See README "DeepSpeed ZeRO".

    Args:
        params: iterable of parameters (float32, bfloat16, float16; contiguous) or param groups.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW`` (numbers may be
            numpy scalars, flags 0/1); ``lr`` may be a 1-element tensor on the parameters' device.
            Options are checked when a group is added and again at every step, before anything
            is written (a ``param_groups[0]["lr"] = "0.1"`` raises ``TypeError`` there).
        foreach, fused: accepted for ``torch.optim.AdamW`` compatibility (None or a bool, not
            both True); they choose between torch's implementations, and this optimizer always
            runs its own fused multi-tensor pass, so they change nothing.
        capturable: the step never reads lr, the step count or the noise on the host, so it
            can be captured in a CUDA graph whatever the value; True with ``backend="torch"``
            (which reads them on the host) raises ``ValueError``.
        differentiable: only False: True raises ``ValueError`` (the step is an in-place kernel).
        noise_scale: ``b`` of Laplace(loc, b), or the std for ``distribution="gaussian"``;
            0 turns the noise off (per group: e.g. for norms and biases).
        noise_loc: ``mu`` of the noise.
        alphas: merge coefficients ``alpha`` is drawn from, uniformly, once per step.
        k_max: the number of merged models ``K`` is drawn uniformly from ``1..k_max``.
        distribution: ``"laplace"`` or ``"gaussian"``.
        seed: 64-bit seed of the noise stream. None draws one from the operating system's
            entropy (``os.urandom``; rank 0's under torch.distributed), so torch's random streams
            (dropout, shuffling) stay those of an AdamW run with the same ``torch.manual_seed``;
            such a run is reproducible from its saved state (``opt.seed``, ``state_dict()``).
            Pass a seed to make a run reproducible from the start. A given seed must be equal on
            every rank, else ``ValueError``.
        backend: ``"auto"`` (Triton on GPUs; on the CPU the native C++ op when built, else
            torch ops), ``"triton"``, ``"native"``, ``"cuda"`` or ``"torch"`` (see ``ops``).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, *, noise_scale=5e-4, noise_loc=0.0, alphas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
                 k_max=7, distribution="laplace", seed: Optional[int] = None, backend: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, noise_scale=noise_scale,
                        noise_loc=noise_loc, alphas=alphas, k_max=k_max, distribution=distribution)
        if not isinstance(params, torch.Tensor):  # torch raises its own error for a tensor
            params = param_list(params)
        self._seen_params: set = set()
        super().__init__(params, defaults)
        if backend == "torch" and any(group["capturable"] for group in self.param_groups):
            raise ValueError("capturable=True: the 'torch' backend reads lr and the step on the host; "
                             "use backend='auto', 'triton' or 'native'")
        self._start_perturbation(seed, backend)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (checked first); after construction its params get the current noise."""
        group = self._new_group(param_group)
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and group["params"] and lr.device != group["params"][0].device:
            raise ValueError(f"lr: a tensor lr must be on the parameters' device "
                             f"{group['params'][0].device}, got {lr.device}")
        _check_adam_options(group, read_tensor=True)
        check_params(group["params"], set(self._seen_params))
        super().add_param_group(group)
        self._seen_params.update(id(p) for p in group["params"])
        if self._started:
            with torch.no_grad():
                self._perturb_group(len(self.param_groups) - 1)

    def _check_group(self, group: dict) -> None:
        _check_adam_options(group, read_tensor=False)
        check_noise_options(group)

    def _init_state(self, params: list) -> None:
        amsgrad_params = {p for _, g, group_params in self._groups() if g["amsgrad"] for p in group_params}
        for p in params:
            state = self.state[p]
            if "step" in state:
                continue
            like = local_tensor(p) if layout_of(p) is ZERO3_SLICE else p  # ZeRO-3: this rank's slice
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(like, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(like, dtype=torch.float32)
            if p in amsgrad_params:
                state["max_exp_avg_sq"] = torch.zeros_like(like, dtype=torch.float32)
        make_masters(params, self._master_holder)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One MergOPT step. The closure, if given, runs first (at the perturbed weights).

        Per (group, device, dtype) one fused pass: held parameters are restored, AdamW updates
        those with a gradient, noisy ones get the next perturbation. Parameters that hold clean
        theta (written from outside, unfrozen) are not restored, frozen ones not perturbed.
        """
        loss = self._begin_step(closure)
        written: dict[int, dict] = {}  # group index -> the noise options this step applies
        for index, group, group_params in self._step_groups():
            noise = noise_options(group)
            applied = self._ledger.applied.get(index)
            if noise is not None:
                written[index] = noise
            for params in self._group_buckets(group_params):
                self._step_bucket(index, group, params, noise, applied)
        self._end_step(written)
        return loss

    def _step_bucket(self, index: int, group: dict, params: list, noise: Optional[dict],
                     applied: Optional[dict]) -> None:
        """One bucket's step: at most one launch per kind of parameter, (restore, perturb):
        (True, True) held and noisy, (False, True) clean and noisy, (False, False) not noisy."""
        ledger = self._ledger
        held = [ledger.holds(p) for p in params]
        noisy = [noise is not None and p.requires_grad for p in params]
        fused = [h and n and applied == noise for h, n in zip(held, noisy)]
        apart = [p for p, h, f in zip(params, held, fused) if h and not f]
        grads = [p.grad if p.grad is None or p.grad.is_contiguous() else p.grad.contiguous() for p in params]
        beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])  # a tensor beta is read: a host sync
        launches = []  # (params, grads, noise, restore, adam): the plan, made before anything is written
        for restore, perturb in ((True, True), (False, True), (False, False)):
            chosen = [i for i in range(len(params)) if fused[i] == restore and noisy[i] == perturb
                      and (perturb or grads[i] is not None)]
            if not chosen:
                continue
            sub_params, sub_grads = [params[i] for i in chosen], [grads[i] for i in chosen]
            adam = dict(
                exp_avgs=[self.state[p]["exp_avg"] for p in sub_params],
                exp_avg_sqs=[self.state[p]["exp_avg_sq"] for p in sub_params],
                max_exp_avg_sqs=[self.state[p]["max_exp_avg_sq"] for p in sub_params] if group["amsgrad"] else [],
                steps=[self.state[p]["step"] for p in sub_params], lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                maximize=group["maximize"])
            launches.append((sub_params, sub_grads, noise if perturb else None, restore,
                             adam if any(g is not None for g in sub_grads) else None))
        if apart:  # options changed, or no longer noisy: restore with the options that wrote it
            self._launch(index, apart, [None] * len(apart), applied, restore=True, apply_offset=-1)
            ledger.release(apart)
        stepped = [self.state[p]["step"] for p, g in zip(params, grads) if g is not None]
        if stepped:
            torch._foreach_add_(stepped, 1.0)
        for sub_params, sub_grads, sub_noise, restore, adam in launches:
            self._launch(index, sub_params, sub_grads, sub_noise, restore=restore, apply_offset=1, adam=adam)
        # The ledger follows the writes once they all returned.
        ledger.release(params)
        for sub_params, _, sub_noise, _, _ in launches:
            if sub_noise is not None:
                ledger.hold(sub_params)

    def state_dict(self, perturbed: bool = False) -> dict:
        """torch's optimizer state plus ``"mergopt": {"seed", "noise_step"}``.

        The same two numbers are also in every param group (``mergopt_seed``,
        ``mergopt_noise_step``), so ``torch.distributed.checkpoint``'s optimizer state dicts,
        which keep only "state" and "param_groups", carry them too.

        Args:
            perturbed: also keep, in the state of each fp32 parameter that holds the
                perturbation, ``"perturbed"``: the values it holds (one more copy of those
                parameters). Loading such a state dict writes them back, so the run continues
                bit for bit; without them (the default, a clean export) the resumed weights
                agree with the uninterrupted run's up to the rounding of one restore (half an ulp
                of max(|theta|, |s z|) per element, then carried on by training). bf16/fp16
                parameters need nothing more: their fp32 ``master`` is always saved.
        """
        self._catch_up()
        state = super().state_dict()
        if perturbed:
            for position, entry in self._exact_entries(with_masters=False).items():
                state["state"][position] = {**state["state"].get(position, {}), **entry}
        return self._with_mergopt_state(state)

    def _check_migration_source(self, state_dict: dict) -> None:
        """Only AdamW's state is taken: groups with AdamW's options and decoupled weight decay."""
        for index, group in enumerate(state_dict["param_groups"]):
            missing = [k for k in ("lr", "betas", "eps", "weight_decay", "amsgrad") if k not in group]
            if missing:
                raise ValueError(f"state_dict was saved neither by FusedMergOptAdamW nor by torch.optim.AdamW: "
                                 f"param group {index} lacks {missing}")
            if group.get("decoupled_weight_decay") is False and group["weight_decay"] != 0:
                raise ValueError(f"state_dict param group {index} was saved by torch.optim.Adam with L2 weight "
                                 "decay, not AdamW's decoupled weight decay: it cannot be continued as AdamW")

    def _checked_entries(self, state_dict: dict, pairs: list):
        """Every saved entry as fp32 tensors on its parameter's device (moments and masters stay
        fp32 whatever the parameters' dtype), checked (names, shapes) before any is taken."""
        perturbed, saved_state = checkpoint.split_saved_values(state_dict["state"], pairs, "perturbed")
        new_state = {p: checkpoint.fp32_state(saved_state.get(saved_id, {}), p, saved_id) for saved_id, p in pairs}

        def take() -> None:
            torch.optim.Optimizer.load_state_dict(self, {**state_dict, "state": {}})
            for p, entry in new_state.items():
                self.state[p] = entry

        return perturbed, take


def _check_adam_options(group: dict, read_tensor: bool) -> None:
    """Check (and normalise in place) a group's AdamW options; ``read_tensor=False`` at step
    time, where a tensor lr is not read (no host sync)."""
    validation.finite_number("lr", group["lr"], 0.0, read_tensor)
    validation.finite_number("eps", group["eps"], 0.0)
    validation.finite_number("weight_decay", group["weight_decay"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for flag in ("amsgrad", "maximize"):
        validation.check_flag(group, flag)
    for flag in ("foreach", "fused"):
        validation.check_flag(group, flag, allow_none=True)
    validation.check_flag(group, "capturable")
    tensors = [isinstance(beta, torch.Tensor) for beta in betas]
    if any(tensors) and not all(tensors):
        raise ValueError("betas must be either both numbers or both 1-element tensors (as in torch.optim.AdamW)")
    if all(tensors) and group["foreach"] and not group["capturable"]:
        raise ValueError("betas as tensors are not supported with capturable=False and foreach=True "
                         "(as in torch.optim.AdamW)")
    for name, beta in zip(("betas[0]", "betas[1]"), betas):
        validation.finite_number(name, beta, read_tensor=read_tensor)
        if isinstance(beta, torch.Tensor) and not read_tensor:
            continue  # checked when the group was added; not read at step time (no host sync)
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {float(beta)}")
    if group["foreach"] and group["fused"]:
        raise ValueError("foreach and fused cannot both be True (as in torch.optim.AdamW)")
    validation.check_flag(group, "differentiable")
    if group["differentiable"]:
        raise ValueError("differentiable=True is not supported: the step is an in-place fused kernel, "
                         "autograd cannot differentiate through it")
