"""What FusedMergOptAdamW and MergOpt share: noise options, checks, and the perturbation's life.

The parameters hold ``theta_t + s_t z_t`` between steps (``perturbed``), where ``t`` is the
noise step kept in an int64 device tensor per device, so that no step needs the host to read it.
Low-precision parameters keep ``theta_t`` exactly in an fp32 ``master`` entry of their state.
DTensor parameters (FSDP2) are updated through their local shards, with the index of each
shard's first element in the whole parameter as the kernels' index base. Under DeepSpeed ZeRO
the optimizer updates DeepSpeed's flat partitions instead, each segment of a partition with
its parameter's identity and start index (``_deepspeed``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import warnings
from collections import defaultdict
from typing import Callable, Optional

import numpy
import torch

from .. import noise, ops, validation
from . import _deepspeed

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = None

# FusedStepArgs' noise fields with the noise off (nothing is drawn).
NOISE_OFF = dict(noise_scale=0.0, noise_loc=0.0, alphas=(1.0,), k_max=1, distribution="laplace")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_noise_options(group: dict, params: Optional[list] = None) -> None:
    """Validate and normalise a param group's noise options in place (alphas become a tuple).

    With ``params`` (the group's tensors, default ``group["params"]`` when present), also check
    that the largest perturbation the options can write, ``max|s| * max|z|``, is finite in
    fp32 and in every parameter's dtype, so no perturbation can overflow a parameter."""
    validation.finite_number("noise_scale", group["noise_scale"], 0.0, read_tensor=False)
    validation.finite_number("noise_loc", group["noise_loc"], read_tensor=False)
    for name in ("noise_scale", "noise_loc"):
        if isinstance(group[name], torch.Tensor):
            raise TypeError(f"{name} must be a number (it selects the kernel's code path), not a tensor")
    alphas = group["alphas"]
    if isinstance(alphas, (int, float)) or not hasattr(alphas, "__iter__"):
        raise TypeError(f"alphas must be a sequence of positive numbers, got {alphas!r}")
    alphas = tuple(float(a) for a in alphas)
    if not alphas or any(not math.isfinite(a) or a <= 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty sequence of positive finite numbers, got {alphas}")
    if group["alphas"] != alphas:  # no write when already normal: compiled steps stay one graph
        group["alphas"] = alphas
    k_max = group["k_max"]
    if isinstance(k_max, (bool, numpy.bool_)) or not isinstance(k_max, numbers.Integral) or not 1 <= k_max < 2**32 - 1:
        raise ValueError(f"k_max must be an integer in [1, 2**32 - 1), got {k_max!r}")
    if type(k_max) is not int:
        group["k_max"] = int(k_max)
    if group["distribution"] not in noise.DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {noise.DISTRIBUTIONS}, got {group['distribution']!r}")
    params = group.get("params", ()) if params is None else params
    _check_noise_fits(group, {p.dtype for p in params} | {torch.float32})


def _check_noise_fits(group: dict, dtypes: set) -> None:
    """Raise ``ValueError`` naming ``noise_scale`` when a perturbation of the group's options
    can exceed the largest finite value of one of ``dtypes``."""
    scale = float(group["noise_scale"])
    if scale == 0.0:
        return
    largest = noise.max_abs_perturbation(scale, float(group["noise_loc"]), group["alphas"], group["k_max"],
                                         group["distribution"])
    for dtype in sorted(dtypes, key=lambda d: torch.finfo(d).max):
        if not largest < torch.finfo(dtype).max:
            raise ValueError(f"noise_scale: {scale} (noise_loc {group['noise_loc']}, k_max {group['k_max']}, "
                             f"max alpha {max(group['alphas'])}) gives perturbations up to {largest:.3g}, which "
                             f"{dtype} cannot represent (largest finite value {torch.finfo(dtype).max:.3g})")


NOISE_OPTIONS = ("noise_scale", "noise_loc", "alphas", "k_max", "distribution")


def noise_options(group: dict) -> Optional[dict]:
    """A checked group's noise options as plain values, or None when its noise is off."""
    if float(group["noise_scale"]) == 0.0:
        return None
    options = {k: group[k] for k in NOISE_OPTIONS}
    options["noise_scale"], options["noise_loc"] = float(options["noise_scale"]), float(options["noise_loc"])
    return options


def zero3_slice(p: torch.Tensor) -> Optional[tuple[torch.Tensor, int]]:
    """For a parameter partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` or
    ``deepspeed.initialize``) and not gathered now, (this rank's slice of it without the
    padding, as a 1-D alias; the index of its first element in the whole parameter), else None."""
    if not hasattr(p, "ds_tensor") or p.numel() == getattr(p, "ds_numel", 0):
        return None
    _, start, length = _deepspeed.zero3_range(p)
    return p.ds_tensor.view(-1).narrow(0, 0, length), start


def state_shape(p: torch.Tensor) -> torch.Size:
    """The shape of ``p``'s per-element optimizer state: ``p``'s, or its ZeRO-3 slice's."""
    return local_tensor(p).shape if zero3_slice(p) is not None else p.shape


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` holds only part of its elements here (FSDP2's DTensor, ZeRO-3)."""
    return (_DTensor is not None and isinstance(p, _DTensor)) or zero3_slice(p) is not None


def local_tensor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The local shard of a DTensor or this rank's slice of a ZeRO-3 parameter (aliases:
    writing them writes the parameter), else ``t``."""
    if t is not None and _DTensor is not None and isinstance(t, _DTensor):
        return t.to_local()
    if t is not None and (piece := zero3_slice(t)) is not None:
        return piece[0]
    return t


def _check_placements(p: torch.Tensor) -> None:
    """DTensor parameters must hold a contiguous range of the flattened parameter locally:
    every placement is Replicate or Shard(0) (FSDP2's default), so one index base describes it."""
    if _DTensor is None or not isinstance(p, _DTensor):
        return
    from torch.distributed.tensor import Replicate, Shard

    for placement in p.placements:
        if type(placement) is Replicate or (type(placement) is Shard and placement.dim == 0):
            continue
        raise ValueError(f"params: DTensor placements {tuple(p.placements)} are not supported; "
                         "each mesh dimension must be Replicate() or Shard(0) (FSDP2's default)")


def index_base(p: torch.Tensor) -> int:
    """The index, in the whole flattened parameter, of the first element of ``p``'s local tensor.

    0 for ordinary tensors; for a DTensor sharded on dim 0 (FSDP2), its row offset times the
    row size, so every element draws the noise it would draw in an unsharded run.
    """
    if (piece := zero3_slice(p)) is not None:
        return piece[1]
    if _DTensor is None or not isinstance(p, _DTensor) or p.dim() == 0:
        return 0
    # Public in effect (FSDP2 and DCP use it); present in torch 2.11 to 2.13.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row_offset = int(offset[0])
    return row_offset * math.prod(p.shape[1:])


def param_list(params) -> list:
    """A group's ``params`` as a list: a tensor or an ordered collection of tensors (a set is
    refused, as by torch: its order, hence the noise identities, would vary between runs)."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError("params: parameters must be an ordered collection (list or tuple), not a set")
    return list(params)


def check_params(params: list, seen: set) -> None:
    """Reject parameters the fused kernels cannot update; ``seen`` collects ids across groups."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"params of one group must share a device, got {sorted(map(str, devices))}")
    for p in params:
        if id(p) in seen:
            raise ValueError("params: a parameter is listed more than once")
        seen.add(id(p))
        if p.is_meta:
            raise ValueError("params: a parameter is on the meta device, which holds no values to perturb; "
                             "materialise the model first (module.to_empty(device=...) and load its weights), "
                             "then build the optimizer")
        if p.is_sparse:
            raise TypeError("params: sparse parameters are not supported")
        if p.is_complex():
            raise TypeError("params: complex parameters are not supported")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"params: dtype {p.dtype} is not supported (float32, bfloat16, float16)")
        if not p.is_contiguous() or not local_tensor(p).is_contiguous():
            raise ValueError(f"params: parameters must be contiguous, got strides {p.stride()}")
        _check_placements(p)


def resolve_seed(seed: Optional[int]) -> int:
    """A 64-bit seed: the one given, or (``seed=None``) 8 bytes of ``os.urandom``, so that
    torch's and numpy's random streams are left untouched."""
    seed = validation.check_seed("seed", seed, allow_none=True)
    return int.from_bytes(os.urandom(8), "little") if seed is None else seed


def agree_on_seed(seed: int, given: bool) -> int:
    """The seed every rank uses when torch.distributed is initialised (a collective call).

    A drawn seed (``seed=None``) is rank 0's, broadcast; a given seed must be the same on every
    rank, else every rank raises ``ValueError`` naming ``seed``. Without torch.distributed, or
    with one process, ``seed`` itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return seed
    seeds: list = [None] * dist.get_world_size()
    dist.all_gather_object(seeds, (seed, given))
    given_seeds = {s for s, was_given in seeds if was_given}
    if given_seeds and (len(given_seeds) > 1 or not all(was_given for _, was_given in seeds)):
        raise ValueError("seed must be the same on every rank (or None on every rank, then rank 0's "
                         f"drawn seed is used); got seeds per rank {[s if g else None for s, g in seeds]}")
    return seeds[0][0]


def version_of(p: torch.Tensor):
    """``p``'s version counter, which every in-place write through ``p`` (or a view of it)
    bumps; for a DTensor with its local shard's too (torch.distributed.checkpoint loads write
    the shards)."""
    if _DTensor is not None and isinstance(p, _DTensor):
        return p._version, local_tensor(p)._version
    return p._version


def needs_master(p: torch.Tensor) -> bool:
    """Whether ``p`` keeps an fp32 master copy of theta (bfloat16 and float16 parameters)."""
    return p.dtype != torch.float32


class PerturbationBook:
    """Everything an optimizer knows about the perturbation its parameters hold.

    A parameter is *noisy* when its group's ``noise_scale`` is not 0 and it requires grad;
    the others (frozen ones included) are never perturbed. The rules the mixin keeps:

    - ``active``: the optimizer keeps ``theta_t + s_t z_t`` in its noisy parameters between
      steps (from construction on; False after ``remove_perturbation()`` until the next
      ``step()`` or ``apply_perturbation()``).
    - ``held``: the parameters that hold the perturbation now (keys; empty when not active).
      Only these are ever restored: a parameter written from outside, frozen or unfrozen since
      the last write, or added later, holds clean theta and is never restored.
    - ``applied``: group index -> the noise options that wrote the perturbation its held
      parameters hold; restores use them, so options changed between steps are undone cleanly.
    - ``steps``: device -> int64 tensor [1] holding t, the noise step (``step_start`` until a
      device has one), so that no step reads it on the host.
    - ``written``: parameter -> its version counter (``version_of(p)``) right after the
      optimizer last wrote it. Any other value means something else has written it since:
      it then holds clean theta. ``versions_known`` is False after a step run under
      torch.compile (its graph cannot branch on version counters) until the next eager write.
    - ``loaded``: parameter -> a copy of what ``load_state_dict()`` wrote into it, kept until
      the next check: torch.distributed.checkpoint's ``set_state_dict`` loads the optimizer,
      then copies the model state dict into the parameters, and when that state dict aliases
      them (``get_state_dict``'s does) the copy rewrites the same values: not a new theta.
    - ``layout``: parameter -> the (device, dtype) its state was made for.
    - ``launch_caches``, ``param_ids``, ``index_bases``: caches of the launches, rebuilt when
      a parameter is added, moved or cast.
    - ``known_groups``: (group dict, its parameters) as the optimizer last made them; the
      noise identities of the parameters are their positions in this list.
    - Under DeepSpeed ZeRO (``deepspeed``: the ``ZeroLayout``, None before): the optimizer
      updates DeepSpeed's flat partitions, each element with the noise of its parameter and
      index. ``partition_group``: partition -> its group's index; ``stepped``: the partitions
      stepped since t last advanced (DeepSpeed steps one group or sub-group at a time, t
      advances when all were); ``pending``: the noise options those steps wrote.
    """

    def __init__(self, seed: int, backend: str):
        self.seed = seed
        self.backend = backend
        self.active = False
        self.held: dict = {}
        self.applied: dict[int, dict] = {}
        self.step_start = 1
        self.steps: dict[torch.device, torch.Tensor] = {}
        self.written: dict = {}
        self.versions_known = True
        self.loaded: dict = {}
        self.layout: dict = {}
        self.launch_caches: dict = {}
        self.param_ids: tuple = ((), {})
        self.index_bases: dict = {}
        self.known_groups: list = []
        self.known_ids: tuple = ()
        self.known_group_ids: list = []
        self.state_loaded = False  # a DeepSpeed load called load_state_dict()
        self.deepspeed: Optional[_deepspeed.ZeroLayout] = None
        self.deepspeed_searched: Optional[tuple] = None
        self.partition_group: dict = {}
        self.stepped: set = set()
        self.pending: dict = {}
        self.clean_after_load = False
        self.cleaning = False  # inside clean_weights(), which perturbs again on exit
        self.clean_blocks = 0  # how many clean_weights() blocks are open (step() refuses to run inside)
        self.noise_ids: dict = {}

    def __getstate__(self) -> dict:
        """What a copy (``copy.deepcopy``, pickle, ``torch.save``) keeps: everything but the
        launch caches (they hold addresses) and the version counters (a copy's tensors have
        their own); the parameters written from outside since the optimizer last wrote them
        are kept by name, so the copy treats them as clean theta too."""
        if self.deepspeed is not None:
            raise TypeError("the optimizer cannot be copied under DeepSpeed ZeRO (its partitions belong to the "
                            "engine): save it with engine.save_checkpoint()")
        state = dict(self.__dict__)
        state["written"] = None
        state["written_since"] = [p for p, version in self.written.items() if version != version_of(p)] \
            if self.versions_known else []
        state["launch_caches"], state["param_ids"], state["index_bases"] = {}, ((), {}), {}
        state["deepspeed_searched"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        written_since = set(state.pop("written_since"))
        self.__dict__.update(state)
        # The copy's parameters hold what the originals held: their current versions are the
        # optimizer's writes, except for the parameters written from outside.
        self.written = {p: version_of(p) for p in self.layout if p not in written_since}
        self.known_ids = tuple(id(p) for _, params in self.known_groups for p in params)
        self.known_group_ids = [id(group) for group, _ in self.known_groups]

    def noise_step(self, device: torch.device) -> torch.Tensor:
        """The int64 tensor [1] on ``device`` holding t (made from another device's on first use)."""
        if device not in self.steps:
            start = next(iter(self.steps.values())) if self.steps else \
                torch.tensor([self.step_start], dtype=torch.int64)
            self.steps[device] = start.to(device)
        return self.steps[device]

    def clear_caches(self) -> None:
        """Forget the launch caches (a parameter was added, moved or cast)."""
        self.launch_caches.clear()
        self.param_ids = ((), {})
        self.index_bases.clear()


class PerturbationMixin:
    """The perturbation's life for an optimizer whose ``param_groups`` carry the noise options.

    Contract with a subclass (a ``torch.optim.Optimizer``):
    - it calls ``_start_perturbation(seed, backend)`` at the end of ``__init__``; until then
      ``_started`` is False (torch calls ``add_param_group`` during construction);
    - it provides ``_init_state(params)``, which gives parameters their state (masters through
      ``_init_masters``), and overrides ``_master_holder(p)`` when masters do not live in
      ``self.state[p]``;
    - its ``step()`` starts with ``_begin_step(closure)`` and ends with ``_end_step(written)``.
    The bookkeeping itself is ``self._book`` (a ``PerturbationBook``).
    """

    # Whether floating state follows a parameter's dtype when it is cast (torch's rule for a
    # base optimizer's state); FusedMergOptAdamW keeps its moments in fp32.
    _state_follows_dtype = False
    # Whether the fused kernels read the gradients: dense, in their parameter's dtype. False
    # where a base optimizer reads them (MergOpt), which makes its own rules (SGD takes sparse ones).
    _kernels_read_grads = True

    def __getstate__(self) -> dict:
        """torch's ``Optimizer`` state plus the perturbation's book and what the subclass keeps
        (its base optimizer, masters): a copy continues bit for bit like the original."""
        state = super().__getstate__()
        for name in self._copied_attributes:
            if name in self.__dict__:
                state[name] = self.__dict__[name]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_seen_params" in self.__dict__:  # ids of the copy's parameters
            self._seen_params = {id(p) for group in self.param_groups for p in group["params"]}

    # The attributes beyond torch's (defaults, state, param_groups) that a copy carries.
    _copied_attributes = ("_book", "_seen_params", "_masters", "base")

    @property
    def _started(self) -> bool:
        return self.__dict__.get("_book") is not None

    def _init_state(self, params: list) -> None:
        raise NotImplementedError("a PerturbationMixin subclass provides _init_state(params)")

    def _check_group(self, group: dict) -> None:
        """Validate a group's options at step time (subclasses add their own)."""
        check_noise_options(group)

    def _start_perturbation(self, seed: Optional[int], backend: str) -> None:
        """End of construction: settle the backend and seed, give every parameter its state
        and write the first perturbation, theta_0 + s_1 z_1."""
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            ops.resolve_backend(backend, device)
        self._book = PerturbationBook(agree_on_seed(resolve_seed(seed), seed is not None), backend)
        self._remember_groups()
        with torch.no_grad():
            for group in self.param_groups:
                self._make_state(group["params"])
            self._write_pass(apply_offset=0)
        self._book.active = True
        self._record_writes()
        self._stamp_param_groups()

    def _remember_groups(self) -> None:
        book = self._book
        book.known_groups = [(group, list(group["params"])) for group in self.param_groups]
        book.known_ids = tuple(id(p) for group in self.param_groups for p in group["params"])
        book.known_group_ids = [id(group) for group in self.param_groups]

    def _groups(self) -> list[tuple[int, dict, list]]:
        """(index, group, the tensors the optimizer updates for it) for every group: its params,
        or under DeepSpeed ZeRO the partitions of the group that this rank updates."""
        book = self.__dict__.get("_book")
        if book is None or book.deepspeed is None:
            return [(index, group, group["params"]) for index, group in enumerate(self.param_groups)]
        partitions = defaultdict(list)
        for partition in book.deepspeed.partitions:
            partitions[book.partition_group[partition]].append(partition)
        return [(index, group, partitions[index]) for index, (group, _) in enumerate(book.known_groups)]

    def _step_groups(self) -> list[tuple[int, dict, list]]:
        """The groups a ``step()`` updates: all of them, or under DeepSpeed ZeRO those of the
        (sub-)group DeepSpeed hands in now (it puts one at a time into ``param_groups``)."""
        book = self._book
        if book.deepspeed is None:
            return self._groups()
        index_of = {id(group): index for index, (group, _) in enumerate(book.known_groups)}
        chosen = []
        for group in self.param_groups:
            unknown = [p for p in group["params"] if p not in book.partition_group]
            if id(group) not in index_of or unknown:
                raise ValueError("DeepSpeed handed this optimizer a param group or tensor that is not one of the "
                                 "partitions it mapped when it was attached to DeepSpeed")
            if any(p in book.stepped for p in group["params"]):
                raise ValueError("DeepSpeed stepped a partition twice before stepping all the others: the noise "
                                 "advances once every partition was stepped (a skipped group is not supported)")
            chosen.append((index_of[id(group)], group, list(group["params"])))
        return chosen

    def _all_params(self) -> list:
        return [p for _, _, params in self._groups() for p in params]

    def _sync_deepspeed(self) -> None:
        """Notice DeepSpeed ZeRO replacing the parameters by its flat partitions, and from then
        on update those (``_attach_deepspeed``)."""
        book = self._book
        if book.deepspeed is not None or "deepspeed" not in sys.modules or torch.compiler.is_compiling():
            return
        current = tuple(id(p) for group in self.param_groups for p in group["params"])
        if current == book.known_ids:
            group_ids = [id(group) for group in self.param_groups]
            if group_ids != book.known_group_ids:  # DeepSpeed's engine drops empty groups in place
                self._follow_group_indices(group_ids)
            return
        if book.deepspeed_searched == current:
            return
        owner = _deepspeed.find_owner(self)
        if owner is None:
            book.deepspeed_searched = current
            return
        layout = _deepspeed.layout_of(owner)
        self._attach_deepspeed(layout)
        layout.watch_loads(self._after_deepspeed_load)

    def _follow_group_indices(self, group_ids: list) -> None:
        """The param groups were dropped or reordered (the same dicts, the same parameters):
        the options of the perturbation each holds follow it to its new index."""
        book = self._book
        old = {group_id: index for index, group_id in enumerate(book.known_group_ids)}
        book.applied = {new: book.applied[old[group_id]] for new, group_id in enumerate(group_ids)
                        if old.get(group_id) in book.applied}
        self._remember_groups()
        book.clear_caches()

    def _begin_step(self, closure: Optional[Callable[[], torch.Tensor]]) -> Optional[torch.Tensor]:
        """What every step does first: run the closure (at the perturbed weights), check every
        group's options (they may change between steps) and follow parameters written, moved
        or cast since the optimizer last wrote them. Raises before anything is written."""
        if self._book.clean_blocks:
            raise RuntimeError("step() inside opt.clean_weights(): the parameters hold clean theta there, so "
                               "the gradient was not taken at the perturbed weights; step after the block ends")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_deepspeed()
        book = self._book
        if book.deepspeed is not None and book.clean_after_load and not book.held:
            warnings.warn("the first step after loading a DeepSpeed checkpoint saved inside clean_weights() ran at "
                          "the clean weights: call opt.apply_perturbation() after engine.load_checkpoint()",
                          stacklevel=3)
        book.clean_after_load = False
        for group in self.param_groups:
            self._check_group(group)
        self._follow_params()
        self._check_grads()
        return loss

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

    @torch.no_grad()
    def _follow_params(self) -> None:
        """Take what happened to the parameters since the optimizer last wrote them: a parameter
        put into a group by hand gets its state, a moved or cast one has it moved
        (``_relayout``), one whose version counter changed was written from outside and holds
        clean theta (``_take_written``)."""
        self._sync_deepspeed()
        book = self._book
        check_versions = not torch.compiler.is_compiling() and book.versions_known  # no guard when compiling
        loaded = book.loaded
        if check_versions:
            book.loaded = {}
        for p in self._all_params():
            layout = book.layout.get(p)
            if layout is None:  # put into a group by hand: it holds clean theta
                self._make_state([p])
                book.written[p] = version_of(p)
                book.clear_caches()
            elif layout != (p.device, p.dtype):
                self._relayout(p)
            elif check_versions and book.written.get(p) != version_of(p):
                if p in loaded and torch.equal(local_tensor(p), loaded[p]):
                    book.written[p] = version_of(p)  # rewritten with what load_state_dict wrote
                else:
                    self._take_written(p)

    def _take_written(self, p: torch.Tensor) -> None:
        """``p`` holds clean theta written from outside: never restore it, resync its master."""
        self._book.held.pop(p, None)
        master = self._master_holder(p).get("master")
        if master is not None:
            local_tensor(master).copy_(local_tensor(p))
        self._book.written[p] = version_of(p)

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
        self._follow_params()
        for p in targets:
            self._take_written(p)

    def _relayout(self, p: torch.Tensor) -> None:
        """``p`` was moved or cast after its state was made: move (and, for a base optimizer's
        state, cast) the state as torch's ``load_state_dict`` does, and keep theta exact."""
        book = self._book
        old_device, old_dtype = book.layout[p]
        position = next(i for i, q in enumerate(self._all_params()) if q is p)
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"params: parameter {position} was cast to {p.dtype} after the optimizer was "
                            "built; supported dtypes are float32, bfloat16 and float16")
        holder = self._master_holder(p)
        master = holder.get("master")
        if p.dtype != old_dtype and p in book.held and master is None:
            raise ValueError(
                f"params: parameter {position} was cast from {old_dtype} to {p.dtype} while it held the "
                "perturbation, and an fp32 parameter keeps no exact copy of theta: call "
                "opt.remove_perturbation() before casting the model (or build the optimizer after)")
        state = self.state[p]
        for name, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value is not master:
                follow = self._state_follows_dtype and value.is_floating_point() and name != "step"
                state[name] = value.to(device=p.device, dtype=p.dtype if follow else value.dtype)
        if master is not None:
            master = master.to(p.device)
            if p.dtype != old_dtype:  # theta is exact in the master: the parameter takes it, clean
                local_tensor(p).copy_(local_tensor(master))
                book.held.pop(p, None)
        if needs_master(p):
            holder["master"] = master if master is not None else p.detach().float()
        else:
            holder.pop("master", None)
        book.layout[p] = (p.device, p.dtype)
        book.written[p] = version_of(p)
        book.clear_caches()

    def _record_writes(self) -> None:
        """After the optimizer wrote the parameters: note their version counters (not readable
        as numbers in a compiled step, whose writes leave detection off until the next eager one)."""
        book = self._book
        if torch.compiler.is_compiling():
            book.versions_known = False
            return
        book.written = {p: version_of(p) for p in self._all_params()}
        book.versions_known = True

    def _param_ids(self) -> dict:
        """The parameters' identities in the noise stream: positions in the optimizer's list."""
        params = self._all_params()
        key = tuple(map(id, params))
        if self._book.param_ids[0] != key:
            self._book.param_ids = (key, {p: i for i, p in enumerate(params)})
        return self._book.param_ids[1]

    def _index_base(self, p: torch.Tensor) -> int:
        cache = self._book.index_bases
        if p not in cache:
            cache[p] = index_base(p)
        return cache[p]

    def _end_step(self, written: dict) -> None:
        """What every step does last: t advances, the noisy parameters hold the perturbation
        written with the options ``written`` (group index -> options)."""
        book = self._book
        book.active = True
        if book.deepspeed is not None:
            book.stepped.update(p for _, _, params in self._step_groups() for p in params)
            book.pending.update(written)
            if len(book.stepped) < len(book.deepspeed.partitions):
                self._record_writes()
                return  # DeepSpeed steps the other (sub-)groups next, with the same t
            written, book.pending, book.stepped = book.pending, {}, set()
        for step in book.steps.values():
            step.add_(1)
        book.applied = written
        self._record_writes()

    @staticmethod
    def _group_buckets(params: list) -> list[list]:
        """A group's params split by device and dtype: one launch each."""
        split = defaultdict(list)
        for p in params:
            split[(p.device, p.dtype)].append(p)
        return list(split.values())

    @torch.no_grad()
    def _launch(self, index: int, params: list, grads: list, noise: Optional[dict], *,
                restore: bool, apply_offset: int, adam: Optional[dict] = None) -> None:
        """One fused pass over a bucket of group ``index``, with the ``noise`` options (None:
        noise off). ``adam`` holds the AdamW state lists when grads are given."""
        device = params[0].device
        key = (index, device, params[0].dtype, adam is None, restore, noise is None)
        if self._book.deepspeed is not None:
            key += tuple(map(id, params))  # DeepSpeed hands in one (sub-)group at a time
            params, grads, adam, param_ids, index_bases = self._segment_views(params, grads, adam)
            if not params:
                return
        else:
            ids = self._param_ids()
        masters = [self._master_holder(p)["master"] for p in params] if needs_master(params[0]) else []
        noise_only = adam is None
        if noise_only:  # no moment is read: placeholders fill the lists
            placeholders = [torch.empty(0, device=device)] * len(params)
            adam = dict(exp_avgs=placeholders, exp_avg_sqs=placeholders, max_exp_avg_sqs=[],
                        steps=placeholders, lr=0.0, beta1=0.0, beta2=0.0, eps=0.0,
                        weight_decay=0.0, amsgrad=False, maximize=False)
        if any(is_sharded(p) for p in params):
            # Sharded parameters (FSDP2, ZeRO-3 before DeepSpeed takes the optimizer): update
            # the local shards, each element with the noise of its index in the whole
            # parameter; ranks holding none of its elements skip the parameter.
            index_bases = [self._index_base(p) for p in params]
            keep = [i for i, p in enumerate(params) if local_tensor(p).numel() > 0]
            if not keep:
                return

            def local(tensors: list) -> list:
                return [local_tensor(tensors[i]) for i in keep] if tensors else tensors

            adam = dict(adam)
            for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
                adam[name] = local(adam[name])
            grads = [g if g is None or g.is_contiguous() else g.contiguous() for g in local(grads)]
            params_local, masters = local(params), local(masters)
            param_ids = [ids[params[i]] for i in keep]
            index_bases = [index_bases[i] for i in keep]
            params = params_local
        elif self._book.deepspeed is None:
            param_ids, index_bases = [ids[p] for p in params], [0] * len(params)
        backend = ops.resolve_backend(self._book.backend, device)
        # Only eager Triton launches keep their address tables here (compiled ones keep them in
        # ops.triton_step): no dict grows while compiling, so a compiled step compiles once.
        cache = self._book.launch_caches.setdefault(key, {}) \
            if backend == "triton" and not torch.compiler.is_compiling() else None
        args = ops.FusedStepArgs(
            params=params, grads=grads, masters=masters, param_ids=param_ids, index_bases=index_bases,
            seed=self._book.seed, noise_step=self._book.noise_step(device), restore=restore,
            apply_offset=apply_offset, **(noise or NOISE_OFF), **adam)
        ops.fused_step(backend, args, cache=cache)

    def _segment_views(self, partitions: list, grads: list, adam: Optional[dict]):
        """DeepSpeed partitions as the kernels' tensors: one view per segment (of the partition,
        its gradient and moments; the step count is the partition's), with the noise identity of
        its parameter and its start index. Returns (views, grads, adam, param_ids, index_bases)."""
        book = self._book
        layout = book.deepspeed
        pieces = [(i, segment) for i, partition in enumerate(partitions) for segment in layout.segments[partition]]

        def views(tensors: list) -> list:
            return [None if tensors[i] is None else tensors[i].view(-1).narrow(0, seg.offset, seg.length)
                    for i, seg in pieces]

        params = views(partitions)
        if adam is not None:
            adam = dict(adam)
            for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
                adam[name] = views(adam[name]) if adam[name] else []
            adam["steps"] = [adam["steps"][i] for i, _ in pieces]
        param_ids = [book.noise_ids[segment.param] for _, segment in pieces]
        return params, views(grads), adam, param_ids, [segment.start for _, segment in pieces]

    def _attach_deepspeed(self, layout: "_deepspeed.ZeroLayout") -> None:
        """From now on update DeepSpeed's partitions instead of the parameters they came from.

        A partition holds what its parameters held when DeepSpeed copied them: theta_t + s_t z_t
        for a perturbed fp32 parameter, else theta_t (bf16/fp16 segments take theta_t from
        their exact fp32 masters). Unless every segment holds the perturbation exactly, the
        perturbed segments are restored, so each partition is either perturbed or clean; a clean
        one is perturbed by the next step (as a parameter written from outside) or
        ``apply_perturbation()``. Nothing is written into the module: it still holds what each
        parameter held. An fp32 parameter that DeepSpeed cast to bf16
        (a bf16 config with an fp32 model) while it held the perturbation starts from
        bf16(theta + s z) - s z, within a bf16 rounding of theta, as DeepSpeed's own
        bf16(theta) is. The parameters' own state is dropped (DeepSpeed's partitions
        replace it), so the optimizer must not have stepped yet."""
        book = self._book
        kept = [index for index, (_, params) in enumerate(book.known_groups) if params]
        known_groups = [book.known_groups[i] for i in kept]  # DeepSpeed's engine drops empty groups
        origin = [p for _, params in known_groups for p in params]
        group_of = {p: index for index, (_, params) in enumerate(known_groups) for p in params}
        for p in origin:
            step = self.state.get(p, {}).get("step")
            if step is not None and float(step) != 0.0:
                raise ValueError("DeepSpeed took over the parameters of an optimizer that has already stepped: "
                                 "build the DeepSpeed engine before the first step()")
        partition_group = {}
        for partition in layout.partitions:
            members = layout.members[partition]
            if not members or any(p not in group_of for p in members) or \
                    len({group_of[p] for p in members}) != 1:
                raise ValueError("DeepSpeed partitioned parameters that are not this optimizer's param groups")
            partition_group[partition] = group_of[members[0]]
        book.applied = {kept.index(i): noise for i, noise in book.applied.items() if i in kept}
        book.known_groups = known_groups
        book.noise_ids = {p: i for i, p in enumerate(origin)}
        book.deepspeed, book.partition_group = layout, partition_group
        # Parameters written since the optimizer last wrote them (a checkpoint loaded into the
        # model before deepspeed.initialize) hold clean theta, which DeepSpeed copied.
        written = {p for p in origin if book.versions_known and book.written.get(p) != version_of(p)}
        was_held = {p for p in book.held if p not in written}
        old_masters = {p: None if p in written else self._master_holder(p).get("master") for p in origin}
        # fp32 parameters that DeepSpeed cast to bf16/fp16 (its bf16/fp16 configs cast the model)
        # while they held theta + s z: their partitions hold the rounded values, not exact ones.
        cast = {p for p in origin if book.layout.get(p, (None, p.dtype))[1] != p.dtype}
        book.held = {}
        for p in origin:
            self.state.pop(p, None)
            self.__dict__.get("_masters", {}).pop(p, None)
            book.layout.pop(p, None)
            book.written.pop(p, None)
        book.clear_caches()
        with torch.no_grad():
            self._make_state(layout.partitions)
            for partition in layout.partitions:
                noise = book.applied.get(partition_group[partition])
                held = [s for s in layout.segments[partition] if s.param in was_held and old_masters[s.param] is None]
                for segment in layout.segments[partition]:
                    master = old_masters[segment.param]
                    if master is not None:  # a whole parameter's, or (zero.Init) this rank's slice's
                        whole = master.numel() == getattr(segment.param, "ds_numel", master.numel())
                        start = segment.start - (0 if whole else index_base(segment.param))
                        view = partition.view(-1).narrow(0, segment.offset, segment.length)
                        view.copy_(local_tensor(master).reshape(-1).narrow(0, start, segment.length))
                exact = not any(s.param in cast for s in held)
                if noise is not None and book.active and exact and len(held) == len(layout.segments[partition]):
                    book.held[partition] = True
                elif held and noise is not None:
                    self._restore_segments(partition, held, noise)
        self._record_writes()

    def _restore_segments(self, partition: torch.Tensor, segments: list, noise: dict) -> None:
        """Subtract the perturbation from some segments of a DeepSpeed partition."""
        layout = self._book.deepspeed
        whole = layout.segments[partition]
        layout.segments[partition] = segments
        try:
            self._launch(self._book.partition_group[partition], [partition], [None], noise,
                         restore=True, apply_offset=-1)
        finally:
            layout.segments[partition] = whole

    def _check_can_add_group(self) -> None:
        """``add_param_group`` is refused once DeepSpeed ZeRO partitioned the parameters."""
        if self._started and self._book.deepspeed is not None:
            raise ValueError("add_param_group: DeepSpeed ZeRO has partitioned this optimizer's parameters; "
                             "give every param group to the optimizer before deepspeed.initialize")

    def _perturb_group(self, index: int) -> None:
        """Give group ``index``, added after construction, its state, the noise-state keys and
        (while active) the current perturbation."""
        book = self._book
        self._make_state(self.param_groups[index]["params"])
        self._remember_groups()
        book.clear_caches()
        self._stamp_param_groups()
        if book.active:
            self._write_pass(apply_offset=0, only_group=index)
        self._record_writes()

    def _restore_pass(self, groups: Optional[list] = None) -> None:
        """Subtract the perturbation from every held parameter of ``groups`` (default: all, as
        ``_groups()``), with the options that wrote it."""
        book = self._book
        for index, group, tensors in (self._groups() if groups is None else groups):
            # a partial pass (one DeepSpeed (sub-)group) leaves the options to the others
            noise = book.applied.pop(index, None) if groups is None else book.applied.get(index)
            if noise is None:
                continue
            for params in self._group_buckets(tensors):
                held = [p for p in params if p in book.held]
                if held:
                    self._launch(index, held, [None] * len(held), noise, restore=True, apply_offset=-1)
                for p in held:
                    del book.held[p]

    def _write_pass(self, *, apply_offset: int, only_group: Optional[int] = None,
                    groups: Optional[list] = None) -> None:
        """Write the perturbation of step t + ``apply_offset`` into every noisy parameter that
        does not hold it, with the options its group's held parameters hold (else the group's).

        ``groups`` (a step's ``_step_groups()``) limits the pass to those tensors and writes
        them with their group's options; the step then records the options (``_end_step``)."""
        book = self._book
        for index, group, tensors in (self._groups() if groups is None else groups):
            if only_group is not None and index != only_group:
                continue
            noise = noise_options(group) if groups is not None else book.applied.get(index) or noise_options(group)
            if noise is None:
                continue
            for params in self._group_buckets(tensors):
                fresh = [p for p in params if p.requires_grad and p not in book.held]
                if fresh:
                    self._launch(index, fresh, [None] * len(fresh), noise, restore=False,
                                 apply_offset=apply_offset)
                for p in fresh:
                    book.held[p] = True
            if groups is None:
                book.applied[index] = noise

    def _master_holder(self, p: torch.Tensor) -> dict:
        """The dict whose ``"master"`` entry is ``p``'s fp32 master: its optimizer state."""
        return self.state[p]

    def _init_masters(self, params: list) -> None:
        for p in params:
            if needs_master(p) and "master" not in self._master_holder(p):
                # a ZeRO-3 parameter's master covers this rank's slice only
                source = local_tensor(p) if zero3_slice(p) is not None else p
                self._master_holder(p)["master"] = source.detach().float()

    def _make_state(self, params: list) -> None:
        """Give ``params`` their state (``_init_state``) and note the layout it was made for."""
        self._init_state(params)
        for p in params:
            self._book.layout[p] = (p.device, p.dtype)

    @contextlib.contextmanager
    def clean_weights(self):
        """Inside, the parameters hold exactly theta_t; the same perturbation returns on exit.

        For evaluating or saving the model mid-training::

            with opt.clean_weights():
                torch.save(model.state_dict(), path)

        Weights written into the parameters inside (e.g. a checkpoint loaded into the model)
        are kept as the new theta_t (masters of low-precision parameters take them).
        """
        was_active = self._book.active
        self.remove_perturbation()
        self._book.cleaning = was_active
        self._book.clean_blocks += 1
        try:
            yield self
        finally:
            self._book.clean_blocks -= 1
            self._book.cleaning = False
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
        self._follow_params()
        self._write_pass(apply_offset=0)
        self._book.active = True
        self._record_writes()
        self._publish()

    @torch.no_grad()
    def remove_perturbation(self) -> None:
        """Leave theta_t in the parameters from now on (idempotent); step() resumes training."""
        self._follow_params()
        self._restore_pass()
        self._book.active = False
        self._record_writes()
        self._publish()

    def _publish(self) -> None:
        """Under DeepSpeed ZeRO, copy the partitions into the model's weights (collective)."""
        if self._book.deepspeed is not None:
            self._book.deepspeed.publish()

    @property
    def seed(self) -> int:
        """The 64-bit seed of the noise stream."""
        return self._book.seed

    def noise_step(self) -> int:
        """t: the step whose perturbation the parameters hold (reads a device tensor: syncs)."""
        steps = self._book.steps
        return int(next(iter(steps.values())).item()) if steps else self._book.step_start

    def _mergopt_state(self) -> dict:
        return {"seed": self._book.seed, "noise_step": self.noise_step()}

    def _deepspeed_saved_state(self) -> dict:
        """Under DeepSpeed: which of the partitions now in ``param_groups`` (positions, in the
        saved state's order) hold the perturbation, and whether the optimizer was active."""
        book = self._book
        params = [p for group in self.param_groups for p in group["params"]]
        return {"held": [i for i, p in enumerate(params) if p in book.held], "active": book.active or book.cleaning,
                "applied": dict(book.applied)}

    def _stamp_param_groups(self) -> dict:
        """Write the noise state into every live param group as ``mergopt_seed`` and
        ``mergopt_noise_step`` (reads the step: syncs) and return it.

        torch.distributed.checkpoint rebuilds a flattened optimizer state dict from the keys of
        the live groups, so the keys must be there for the saved values to be loaded back; their
        values are those of the last ``state_dict()``, construction or load.
        """
        saved = self._mergopt_state()
        for group in self.param_groups:
            group["mergopt_seed"], group["mergopt_noise_step"] = saved["seed"], saved["noise_step"]
        return saved

    def _with_mergopt_state(self, state: dict) -> dict:
        """``state`` (torch's optimizer state dict) plus the noise state, twice: as
        ``state["mergopt"]`` and as ``mergopt_seed``/``mergopt_noise_step`` in every saved param
        group, which torch.distributed.checkpoint keeps (it keeps only "state" and
        "param_groups")."""
        saved = self._stamp_param_groups()
        state["param_groups"] = [dict(group, mergopt_seed=saved["seed"], mergopt_noise_step=saved["noise_step"])
                                 for group in state["param_groups"]]
        state["mergopt"] = saved
        if self._book.deepspeed is not None:
            state["mergopt"] = {**saved, "deepspeed": self._deepspeed_saved_state()}
        return state

    def _split_mergopt_state(self, state_dict: dict, owner: str) -> tuple[dict, dict]:
        """(the noise state, ``state_dict`` without it); checked before anything is modified.

        A state dict without any noise state (saved by the optimizer a run is switched from:
        ``torch.optim.AdamW``, or a ``MergOpt``'s base) is migrated (``_migrated``)."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list) or \
                any(not isinstance(g, dict) for g in state_dict["param_groups"]):
            raise ValueError("state_dict must be an optimizer state dict with a list of 'param_groups'")
        groups = state_dict["param_groups"]
        per_group = [(g.get("mergopt_seed"), g.get("mergopt_noise_step")) for g in groups]
        saved = state_dict.get("mergopt")
        if saved is None:
            found = {pair for pair in per_group if pair != (None, None)}
            if not found:
                return self._migrated(state_dict, owner)
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
        rest["param_groups"] = [{k: v for k, v in g.items() if k not in ("mergopt_seed", "mergopt_noise_step")}
                                for g in groups]
        return {"seed": saved["seed"], "noise_step": step, "deepspeed": saved.get("deepspeed")}, rest

    def _migrated(self, state_dict: dict, owner: str) -> tuple[dict, dict]:
        """Switching a running job to MergOPT: ``state_dict`` was saved by the optimizer the run
        used so far (``_check_migration_source`` says which are taken). Its groups take this
        optimizer's noise options; the seed and the noise step stay this optimizer's, so the
        parameters hold the current step's perturbation once loaded. Refused under DeepSpeed."""
        if self._book.deepspeed is not None:
            raise ValueError(f"state_dict holds no MergOPT noise state: switching to {owner} from another "
                             "optimizer's state is not supported under DeepSpeed ZeRO")
        self._check_migration_source(state_dict)
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError("state_dict['param_groups'] does not match this optimizer's param groups "
                             "(number of groups)")
        migrated = [dict(saved, **{k: group[k] for k in NOISE_OPTIONS}) for saved, group in zip(groups, self.param_groups)]
        noise_state = {"seed": self._book.seed, "noise_step": self.noise_step(), "deepspeed": None}
        return noise_state, {**state_dict, "param_groups": migrated}

    def _check_migration_source(self, state_dict: dict) -> None:
        """Raise ``ValueError`` unless this optimizer can take ``state_dict`` when switched to."""

    def _check_deepspeed_state(self, mergopt_state: dict, params: list) -> None:
        """Under DeepSpeed ZeRO, raise ``ValueError`` before anything changes unless the state was
        saved under ZeRO for partitions like ``params`` (the partitions being loaded)."""
        if self._book.deepspeed is None:
            return
        saved = mergopt_state.get("deepspeed")
        if not isinstance(saved, dict) or set(saved) != {"held", "active", "applied"} or \
                any(not isinstance(i, int) or not 0 <= i < len(params) for i in saved["held"]) or \
                any(not isinstance(i, int) or not 0 <= i < len(self._book.known_groups) for i in saved["applied"]):
            raise ValueError("state_dict['mergopt'] was not saved under DeepSpeed ZeRO with these param groups: "
                             "its state cannot be mapped onto DeepSpeed's partitions")

    def _finish_deepspeed_load(self, mergopt_state: dict, params: list) -> None:
        """After the state of DeepSpeed's partitions ``params`` (in the saved order) was loaded:
        take the noise state, which partitions held the perturbation when saved and the options
        that wrote it. Nothing is written: DeepSpeed loads the saved partitions after this call
        (``_after_deepspeed_load``)."""
        book = self._book
        saved = mergopt_state["deepspeed"]
        book.known_groups = [(group, origin) for group, (_, origin) in zip(self.param_groups, book.known_groups)]
        book.known_group_ids = [id(group) for group, _ in book.known_groups]
        self._load_mergopt_state(mergopt_state)
        book.held = {params[i]: True for i in saved["held"]}
        book.active = bool(saved["active"]) or bool(book.held)
        book.applied = dict(saved["applied"])
        book.stepped, book.pending = set(), {}
        book.clean_after_load = book.active and not book.held
        book.state_loaded = True
        book.clear_caches()
        self._record_writes()

    @torch.no_grad()
    def _after_deepspeed_load(self) -> None:
        """DeepSpeed has rewritten the partitions from a checkpoint. With this optimizer's state
        (``_finish_deepspeed_load``) the held partitions are known; without it (a load of the
        weights only) they all hold theta. The others get the current perturbation, and the
        partitions are written into the module (collective: every rank loads)."""
        book = self._book
        if not book.state_loaded:
            book.held = {}
        book.state_loaded = book.clean_after_load = False
        if book.active:
            self._write_pass(apply_offset=0)
        self._record_writes()
        self._publish()

    def _check_loadable_groups(self, saved_groups: list) -> None:
        """Raise ``ValueError``, before anything changes, unless ``saved_groups`` match this
        optimizer's groups (count and sizes) and hold valid options (``_check_group``)."""
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups) or any(
                len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)):
            raise ValueError("state_dict['param_groups'] does not match this optimizer's param groups "
                             "(number of groups or of parameters per group)")
        for saved, group in zip(saved_groups, self.param_groups):
            options = dict(saved, params=group["params"])
            missing = [k for k in NOISE_OPTIONS if k not in options]
            if missing:
                raise ValueError(f"state_dict['param_groups'] entries lack the noise options {missing}")
            self._check_group(options)

    def _exact_entries(self, with_masters: bool) -> dict:
        """For ``state_dict(perturbed=True)``: position -> {"perturbed": the values a held fp32
        parameter holds} (and, ``with_masters``, {"master": ...} of low-precision ones)."""
        book = self._book
        self._follow_params()
        if book.deepspeed is not None:
            raise ValueError("state_dict(perturbed=True) is not available under DeepSpeed ZeRO: "
                             "engine.save_checkpoint() already saves the partitions as they are")
        entries = {}
        for index, group in enumerate(self.param_groups):
            if any(p in book.held for p in group["params"]) and book.applied.get(index) != noise_options(group):
                raise ValueError(f"state_dict(perturbed=True): the noise options of param group {index} changed "
                                 "since the perturbation was written; save after the next step()")
        for position, p in enumerate(self._all_params()):
            master = self._master_holder(p).get("master")
            if master is None and p in book.held:
                entries[position] = {"perturbed": p.detach().clone()}
            elif master is not None and with_masters:
                entries[position] = {"master": master.clone()}
        return entries

    @staticmethod
    def _split_exact_entries(state: dict, params: list, key: str = "perturbed") -> tuple[dict, dict]:
        """(parameter -> the values saved under ``key``, ``state`` without them), checked
        against the (saved id, parameter) pairs ``params`` before anything is modified."""
        perturbed, rest = {}, dict(state)
        for saved_id, p in params:
            entry = state.get(saved_id)
            if entry is None or key not in entry:
                continue
            values = entry[key]
            if not isinstance(values, torch.Tensor) or values.shape != p.shape or values.dtype != p.dtype:
                raise ValueError(f"state_dict['state'][{saved_id!r}][{key!r}] must be a {p.dtype} tensor "
                                 f"of shape {tuple(p.shape)}")
            perturbed[p] = values
            rest[saved_id] = {k: v for k, v in entry.items() if k != key}
        return perturbed, rest

    def _finish_load(self, mergopt_state: dict, perturbed: dict) -> None:
        """After the state was loaded into clean parameters: give every parameter its state,
        take the noise state, write the saved ``perturbed`` values back (a bit-exact resume)
        and perturb the other noisy parameters."""
        book = self._book
        self._remember_groups()  # torch's load_state_dict made new group dicts
        for group in self.param_groups:
            check_noise_options(group)
            self._make_state(group["params"])
        self._load_mergopt_state(mergopt_state)
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p in perturbed and p.requires_grad and noise_options(group) is not None:
                    local_tensor(p).copy_(local_tensor(perturbed[p]).to(p.device))
                    book.held[p] = True
        self._write_pass(apply_offset=0)
        book.active = True
        self._record_writes()
        book.loaded = {p: local_tensor(p).detach().clone() for p in self._all_params()}

    def _load_mergopt_state(self, saved: dict) -> None:
        """Take the noise state that ``_split_mergopt_state`` returned (checked there)."""
        self._book.seed = saved["seed"]
        step = int(saved["noise_step"])
        self._book.step_start = step
        for tensor in self._book.steps.values():
            tensor.fill_(step)
        self._stamp_param_groups()
