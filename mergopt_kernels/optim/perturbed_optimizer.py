"""PerturbedOptimizer: the base class of FusedMergOptAdamW and MergOpt, the perturbation's life.

The parameters hold ``theta_t + s_t z_t`` between steps (perturbed). The base class composes
named parts, each in its own module:

- ``noise_clock.NoiseClock``: the seed and t, in int64 device tensors;
- ``ledger.Ledger``: which tensors hold which perturbation;
- ``write_tracker.WriteTracker``: which parameters were written from outside (clean theta);
- ``masters``: the exact fp32 theta of low-precision parameters;
- ``layouts``: the tensor layouts (whole, FSDP2 shard, ZeRO-3 slice) and, in ``zero``, DeepSpeed's
  flat partitions;
- ``launch``: one bucket's fused pass on a backend;
- ``checkpoint``: the entries a state dict gains, and their checks.

A subclass fills in ``_init_state(params)`` (masters through ``masters.make_masters``),
``_master_holder(p)``, ``_checked_entries`` (its load), and runs ``step()`` between
``_begin_step(closure)`` and ``_end_step(written)``.
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from typing import Callable, Optional

import torch

from .. import ops
from . import attach as attach_module
from . import checkpoint, layouts, masters, zero
from .launch import launch
from .ledger import Ledger
from .noise_clock import NoiseClock, agree_on_seed, resolve_seed
from .noise_options import check_noise_options, noise_options
from .params import SUPPORTED_DTYPES, param_list
from .write_tracker import WriteTracker


class PerturbedOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose noisy parameters hold the MergOPT perturbation between steps.

    A parameter is *noisy* when its group's ``noise_scale`` is not 0 and it requires grad.
    Building the optimizer writes the first perturbation; ``step()`` restores it, updates theta
    and writes the next; ``clean_weights()``, ``remove_perturbation()`` and
    ``apply_perturbation()`` give explicit control.
    """

    # Whether floating state follows a parameter's dtype when it is cast (torch's rule for a
    # base optimizer's state); FusedMergOptAdamW keeps its moments in fp32.
    _state_follows_dtype = False
    # Whether the fused kernels read the gradients: dense, in their parameter's dtype. False
    # where a base optimizer reads them (MergOpt), which makes its own rules (SGD takes sparse ones).
    _kernels_read_grads = True
    # The attributes beyond torch's (defaults, state, param_groups) that a copy carries.
    _copied_attributes = ("_backend", "_clock", "_ledger", "_writes", "_known_groups", "_state_layout",
                          "_seen_params", "_masters", "base")

    # -- construction and copies ---------------------------------------------------------

    def _start_perturbation(self, seed: Optional[int], backend: str) -> None:
        """End of a subclass's ``__init__``: settle the backend and seed, give every parameter
        its state and write the first perturbation, theta_0 + s_1 z_1."""
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            ops.resolve_backend(backend, device)
        self._backend = backend
        self._zero: Optional[zero.ZeroAttachment] = None
        self._zero_searched: Optional[tuple] = None  # the parameter ids no DeepSpeed owner was found for
        self._ledger = Ledger()
        self._writes = WriteTracker()
        self._state_layout: dict = {}  # parameter -> the (device, dtype) its state was made for
        self._remember_groups()
        self._clock = NoiseClock(agree_on_seed(resolve_seed(seed), seed is not None))
        with torch.no_grad():
            for group in self.param_groups:
                self._make_state(group["params"])
            self._write_pass(apply_offset=0)
        self._ledger.active = True
        self._record_writes()
        self._stamp_param_groups()

    @property
    def _started(self) -> bool:
        return self.__dict__.get("_clock") is not None

    def __getstate__(self) -> dict:
        """torch's ``Optimizer`` state plus the parts and what the subclass keeps (its base
        optimizer, masters): a copy continues bit for bit like the original."""
        if self.__dict__.get("_zero") is not None:
            raise TypeError("the optimizer cannot be copied under DeepSpeed ZeRO (its partitions belong to the "
                            "engine): save it with engine.save_checkpoint()")
        state = super().__getstate__()
        for name in self._copied_attributes:
            if name in self.__dict__:
                state[name] = self.__dict__[name]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict: keep what is attached
        if self._started:
            self.__dict__.setdefault("_zero", None)
            self.__dict__.setdefault("_zero_searched", None)
        if "_seen_params" in self.__dict__:  # ids of the copy's parameters
            self._seen_params = {id(p) for group in self.param_groups for p in group["params"]}

    # -- what a subclass provides --------------------------------------------------------

    def _init_state(self, params: list) -> None:
        raise NotImplementedError("a PerturbedOptimizer subclass provides _init_state(params)")

    def _master_holder(self, p: torch.Tensor) -> dict:
        """The dict whose ``"master"`` entry is ``p``'s fp32 master: its optimizer state."""
        return self.state[p]

    def _check_group(self, group: dict) -> None:
        """Validate a group's options at step time (subclasses add their own)."""
        check_noise_options(group)

    def _checked_entries(self, state_dict: dict, pairs: list) -> tuple[dict, Callable[[], None]]:
        """For ``load_state_dict``: check every saved state entry against its parameter
        (``pairs``: (saved id, parameter)); return the saved perturbed values of fp32
        parameters and a function that takes the state dict in (called once all checks passed)."""
        raise NotImplementedError

    def _check_migration_source(self, state_dict: dict) -> None:
        """Raise ``ValueError`` unless this optimizer can take ``state_dict`` when switched to."""

    def _new_group(self, param_group: dict) -> dict:
        """``param_group`` as a group of this optimizer (defaults filled, noise options checked),
        before anything is added."""
        if self._started and self._zero is not None:
            raise ValueError("add_param_group: DeepSpeed ZeRO has partitioned this optimizer's parameters; "
                             "give every param group to the optimizer before deepspeed.initialize")
        group = dict(param_group)
        group["params"] = param_list(group["params"])
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        check_noise_options(group)
        return group

    # -- groups and the tensors updated ----------------------------------------------------

    def _remember_groups(self) -> None:
        self._known_groups = [(group, list(group["params"])) for group in self.param_groups]

    def _groups(self) -> list[tuple[int, dict, list]]:
        """(index, group, the tensors the optimizer updates for it) for every group: its params,
        or under DeepSpeed ZeRO the partitions of the group that this rank updates."""
        if self.__dict__.get("_zero") is None:
            return [(index, group, group["params"]) for index, group in enumerate(self.param_groups)]
        return self._zero.groups(self._known_groups)

    def _step_groups(self) -> list[tuple[int, dict, list]]:
        """The groups a ``step()`` updates: all of them, or under DeepSpeed ZeRO those of the
        (sub-)group DeepSpeed hands in now."""
        if self._zero is None:
            return self._groups()
        return self._zero.step_groups(self.param_groups, self._known_groups)

    def _all_params(self) -> list:
        return [p for _, _, params in self._groups() for p in params]

    @staticmethod
    def _group_buckets(params: list) -> list[list]:
        """A group's params split by device and dtype: one launch each."""
        split = defaultdict(list)
        for p in params:
            split[(p.device, p.dtype)].append(p)
        return list(split.values())

    def _sync_deepspeed(self) -> None:
        """Notice DeepSpeed ZeRO replacing the parameters by its flat partitions, and from then
        on update those (``zero.find``); follow groups DeepSpeed's engine dropped."""
        if self._zero is not None or "deepspeed" not in sys.modules or torch.compiler.is_compiling():
            return
        current = tuple(id(p) for group in self.param_groups for p in group["params"])
        if current == tuple(id(p) for _, params in self._known_groups for p in params):
            group_ids = [id(group) for group in self.param_groups]
            if group_ids != [id(group) for group, _ in self._known_groups]:  # empty groups dropped in place
                self._ledger.follow_group_indices({id(g): i for i, (g, _) in enumerate(self._known_groups)},
                                                  group_ids)
                self._remember_groups()
            return
        if self._zero_searched != current:
            self._zero = zero.find(self)
            self._zero_searched = current

    # -- the step's frame ------------------------------------------------------------------

    def _begin_step(self, closure: Optional[Callable[[], torch.Tensor]]) -> Optional[torch.Tensor]:
        """What every step does first: run the closure (at the perturbed weights), check every
        group's options (they may change between steps) and follow parameters written, moved
        or cast since the optimizer last wrote them. Raises before anything is written."""
        if self._ledger.clean_blocks:
            raise RuntimeError("step() inside opt.clean_weights(): the parameters hold clean theta there, so "
                               "the gradient was not taken at the perturbed weights; step after the block ends")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_deepspeed()
        if self._zero is not None:
            self._zero.warn_if_clean_after_load(self._ledger)
        for group in self.param_groups:
            self._check_group(group)
        self._follow_params()
        self._check_grads()
        return loss

    def _end_step(self, written: dict) -> None:
        """What every step does last: t advances, the noisy parameters hold the perturbation
        written with the options ``written`` (group index -> options)."""
        self._ledger.active = True
        if self._zero is not None:
            written = self._zero.end_step(self._step_groups(), written)
            if written is None:  # DeepSpeed steps the other (sub-)groups next, with the same t
                self._record_writes()
                return
        self._clock.advance()
        self._ledger.applied = written
        self._record_writes()

    def _check_grads(self) -> None:
        """Raise, before anything is written, on a gradient the step cannot take: of another
        shape or device than its parameter and, where the fused kernels read the gradients,
        sparse or of another dtype (torch's AdamW raises on these at its first tensor op)."""
        for position, p in enumerate(self._all_params()):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse and self._kernels_read_grads:
                raise TypeError(f"{type(self).__name__} does not support sparse gradients (parameter {position})")
            if grad.shape != p.shape:
                raise RuntimeError(f"params: parameter {position} has shape {tuple(p.shape)} but its grad has shape "
                                   f"{tuple(grad.shape)}")
            if grad.device != p.device:
                raise RuntimeError(f"params: parameter {position} is on {p.device} but its grad is on {grad.device}")
            if self._kernels_read_grads and grad.dtype != p.dtype:
                raise RuntimeError(f"params: parameter {position} has dtype {p.dtype} but its grad has dtype "
                                   f"{grad.dtype}; the fused step reads gradients in the parameter's dtype")

    # -- the parameters are the user's -----------------------------------------------------

    def _catch_up(self) -> None:
        """Before an explicit call (not a step): notice DeepSpeed, follow the parameters."""
        self._sync_deepspeed()
        self._follow_params()

    @torch.no_grad()
    def _follow_params(self) -> None:
        """Take what happened to the parameters since the optimizer last wrote them: a parameter
        put into a group by hand gets its state, a moved or cast one has it moved
        (``_relayout``), one written from outside holds clean theta (``_take_written``)."""
        params = self._all_params()
        for p in params:
            made_for = self._state_layout.get(p)
            if made_for is None:  # put into a group by hand: it holds clean theta
                self._make_state([p])
                self._writes.record_one(p)
            elif made_for != (p.device, p.dtype):
                self._relayout(p)
        for p in self._writes.outside_writes(params):
            self._take_written(p)

    def _take_written(self, p: torch.Tensor) -> None:
        """``p`` holds clean theta written from outside: never restore it, resync its master."""
        self._ledger.release([p])
        masters.take_theta(p, self._master_holder)
        self._writes.record_one(p)

    @torch.no_grad()
    def weights_written(self, params=None) -> None:
        """Declare that ``params`` (default: all) hold clean theta written where the optimizer
        cannot see it: through ``p.data`` (which has its own version counter), or between steps
        run under torch.compile. Their values become theta_t; the next ``step()`` applies AdamW
        to them and perturbs them, without subtracting any noise."""
        targets = self._all_params() if params is None else param_list(params)
        known = {id(p) for p in self._all_params()}
        if any(id(p) not in known for p in targets):
            raise ValueError("params: weights_written() takes parameters of this optimizer")
        self._catch_up()
        for p in targets:
            self._take_written(p)

    def _relayout(self, p: torch.Tensor) -> None:
        """``p`` was moved or cast after its state was made: move (and, for a base optimizer's
        state, cast) the state as torch's ``load_state_dict`` does, and keep theta exact."""
        old_device, old_dtype = self._state_layout[p]
        position = next(i for i, q in enumerate(self._all_params()) if q is p)
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"params: parameter {position} was cast to {p.dtype} after the optimizer was "
                            "built; supported dtypes are float32, bfloat16 and float16")
        master = masters.master_of(p, self._master_holder)
        if p.dtype != old_dtype and self._ledger.holds(p) and master is None:
            raise ValueError(
                f"params: parameter {position} was cast from {old_dtype} to {p.dtype} while it held the "
                "perturbation, and an fp32 parameter keeps no exact copy of theta: call "
                "opt.remove_perturbation() before casting the model (or build the optimizer after)")
        state = self.state[p]
        for name, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value is not master:
                follow = self._state_follows_dtype and value.is_floating_point() and name != "step"
                state[name] = value.to(device=p.device, dtype=p.dtype if follow else value.dtype)
        if masters.follow_cast(p, old_dtype, self._master_holder):
            self._ledger.release([p])
        self._state_layout[p] = (p.device, p.dtype)
        self._writes.record_one(p)

    def _record_writes(self) -> None:
        """After the optimizer wrote the parameters: note their version counters."""
        self._writes.record(self._all_params())

    def _make_state(self, params: list) -> None:
        """Give ``params`` their state (``_init_state``) and note the layout it was made for."""
        self._init_state(params)
        for p in params:
            self._state_layout[p] = (p.device, p.dtype)

    def _perturb_group(self, index: int) -> None:
        """Give group ``index``, added after construction, its state, the noise-state keys and
        (while active) the current perturbation."""
        self._make_state(self.param_groups[index]["params"])
        self._remember_groups()
        self._stamp_param_groups()
        if self._ledger.active:
            self._write_pass(apply_offset=0, only_group=index)
        self._record_writes()

    # -- passes ----------------------------------------------------------------------------

    @torch.no_grad()
    def _launch(self, index: int, params: list, grads: list, noise: Optional[dict], *, restore: bool,
                apply_offset: int, adam: Optional[dict] = None, segments: Optional[list] = None) -> None:
        """One fused pass over a bucket of group ``index`` (``launch.launch``), with the
        ``noise`` options (None: noise off). ``adam`` holds the AdamW state lists when grads are
        given; ``segments`` limits a DeepSpeed partition to some of its segments."""
        if self._zero is not None:
            tensors = self._zero.kernel_tensors(params, grads, adam, segments)
        else:
            bucket_masters = [masters.master_of(p, self._master_holder) for p in params] \
                if masters.needs_master(params[0]) else []
            noise_ids = {p: i for i, p in enumerate(self._all_params())}
            tensors = layouts.kernel_tensors(params, grads, bucket_masters, adam, noise_ids)
        if tensors is not None:
            launch(self._backend, self._clock, tensors, noise, restore=restore, apply_offset=apply_offset)

    def _restore_pass(self, groups: Optional[list] = None) -> None:
        """Subtract the perturbation from every held parameter of ``groups`` (default: all, as
        ``_groups()``), with the options that wrote it."""
        ledger = self._ledger
        for index, group, tensors in (self._groups() if groups is None else groups):
            # a partial pass (one DeepSpeed (sub-)group) leaves the options to the others
            noise = ledger.applied.pop(index, None) if groups is None else ledger.applied.get(index)
            if noise is None:
                continue
            for params in self._group_buckets(tensors):
                held = [p for p in params if ledger.holds(p)]
                if held:
                    self._launch(index, held, [None] * len(held), noise, restore=True, apply_offset=-1)
                ledger.release(held)

    def _write_pass(self, *, apply_offset: int, only_group: Optional[int] = None,
                    groups: Optional[list] = None) -> None:
        """Write the perturbation of step t + ``apply_offset`` into every noisy parameter that
        does not hold it, with the options its group's held parameters hold (else the group's).

        ``groups`` (a step's ``_step_groups()``) limits the pass to those tensors and writes
        them with their group's options; the step then records the options (``_end_step``)."""
        ledger = self._ledger
        for index, group, tensors in (self._groups() if groups is None else groups):
            if only_group is not None and index != only_group:
                continue
            noise = noise_options(group) if groups is not None else ledger.applied.get(index) or noise_options(group)
            if noise is None:
                continue
            for params in self._group_buckets(tensors):
                fresh = [p for p in params if p.requires_grad and not ledger.holds(p)]
                if fresh:
                    self._launch(index, fresh, [None] * len(fresh), noise, restore=False,
                                 apply_offset=apply_offset)
                ledger.hold(fresh)
            if groups is None:
                ledger.applied[index] = noise

    # -- explicit control ------------------------------------------------------------------

    def attach(self, model: torch.nn.Module) -> "attach_module.Attachment":
        """Make every ``state_dict()`` of ``model`` (or of a submodule) and every eval-mode
        forward see theta_t, and every training-mode forward theta_t + s_t z_t.

        One call after building the optimizer (in Lightning's ``configure_optimizers``). Hooks
        on every submodule remove the perturbation in place before a state dict is taken or an
        eval-mode forward runs, and write the same perturbation back before the next
        training-mode forward (``optim.attach`` says what they cannot see). The returned
        handle's ``remove()`` takes them off. Copies of the model (deepcopy, pickle) keep hooks
        that do nothing.

        Args:
            model: the ``torch.nn.Module`` (or a wrapper of it: a DeepSpeed engine, an
                FSDP2 module) whose parameters this optimizer updates.
        Raises:
            TypeError: ``model`` is not a module. ValueError: a parameter of this optimizer is
            not one of ``model``'s, or the optimizer is attached to a model already.
        """
        attach_module.check_model(self, model)
        if attach_module.attachment_of(self) is not None:
            raise ValueError("attach(model): this optimizer is attached to a model already; call .remove() on the "
                             "handle attach() returned first")
        self._attachment = attach_module.Attachment(self, model)
        return self._attachment

    @contextlib.contextmanager
    def clean_weights(self):
        """Inside, the parameters hold exactly theta_t; the same perturbation returns on exit.

        For evaluating or saving the model mid-training::

            with opt.clean_weights():
                torch.save(model.state_dict(), path)

        Weights written into the parameters inside (e.g. a checkpoint loaded into the model)
        are kept as the new theta_t (masters of low-precision parameters take them).
        """
        ledger = self._ledger
        was_active = ledger.active
        self.remove_perturbation()
        ledger.cleaning = was_active
        ledger.clean_blocks += 1
        try:
            yield self
        finally:
            ledger.clean_blocks -= 1
            ledger.cleaning = False
            if was_active:
                self.apply_perturbation()

    @torch.no_grad()
    def apply_perturbation(self) -> None:
        """Write the current step's perturbation into the noisy parameters that do not hold it
        (idempotent).

        The inverse of ``remove_perturbation()``: after it, the next forward/backward sees
        theta_t + s_t z_t again. Weights written into the parameters since the optimizer last
        wrote them (a loaded checkpoint) are taken as theta_t. ``step()`` does this by itself, so
        it is only needed to train on from the same step, e.g. after saving clean weights between
        ``remove_perturbation()`` and the next forward (``integrations.hf.MergOptCallback``).

        Under DeepSpeed ZeRO this (like ``remove_perturbation()`` and ``clean_weights()``) also
        writes the partitions into the model's weights: a collective call, made on every rank.
        """
        self._catch_up()
        self._write_pass(apply_offset=0)
        self._ledger.active = True
        self._record_writes()
        self._publish()

    @torch.no_grad()
    def remove_perturbation(self) -> None:
        """Leave theta_t in the parameters from now on (idempotent); step() resumes training."""
        self._catch_up()
        self._restore_pass()
        self._ledger.active = False
        self._record_writes()
        self._publish()

    def _publish(self) -> None:
        """Under DeepSpeed ZeRO, copy the partitions into the model's weights (collective)."""
        if self._zero is not None:
            self._zero.layout.publish()

    @property
    def seed(self) -> int:
        """The 64-bit seed of the noise stream."""
        return self._clock.seed

    def noise_step(self) -> int:
        """t: the step whose perturbation the parameters hold (reads a device tensor: syncs)."""
        return self._clock.value()

    # -- checkpoints -----------------------------------------------------------------------

    def _stamp_param_groups(self) -> dict:
        """Write the noise state into every live param group as ``mergopt_seed`` and
        ``mergopt_noise_step`` (reads the step: syncs) and return it (``checkpoint``)."""
        saved = {"seed": self._clock.seed, "noise_step": self._clock.value()}
        checkpoint.stamp_param_groups(self.param_groups, saved)
        return saved

    def _with_mergopt_state(self, state: dict) -> dict:
        """``state`` (torch's optimizer state dict) plus the noise state (``checkpoint``)."""
        saved = self._stamp_param_groups()
        deepspeed = None if self._zero is None else self._zero.saved_state(self.param_groups, self._ledger)
        return checkpoint.with_noise_state(state, saved, deepspeed)

    def _split_mergopt_state(self, state_dict: dict) -> tuple[dict, dict]:
        """(the noise state, ``state_dict`` without it); checked before anything is modified.

        A state dict without any noise state (saved by the optimizer a run is switched from:
        ``torch.optim.AdamW``, or a ``MergOpt``'s base) is migrated: its groups take this
        optimizer's noise options, the seed and the noise step stay this optimizer's, so the
        parameters hold the current step's perturbation once loaded. Refused under DeepSpeed."""
        owner = type(self).__name__
        noise_state, rest = checkpoint.split_noise_state(state_dict, owner)
        if noise_state is not None:
            return noise_state, rest
        if self._zero is not None:
            raise ValueError(f"state_dict holds no MergOPT noise state: switching to {owner} from another "
                             "optimizer's state is not supported under DeepSpeed ZeRO")
        self._check_migration_source(rest)
        noise_state = {"seed": self._clock.seed, "noise_step": self._clock.value(), "deepspeed": None}
        return noise_state, checkpoint.migrated(rest, self.param_groups)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()``. The parameters hold the clean weights saved
        with it, whether loaded before the optimizer was built or after (the optimizer sees the
        write), or the current perturbed ones (they are restored first).

        A state dict without MergOPT's noise state, saved by the optimizer a running job is
        switched from (``torch.optim.AdamW`` for ``FusedMergOptAdamW``, the base optimizer for
        ``MergOpt``), is taken too: its state and options are loaded, the seed and noise options
        stay this optimizer's, and the parameters hold the current step's perturbation after it.

        Every entry is checked (names, shapes) against its parameter before anything changes.
        """
        self._sync_deepspeed()
        noise_state, state_dict = self._split_mergopt_state(state_dict)
        checkpoint.check_loadable_groups(state_dict["param_groups"], self.param_groups, self._check_group)
        params = [p for g in self.param_groups for p in g["params"]]
        pairs = list(zip([i for g in state_dict["param_groups"] for i in g["params"]], params))
        perturbed, take = self._checked_entries(state_dict, pairs)
        if self._zero is not None:
            self._zero.check_saved(noise_state, params, len(self._known_groups))
        else:
            self.remove_perturbation()
        take()
        if self._zero is not None:
            zero.finish_load(self, noise_state, params)
        else:
            self._finish_load(noise_state, perturbed)

    def _exact_entries(self, with_masters: bool) -> dict:
        """For ``state_dict(perturbed=True)``: position -> {"perturbed": the values a held fp32
        parameter holds} (and, ``with_masters``, {"master": ...} of low-precision ones)."""
        self._catch_up()
        if self._zero is not None:
            raise ValueError("state_dict(perturbed=True) is not available under DeepSpeed ZeRO: "
                             "engine.save_checkpoint() already saves the partitions as they are")
        ledger = self._ledger
        for index, group in enumerate(self.param_groups):
            if any(ledger.holds(p) for p in group["params"]) and ledger.applied.get(index) != noise_options(group):
                raise ValueError(f"state_dict(perturbed=True): the noise options of param group {index} changed "
                                 "since the perturbation was written; save after the next step()")
        entries = {}
        for position, p in enumerate(self._all_params()):
            master = masters.master_of(p, self._master_holder)
            if master is None and ledger.holds(p):
                entries[position] = {"perturbed": p.detach().clone()}
            elif master is not None and with_masters:
                entries[position] = {"master": master.clone()}
        return entries

    def _finish_load(self, noise_state: dict, perturbed: dict) -> None:
        """After the state was loaded into clean parameters: give every parameter its state,
        take the noise state, write the saved ``perturbed`` values back (a bit-exact resume)
        and perturb the other noisy parameters."""
        self._remember_groups()  # torch's load_state_dict made new group dicts
        for group in self.param_groups:
            check_noise_options(group)
            self._make_state(group["params"])
        self._load_noise_state(noise_state)
        for group in self.param_groups:
            for p in group["params"]:
                if p in perturbed and p.requires_grad and noise_options(group) is not None:
                    layouts.local_tensor(p).copy_(layouts.local_tensor(perturbed[p]).to(p.device))
                    self._ledger.hold([p])
        self._write_pass(apply_offset=0)
        self._ledger.active = True
        self._record_writes()
        self._writes.record_loaded(self._all_params())

    def _load_noise_state(self, saved: dict) -> None:
        """Take the noise state that ``_split_mergopt_state`` returned (checked there)."""
        self._clock.set(saved["seed"], int(saved["noise_step"]))
        self._stamp_param_groups()
