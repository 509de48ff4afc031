"""MergOpt: the MergOPT perturbation around any torch optimizer (paper D.2.2 uses SGD)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _perturbation as pt


class MergOpt(pt.PerturbationMixin, torch.optim.Optimizer):
    """Wrap ``base`` so that every gradient is taken at ``theta_t + (K_t alpha_t - 1) z_t``.

    The wrapper shares ``base``'s param groups (the same dicts) and state, so an LR scheduler
    attached to it drives the learning rate ``base`` uses. Each ``step()`` is three passes:
    remove the perturbation (regenerated from the Philox stream, never stored),
    ``base.step()``, write the next perturbation. bfloat16/float16 parameters keep an exact
    fp32 copy of theta for the restore, held by the wrapper (not in ``base``'s state, which
    optimizers such as Adam fill lazily) and rebuilt from the clean parameters on load.

    Args:
        base: a constructed torch optimizer; its groups get the noise options below as defaults.
        noise_scale, noise_loc, alphas, k_max, distribution, seed, backend: as in
            ``FusedMergOptAdamW`` (sharded parameters and the seed under torch.distributed too).
    """

    def __init__(self, base: torch.optim.Optimizer, *, noise_scale=5e-4, noise_loc=0.0,
                 alphas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), k_max=7, distribution="laplace",
                 seed: Optional[int] = None, backend: str = "auto"):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, pt.PerturbationMixin):
            raise TypeError("base already perturbs its parameters; wrap a plain optimizer")
        self.base = base
        noise_defaults = dict(noise_scale=noise_scale, noise_loc=noise_loc, alphas=alphas,
                              k_max=k_max, distribution=distribution)
        checked = []
        seen: set = set()
        for group in base.param_groups:
            options = {k: group.get(k, v) for k, v in noise_defaults.items()}
            pt.check_noise_options(options)
            pt.check_params(group["params"], seen)
            checked.append(options)
        self._ready = False
        # The base's group dicts themselves become this optimizer's groups.
        torch.optim.Optimizer.__init__(self, base.param_groups, {**base.defaults, **noise_defaults})
        for group, options in zip(self.param_groups, checked):
            group.update(options)
        self.state = base.state
        self._masters: dict = {}  # parameter -> {"master": exact fp32 copy of theta}
        self._start_perturbation(seed, backend, self._init_masters)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the base optimizer too (after construction)."""
        if not getattr(self, "_ready", False):
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        group["params"] = pt.param_list(group["params"])
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        pt.check_noise_options(group)
        pt.check_params(group["params"], {id(p) for g in self.param_groups for p in g["params"]})
        self.base.add_param_group(group)
        added = self.base.param_groups[-1]
        self.param_groups.append(added)
        with torch.no_grad():
            self._init_masters(added["params"])
            self._perturb_group(len(self.param_groups) - 1)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """Remove z_t, run ``base.step()``, write z_{t+1}. The closure runs first, perturbed."""
        loss = self._begin_step(closure)
        self.remove_perturbation()
        self.base.step()
        for group in self.param_groups:
            for p in group["params"]:
                if pt.needs_master(p):
                    self._masters[p]["master"].copy_(p)
        self._noise_pass(restore=False, apply_offset=1)
        self._advance_noise_step()
        self._perturbed = True
        return loss

    def _master_holder(self, p: torch.Tensor) -> dict:
        return self._masters.setdefault(p, {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The base optimizer's state plus ``"mergopt": {"seed", "noise_step"}``."""
        return self._with_mergopt_state(self.base.state_dict())

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()`` (see ``FusedMergOptAdamW.load_state_dict``)."""
        mergopt_state, state_dict = self._split_mergopt_state(state_dict, "MergOpt")
        self._check_loadable_groups(state_dict["param_groups"])
        self.remove_perturbation()
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self._masters.clear()  # the parameters hold the clean weights now
        for group in self.param_groups:
            pt.check_noise_options(group)
            self._init_masters(group["params"])
        self._load_mergopt_state(mergopt_state)
        self._noise_pass(restore=False, apply_offset=0)
        self._perturbed = True
