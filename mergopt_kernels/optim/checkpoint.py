"""Checkpoint entries: what a MergOPT optimizer adds to torch's optimizer state dict, and the
checks every loaded entry passes before anything is modified.

The noise state (``{"seed", "noise_step"}``) is saved twice: as ``state["mergopt"]`` and as
``mergopt_seed``/``mergopt_noise_step`` in every saved param group, which
torch.distributed.checkpoint keeps (it keeps only "state" and "param_groups"). A state dict
without any noise state was saved by the optimizer a run is switched from (migration).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import validation
from .layouts import state_shape
from .masters import needs_master
from .noise_options import NOISE_OPTIONS

GROUP_KEYS = ("mergopt_seed", "mergopt_noise_step")
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def stamp_param_groups(param_groups: list, saved: dict) -> None:
    """Write the noise state ``saved`` into every live param group.

    torch.distributed.checkpoint rebuilds a flattened optimizer state dict from the keys of the
    live groups, so the keys must be there for the saved values to be loaded back."""
    for group in param_groups:
        group["mergopt_seed"], group["mergopt_noise_step"] = saved["seed"], saved["noise_step"]


def with_noise_state(state: dict, saved: dict, deepspeed: Optional[dict] = None) -> dict:
    """``state`` (torch's optimizer state dict) plus the noise state ``saved``, twice (see the
    module), and under DeepSpeed ZeRO which partitions held the perturbation (``deepspeed``)."""
    state["param_groups"] = [dict(group, mergopt_seed=saved["seed"], mergopt_noise_step=saved["noise_step"])
                             for group in state["param_groups"]]
    state["mergopt"] = saved if deepspeed is None else {**saved, "deepspeed": deepspeed}
    return state


def split_noise_state(state_dict: dict, owner: str) -> tuple[Optional[dict], dict]:
    """(the checked noise state ``{"seed", "noise_step", "deepspeed"}``, or None when the state
    dict holds none; ``state_dict`` without it). Raises ``ValueError`` on a malformed one."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list) or \
            any(not isinstance(g, dict) for g in state_dict["param_groups"]):
        raise ValueError("state_dict must be an optimizer state dict with a list of 'param_groups'")
    groups = state_dict["param_groups"]
    per_group = [(g.get("mergopt_seed"), g.get("mergopt_noise_step")) for g in groups]
    saved = state_dict.get("mergopt")
    if saved is None:
        found = {pair for pair in per_group if pair != (None, None)}
        if not found:
            return None, state_dict
        if len(found) != 1 or (None, None) in per_group:
            raise ValueError(f"state_dict has no 'mergopt' entry, and its param_groups do not all hold one "
                             f"seed and noise step: it was not saved whole by {owner}")
        seed, step = found.pop()
        saved = {"seed": seed, "noise_step": step}
    if not isinstance(saved, dict) or set(saved) - {"deepspeed"} != {"seed", "noise_step"}:
        raise ValueError("state_dict['mergopt'] must hold 'seed' and 'noise_step'")
    validation.check_seed("state_dict['mergopt']['seed']", saved["seed"])
    step = saved["noise_step"]
    if isinstance(step, torch.Tensor):
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32 - 1:
        raise ValueError("state_dict['mergopt']['noise_step'] must be an integer in [0, 2**32 - 1) "
                         f"(the stream's step is 32 bits), got {step!r}")
    rest = {k: v for k, v in state_dict.items() if k != "mergopt"}
    rest["param_groups"] = [{k: v for k, v in g.items() if k not in GROUP_KEYS} for g in groups]
    return {"seed": saved["seed"], "noise_step": step, "deepspeed": saved.get("deepspeed")}, rest


def migrated(state_dict: dict, param_groups: list) -> dict:
    """``state_dict`` of the optimizer a run is switched from, its groups given the noise
    options of ``param_groups`` (the optimizer switched to)."""
    groups = state_dict["param_groups"]
    if len(groups) != len(param_groups):
        raise ValueError("state_dict['param_groups'] does not match this optimizer's param groups "
                         "(number of groups)")
    return {**state_dict, "param_groups": [dict(saved, **{k: group[k] for k in NOISE_OPTIONS})
                                           for saved, group in zip(groups, param_groups)]}


