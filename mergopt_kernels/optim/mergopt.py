"""MergOpt: the MergOPT perturbation around any torch optimizer (paper D.2.2 uses SGD)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import checkpoint
from .layouts import local_tensor
from .masters import make_masters
from .noise_options import check_noise_options, noise_options
from .params import check_params
from .perturbed_optimizer import PerturbedOptimizer


class MergOpt(PerturbedOptimizer):
    """Wrap ``base`` so that every gradient is taken at ``theta_t + (K_t alpha_t - 1) z_t``.

    The wrapper shares ``base``'s param groups (the same dicts) and state, so an LR scheduler
    attached to it drives the learning rate ``base`` uses. Each ``step()`` is three passes:
    remove the perturbation (regenerated from the Philox stream, never stored),
    ``base.step()``, write the next perturbation. bfloat16/float16 parameters keep an exact
    fp32 copy of theta for the restore, held by the wrapper (not in ``base``'s state, which
    optimizers such as Adam fill lazily) and rebuilt from the clean parameters on load.

    Outside writes, frozen, moved and cast parameters, FSDP2 and DeepSpeed ZeRO: as in
    ``FusedMergOptAdamW``; the base's state follows a moved or cast parameter as torch's
    ``load_state_dict`` would. Under ZeRO, ``base`` steps DeepSpeed's fp32 partitions.

    Args:
        base: a constructed torch optimizer; its groups get the noise options below as defaults.
        noise_scale, noise_loc, alphas, k_max, distribution, seed, backend: as in
            ``FusedMergOptAdamW`` (sharded parameters and the seed under torch.distributed too).
    """

    _state_follows_dtype = True  # the base's state follows a cast parameter, as in torch
    _kernels_read_grads = False  # the base optimizer reads the gradients

    def __init__(self, base: torch.optim.Optimizer, *, noise_scale=5e-4, noise_loc=0.0,
                 alphas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), k_max=7, distribution="laplace",
                 seed: Optional[int] = None, backend: str = "auto"):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, PerturbedOptimizer):
            raise TypeError("base already perturbs its parameters; wrap a plain optimizer")
        self.base = base
        noise_defaults = dict(noise_scale=noise_scale, noise_loc=noise_loc, alphas=alphas,
                              k_max=k_max, distribution=distribution)
        checked = []
        seen: set = set()
        for group in base.param_groups:
            options = {k: group.get(k, v) for k, v in noise_defaults.items()}
            check_noise_options(options, group["params"])
            check_params(group["params"], seen)
            checked.append(options)
        # The base's group dicts themselves become this optimizer's groups.
        torch.optim.Optimizer.__init__(self, base.param_groups, {**base.defaults, **noise_defaults})
        for group, options in zip(self.param_groups, checked):
            group.update(options)
        self.state = base.state
        self._masters: dict = {}  # parameter -> {"master": exact fp32 copy of theta}
        self._start_perturbation(seed, backend)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the base optimizer too (after construction)."""
        if not self._started:
            super().add_param_group(param_group)
            return
        group = self._new_group(param_group)
        check_params(group["params"], {id(p) for g in self.param_groups for p in g["params"]})
        self.base.add_param_group(group)
        self.param_groups.append(self.base.param_groups[-1])
        with torch.no_grad():
            self._perturb_group(len(self.param_groups) - 1)

    def _init_state(self, params: list) -> None:
        make_masters(params, self._master_holder)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """Remove z_t, run ``base.step()``, write z_{t+1}. The closure runs first, perturbed.

        Parameters that hold clean theta (written from outside, unfrozen) are not restored,
        frozen ones are not perturbed."""
        loss = self._begin_step(closure)
        if self._zero is not None:
            self._deepspeed_step()
            return loss
        applied = dict(self._ledger.applied)
        self._restore_pass()
        try:
            self.base.step()
        except BaseException:
            # The base raised: the perturbation it was given returns (up to the rounding of a
            # restore, for fp32 parameters), so the run can go on as if step() was not called.
            self._ledger.applied = applied
            self._write_pass(apply_offset=0)
            self._record_writes()
            raise
        for p in self._all_params():
            master = self._masters.get(p, {}).get("master")
            if master is not None:
                local_tensor(master).copy_(local_tensor(p))
        self._write_pass(apply_offset=1)
        self._end_step(dict(self._ledger.applied))
        return loss

    def _deepspeed_step(self) -> None:
        """The step of the DeepSpeed (sub-)groups now in ``param_groups`` (fp32 partitions: no
        masters); ``base`` steps only those."""
        groups = self._step_groups()
        self._restore_pass(groups)
        all_groups = self.base.param_groups
        self.base.param_groups = [group for _, group, _ in groups]
        try:
            self.base.step()
        finally:
            self.base.param_groups = all_groups
        self._write_pass(apply_offset=1, groups=groups)
        self._end_step({index: noise_options(group) for index, group, _ in groups
                        if noise_options(group) is not None})

    def _master_holder(self, p: torch.Tensor) -> dict:
        return self._masters.setdefault(p, {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self, perturbed: bool = False) -> dict:
        """The base optimizer's state plus ``"mergopt": {"seed", "noise_step"}``.

        Args:
            perturbed: also keep, in the state of each parameter, what a bit-exact resume
                needs: ``"mergopt_perturbed"`` (the values an fp32 parameter holding the
                perturbation holds) or ``"mergopt_master"`` (a bf16/fp16 parameter's fp32
                master). Without them (the default, a clean export) a resumed run agrees with the
                uninterrupted one up to the rounding of one restore (see ``FusedMergOptAdamW``).
        """
        state = self.base.state_dict()
        if perturbed:
            for position, entry in self._exact_entries(with_masters=True).items():
                state["state"][position] = {**state["state"].get(position, {}),
                                            **{f"mergopt_{k}": v for k, v in entry.items()}}
        return self._with_mergopt_state(state)

    def _checked_entries(self, state_dict: dict, pairs: list):
        """The saved masters and perturbed values split off, the base's entries checked
        (shapes) before any is taken; the base loads the rest."""
        masters, base_state = checkpoint.split_masters(state_dict["state"], pairs, "mergopt_master")
        perturbed, base_state = checkpoint.split_saved_values(base_state, pairs, "mergopt_perturbed")
        checkpoint.check_base_entries(base_state, pairs)

        def take() -> None:
            if self._zero is not None:  # DeepSpeed put the partitions it saves into param_groups, not base's
                self.base.param_groups = self.param_groups
            self.base.load_state_dict({**state_dict, "state": base_state})
            self.param_groups = self.base.param_groups
            self.state = self.base.state
            self._masters = {p: {"master": master} for p, master in masters.items()}

        return perturbed, take
