"""The optimizer under DeepSpeed ZeRO: it updates DeepSpeed's flat partitions.

ZeRO replaces the optimizer's parameters by flat fp32 partitions (``_deepspeed.ZeroLayout``,
the one module that reads DeepSpeed's internals). From then on the optimizer updates those,
each element with the noise of its (parameter, index), and the noise advances once every
partition was stepped (DeepSpeed steps one group or sub-group at a time). ``attach`` hands the
optimizer over, ``finish_load`` and ``after_load`` follow DeepSpeed's checkpoint loads.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Optional

import torch

from . import _deepspeed
from .layouts import index_base, local_tensor
from .launch import KernelTensors
from .masters import master_of


class ZeroAttachment:
    """What the optimizer knows of DeepSpeed's partitions.

    - ``layout``: the partitions and their segments (``_deepspeed.ZeroLayout``);
    - ``group_of``: partition -> the index of the param group its parameters came from;
    - ``noise_ids``: the parameters' noise identities (positions before DeepSpeed took them);
    - ``stepped``: the partitions stepped since t last advanced, ``pending``: the noise
      options those steps wrote;
    - ``state_loaded``: a DeepSpeed checkpoint load gave this optimizer its state (else the load
      rewrote the partitions only); ``clean_after_load``: that state was saved inside
      ``clean_weights()``, so the partitions hold theta until ``apply_perturbation()``.
    """

    def __init__(self, layout: _deepspeed.ZeroLayout, group_of: dict, noise_ids: dict):
        self.layout = layout
        self.group_of = group_of
        self.noise_ids = noise_ids
        self.stepped: set = set()
        self.pending: dict = {}
        self.state_loaded = False
        self.clean_after_load = False

    def groups(self, known_groups: list) -> list[tuple[int, dict, list]]:
        """(index, group, the partitions of the group that this rank updates) for every group."""
        partitions = defaultdict(list)
        for partition in self.layout.partitions:
            partitions[self.group_of[partition]].append(partition)
        return [(index, group, partitions[index]) for index, (group, _) in enumerate(known_groups)]

    def step_groups(self, param_groups: list, known_groups: list) -> list[tuple[int, dict, list]]:
        """The groups of the (sub-)group DeepSpeed hands in now (it puts one at a time into
        ``param_groups``)."""
        index_of = {id(group): index for index, (group, _) in enumerate(known_groups)}
        chosen = []
        for group in param_groups:
            unknown = [p for p in group["params"] if p not in self.group_of]
            if id(group) not in index_of or unknown:
                raise ValueError("DeepSpeed handed this optimizer a param group or tensor that is not one of the "
                                 "partitions it mapped when it was attached to DeepSpeed")
            if any(p in self.stepped for p in group["params"]):
                raise ValueError("DeepSpeed stepped a partition twice before stepping all the others: the noise "
                                 "advances once every partition was stepped (a skipped group is not supported)")
            chosen.append((index_of[id(group)], group, list(group["params"])))
        return chosen

    def end_step(self, groups: list, written: dict) -> Optional[dict]:
        """The (sub-)groups ``groups`` were stepped with the noise options ``written``: the
        options of every partition once all were stepped (t advances then), else None."""
        self.stepped.update(p for _, _, partitions in groups for p in partitions)
        self.pending.update(written)
        if len(self.stepped) < len(self.layout.partitions):
            return None
        written, self.pending, self.stepped = self.pending, {}, set()
        return written

    def kernel_tensors(self, partitions: list, grads: list, adam: Optional[dict],
                       segments: Optional[list] = None) -> Optional[KernelTensors]:
        """Partitions as the kernels' tensors: one view per segment (of the partition, its
        gradient and moments; the step count is the partition's), with the noise identity of
        its parameter and its start index. ``segments`` (one partition's) limits the views."""
        pieces = [(i, segment) for i, partition in enumerate(partitions)
                  for segment in (segments if segments is not None else self.layout.segments[partition])]
        if not pieces:
            return None

        def views(tensors: list) -> list:
            return [None if tensors[i] is None else tensors[i].view(-1).narrow(0, seg.offset, seg.length)
                    for i, seg in pieces]

        if adam is not None:
            adam = dict(adam)
            for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
                adam[name] = views(adam[name]) if adam[name] else []
            adam["steps"] = [adam["steps"][i] for i, _ in pieces]
        return KernelTensors(params=views(partitions), grads=views(grads), masters=[], adam=adam,
                             param_ids=[self.noise_ids[segment.param] for _, segment in pieces],
                             index_bases=[segment.start for _, segment in pieces])

    def saved_state(self, param_groups: list, ledger) -> dict:
        """Which of the partitions now in ``param_groups`` (positions, in the saved state's
        order) hold the perturbation, whether the optimizer was active, the options applied."""
        params = [p for group in param_groups for p in group["params"]]
        return {"held": [i for i, p in enumerate(params) if ledger.holds(p)],
                "active": ledger.active or ledger.cleaning, "applied": dict(ledger.applied)}

    @staticmethod
    def check_saved(noise_state: dict, params: list, group_count: int) -> None:
        """Raise ``ValueError`` unless the state was saved under ZeRO for partitions like
        ``params`` (the partitions being loaded) and ``group_count`` groups."""
        saved = noise_state.get("deepspeed")
        if not isinstance(saved, dict) or set(saved) != {"held", "active", "applied"} or \
                any(not isinstance(i, int) or not 0 <= i < len(params) for i in saved["held"]) or \
                any(not isinstance(i, int) or not 0 <= i < group_count for i in saved["applied"]):
            raise ValueError("state_dict['mergopt'] was not saved under DeepSpeed ZeRO with these param groups: "
                             "its state cannot be mapped onto DeepSpeed's partitions")

    def warn_if_clean_after_load(self, ledger) -> None:
        if self.clean_after_load and not ledger.held():
            warnings.warn("the first step after loading a DeepSpeed checkpoint saved inside clean_weights() ran at "
                          "the clean weights: call opt.apply_perturbation() after engine.load_checkpoint()",
                          stacklevel=4)
        self.clean_after_load = False


def find(opt) -> Optional[ZeroAttachment]:
    """Attach ``opt`` to the DeepSpeed ZeRO optimizer that wraps it, if any (see ``attach``)."""
    owner = _deepspeed.find_owner(opt)
    if owner is None:
        return None
    layout = _deepspeed.layout_of(owner)
    attachment = attach(opt, layout)
    layout.watch_loads(lambda: after_load(opt))
    return attachment


@torch.no_grad()
def attach(opt, layout: _deepspeed.ZeroLayout) -> ZeroAttachment:
    """From now on ``opt`` updates DeepSpeed's partitions instead of the parameters they came from.

    A partition holds what its parameters held when DeepSpeed copied them: theta_t + s_t z_t
    for a perturbed fp32 parameter, else theta_t (bf16/fp16 segments take theta_t from
    their exact fp32 masters). Unless every segment holds the perturbation exactly, the
    perturbed segments are restored, so each partition is either perturbed or clean; a clean
    one is perturbed by the next step (as a parameter written from outside) or
    ``apply_perturbation()``. Nothing is written into the module: it still holds what each
    parameter held. An fp32 parameter that DeepSpeed cast to bf16 (a bf16 config with an fp32
    model) while it held the perturbation starts from bf16(theta + s z) - s z, within a bf16
    rounding of theta, as DeepSpeed's own bf16(theta) is. The parameters' own state is dropped
    (DeepSpeed's partitions replace it), so the optimizer must not have stepped yet."""
    ledger = opt._ledger
    kept = [index for index, (_, params) in enumerate(opt._known_groups) if params]
    known_groups = [opt._known_groups[i] for i in kept]  # DeepSpeed's engine drops empty groups
    origin = [p for _, params in known_groups for p in params]
    group_of_param = {p: index for index, (_, params) in enumerate(known_groups) for p in params}
    for p in origin:
        step = opt.state.get(p, {}).get("step")
        if step is not None and float(step) != 0.0:
            raise ValueError("DeepSpeed took over the parameters of an optimizer that has already stepped: "
                             "build the DeepSpeed engine before the first step()")
    group_of = {}
    for partition in layout.partitions:
        members = layout.members[partition]
        if not members or any(p not in group_of_param for p in members) or \
                len({group_of_param[p] for p in members}) != 1:
            raise ValueError("DeepSpeed partitioned parameters that are not this optimizer's param groups")
        group_of[partition] = group_of_param[members[0]]
    ledger.applied = {kept.index(i): noise for i, noise in ledger.applied.items() if i in kept}
    opt._known_groups = known_groups
    # Parameters written since the optimizer last wrote them (a checkpoint loaded into the
    # model before deepspeed.initialize) hold clean theta, which DeepSpeed copied.
    written = {p for p in origin if opt._writes.was_written(p)}
    was_held = {p for p in ledger.held() if p not in written}
    old_masters = {p: None if p in written else master_of(p, opt._master_holder) for p in origin}
    # fp32 parameters that DeepSpeed cast to bf16/fp16 (its bf16/fp16 configs cast the model)
    # while they held theta + s z: their partitions hold the rounded values, not exact ones.
    cast = {p for p in origin if opt._state_layout.get(p, (None, p.dtype))[1] != p.dtype}
    ledger.release_all()
    for p in origin:
        opt.state.pop(p, None)
        opt.__dict__.get("_masters", {}).pop(p, None)
        opt._state_layout.pop(p, None)
        opt._writes.forget(p)
    attachment = ZeroAttachment(layout, group_of, {p: i for i, p in enumerate(origin)})
    opt._zero = attachment
    opt._make_state(layout.partitions)
    for partition in layout.partitions:
        noise = ledger.applied.get(group_of[partition])
        held = [s for s in layout.segments[partition] if s.param in was_held and old_masters[s.param] is None]
        for segment in layout.segments[partition]:
            master = old_masters[segment.param]
            if master is not None:  # a whole parameter's, or (zero.Init) this rank's slice's
                whole = master.numel() == getattr(segment.param, "ds_numel", master.numel())
                start = segment.start - (0 if whole else index_base(segment.param))
                view = partition.view(-1).narrow(0, segment.offset, segment.length)
                view.copy_(local_tensor(master).reshape(-1).narrow(0, start, segment.length))
        exact = not any(s.param in cast for s in held)
        if noise is not None and ledger.active and exact and len(held) == len(layout.segments[partition]):
            ledger.hold([partition])
        elif held and noise is not None:  # restore the perturbed segments only
            opt._launch(group_of[partition], [partition], [None], noise, restore=True, apply_offset=-1,
                        segments=held)
    opt._record_writes()
    return attachment


def finish_load(opt, noise_state: dict, params: list) -> None:
    """After the state of DeepSpeed's partitions ``params`` (in the saved order) was loaded into
    ``opt``: take the noise state, which partitions held the perturbation when saved and the
    options that wrote it. Nothing is written: DeepSpeed loads the saved partitions after this
    call (``after_load``)."""
    attachment, ledger = opt._zero, opt._ledger
    saved = noise_state["deepspeed"]
    opt._known_groups = [(group, origin) for group, (_, origin) in zip(opt.param_groups, opt._known_groups)]
    opt._load_noise_state(noise_state)
    ledger.release_all()
    ledger.hold(params[i] for i in saved["held"])
    ledger.active = bool(saved["active"]) or bool(saved["held"])
    ledger.applied = dict(saved["applied"])
    attachment.stepped, attachment.pending = set(), {}
    attachment.clean_after_load = ledger.active and not saved["held"]
    attachment.state_loaded = True
    opt._record_writes()


@torch.no_grad()
def after_load(opt) -> None:
    """DeepSpeed has rewritten the partitions from a checkpoint. With the optimizer's state
    (``finish_load``) the held partitions are known; without it (a load of the weights only)
    they all hold theta. The others get the current perturbation, and the partitions are
    written into the module (collective: every rank loads)."""
    attachment, ledger = opt._zero, opt._ledger
    if not attachment.state_loaded:
        ledger.release_all()
    attachment.state_loaded = attachment.clean_after_load = False
    if ledger.active:
        opt._write_pass(apply_offset=0)
    opt._record_writes()
    opt._publish()