def check_loadable_groups(saved_groups: list, param_groups: list, check_group: Callable[[dict], None]) -> None:
    """Raise ``ValueError`` unless ``saved_groups`` match ``param_groups`` (count and sizes)
    and hold valid options (``check_group``)."""
    if not isinstance(saved_groups, list) or len(saved_groups) != len(param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, param_groups)):
        raise ValueError("state_dict['param_groups'] does not match this optimizer's param groups "
                         "(number of groups or of parameters per group)")
    for saved, group in zip(saved_groups, param_groups):
        options = dict(saved, params=group["params"])
        missing = [k for k in NOISE_OPTIONS if k not in options]
        if missing:
            raise ValueError(f"state_dict['param_groups'] entries lack the noise options {missing}")
        check_group(options)


def _split_entries(state: dict, pairs: list, key: str, take) -> tuple[dict, dict]:
    """(parameter -> ``take(saved_id, p, value)`` of the value saved under ``key``, ``state``
    without those values), over the (saved id, parameter) ``pairs``; ``take`` checks and converts."""
    taken, rest = {}, dict(state)
    for saved_id, p in pairs:
        entry = state.get(saved_id)
        if not isinstance(entry, dict) or key not in entry:
            continue
        taken[p] = take(saved_id, p, entry[key])
        rest[saved_id] = {k: v for k, v in entry.items() if k != key}
    return taken, rest


def split_saved_values(state: dict, pairs: list, key: str) -> tuple[dict, dict]:
    """(parameter -> the values saved under ``key``, ``state`` without them), checked against
    the (saved id, parameter) ``pairs``: each must be a tensor of its parameter's dtype and shape."""
    def take(saved_id, p, values):
        if not isinstance(values, torch.Tensor) or values.shape != p.shape or values.dtype != p.dtype:
            raise ValueError(f"state_dict['state'][{saved_id!r}][{key!r}] must be a {p.dtype} tensor "
                             f"of shape {tuple(p.shape)}")
        return values
    return _split_entries(state, pairs, key, take)


def split_masters(state: dict, pairs: list, key: str) -> tuple[dict, dict]:
    """(parameter -> saved fp32 master under ``key`` on its device, ``state`` without them)."""
    def take(saved_id, p, master):
        if not isinstance(master, torch.Tensor) or master.shape != p.shape or not needs_master(p):
            raise ValueError(f"state_dict['state'][{saved_id!r}][{key!r}] must be a tensor of shape "
                             f"{tuple(p.shape)} for a bfloat16/float16 parameter")
        return master.to(device=p.device, dtype=torch.float32, copy=True)
    return _split_entries(state, pairs, key, take)


def fp32_state(entry: dict, p: torch.Tensor, saved_id) -> dict:
    """A saved AdamW state entry as fp32 tensors on ``p``'s device (numbers, e.g. a float step,
    too), after checking it: a 1-element ``step``, a ``master`` and moments of ``p``'s state
    shape (``state_shape``), nothing else."""
    where = f"state_dict['state'][{saved_id!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
    unknown = set(entry) - {"step", "master", *MOMENTS}
    if unknown:
        raise ValueError(f"{where} has entries {sorted(map(str, unknown))}; expected 'step', 'master' and {MOMENTS}")
    shape = state_shape(p)
    converted = {}
    for name, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
            raise ValueError(f"{where}[{name!r}] must be a tensor or a number, got {type(value).__name__}")
        if name == "step" and isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(f"{where}['step'] must hold one number, got shape {tuple(value.shape)}")
        if name != "step" and (not isinstance(value, torch.Tensor) or value.shape != shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{where}[{name!r}] must be a tensor of the parameter's shape {tuple(shape)}, got {got}")
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            raise ValueError(f"{where}[{name!r}] must be a floating-point tensor, got {value.dtype}")
        converted[name] = torch.as_tensor(value).to(device=p.device, dtype=torch.float32, copy=True)
        if name == "step":
            converted[name] = converted[name].reshape(())
    return converted


def check_base_entries(state: dict, pairs: list) -> None:
    """Raise ``ValueError`` when a saved entry of a base optimizer is not a dict, or a saved
    tensor of more than one element does not have its parameter's state shape (torch's
    optimizers keep per-element state shaped like the parameter, and scalars such as ``step``)."""
    for saved_id, p in pairs:
        entry = state.get(saved_id, {})
        if not isinstance(entry, dict):
            raise ValueError(f"state_dict['state'][{saved_id!r}] must be a dict, got {type(entry).__name__}")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1 and value.shape != state_shape(p):
                raise ValueError(f"state_dict['state'][{saved_id!r}][{name!r}] has shape {tuple(value.shape)}, "
                                 f"but its parameter's state has shape {tuple(state_shape(p))}")
