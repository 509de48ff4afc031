"""``opt.attach(model)``: every state dict and every eval-mode forward of the model sees theta.

Between steps the parameters hold theta_t + s_t z_t. After ``attach`` two kinds of hooks on
every submodule of the model keep what the rest of a training program reads clean, without a
second copy of the weights:

- a state-dict pre-hook: before ``state_dict()`` of the model or of any submodule, the
  perturbation is removed in place (``remove_perturbation()``), so the returned tensors, which
  share memory with the parameters, hold theta_t until the next training-mode forward;
- a forward pre-hook: an eval-mode forward (``module.training`` False) runs on theta_t, a
  training-mode forward on theta_t + s_t z_t, the same perturbation as before (written back by
  ``apply_perturbation()``), as dropout switches with ``train()``/``eval()``.

Each switch costs one noise pass over the parameters; a forward in the mode the weights are
already in costs one Python call per module. Inside ``opt.clean_weights()`` the hooks do
nothing (the block owns the weights). Under DeepSpeed ZeRO a switch is a collective call: every
rank must save or evaluate at the same points, as DeepSpeed's own save does; attach the engine
(``opt.attach(engine)``), whose ZeRO-3 ``save_16bit_model`` gathers the weights without
``state_dict()`` (``_deepspeed.watch_16bit_saves`` removes the perturbation first). The forward
pre-hooks run before the hooks already on a module, so attach after wrapping the model
(``fully_shard``, ``deepspeed.initialize``): FSDP2 and ZeRO-3 then gather the switched weights.

What the hooks cannot see: reads of ``p.data`` or of the parameter tensors themselves (e.g.
``model.parameters()`` copied by hand, ``named_parameters()`` passed to a custom saver),
``torch.func.functional_call`` (it runs the forward with other tensors, the hooks still switch
the module's own ones), and a forward run by a module outside ``model`` that reads its
parameters (tied weights shared with another model).
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch

from . import _deepspeed

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch built without distributed support
    FSDPModule = None


class _SwitchHook:
    """The hook object: holds the optimizer and the model weakly, and is dropped (does nothing)
    when the model is copied or pickled, so that copying a model never copies its optimizer."""

    def __init__(self, opt, model: torch.nn.Module):
        self._opt = weakref.ref(opt)
        self._model = weakref.ref(model)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._opt = self._model = None

    def _optimizer(self):
        return None if self._opt is None else self._opt()

    def before_state_dict(self, module=None, prefix="", keep_vars=False) -> None:
        opt = self._optimizer()
        if opt is not None and opt._ledger.active and not opt._ledger.clean_blocks:
            _switch_outside_compile()(opt, self._model(), perturbed=False)

    def before_forward(self, module, args) -> None:
        opt = self._optimizer()
        if opt is None or opt._ledger.clean_blocks or opt._ledger.active == module.training:
            return
        _switch_outside_compile()(opt, self._model(), perturbed=module.training)


def _switch(opt, model: Optional[torch.nn.Module], perturbed: bool) -> None:
    """Write the perturbation back (``perturbed``) or remove it. FSDP2 modules are resharded
    first: one that stayed unsharded after a no-grad forward (the root does, by default) would
    run its next forward on the gathered copy of the weights before the switch."""
    for module in _fsdp_modules(model):
        module.reshard()
    if perturbed:
        opt.apply_perturbation()
    else:
        opt.remove_perturbation()


def _fsdp_modules(model: Optional[torch.nn.Module]) -> list:
    """The modules of ``model`` that FSDP2's ``fully_shard`` wrapped."""
    if model is None or FSDPModule is None:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@functools.cache
def _switch_outside_compile():
    """``_switch`` as a graph break under torch.compile; made on first use because
    ``torch.compiler.disable`` imports torch._dynamo, which importing this package should not."""
    return torch.compiler.disable(_switch)


class Attachment:
    """What ``opt.attach(model)`` returns: ``remove()`` takes the hooks off again (the weights
    stay as they are; the next ``step()`` perturbs as usual)."""

    def __init__(self, opt, model: torch.nn.Module):
        hook = _SwitchHook(opt, model)
        self._handles = []
        for module in model.modules():
            self._handles.append(module.register_state_dict_pre_hook(hook.before_state_dict))
            # prepend: before FSDP2's or DeepSpeed ZeRO-3's pre-forward hooks gather the
            # parameters the forward runs on, so the gathered copy holds the switched weights
            self._handles.append(module.register_forward_pre_hook(hook.before_forward, prepend=True))
        # ZeRO-3's save_16bit_model gathers the weights without state_dict()
        self._unwatch = _deepspeed.watch_16bit_saves(model, hook.before_state_dict)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None


def attachment_of(opt) -> Optional[Attachment]:
    """The attachment whose hooks are on a model now, made by ``opt.attach``; None if none is."""
    current = opt.__dict__.get("_attachment")
    return current if current is not None and current.attached else None


def check_model(opt, model) -> None:
    """Raise unless ``model`` is a module that holds every parameter ``opt`` was given."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach(model): model must be a torch.nn.Module, got {type(model).__name__}")
    owned = {id(p) for p in model.parameters()}
    # _known_groups: the parameters as given (under DeepSpeed ZeRO param_groups hold its partitions)
    foreign = [i for i, p in enumerate(p for _, params in opt._known_groups for p in params) if id(p) not in owned]
    if foreign:
        raise ValueError(f"attach(model): the optimizer's parameters at positions {foreign[:5]} are not parameters "
                         "of model; attach the module the optimizer was built from")
