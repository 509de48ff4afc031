"""What FusedMergOptAdamW and MergOpt share: noise options, checks, and the perturbation's life.

The parameters hold ``theta_t + s_t z_t`` between steps (``perturbed``), where ``t`` is the
noise step kept in an int64 device tensor per device, so that no step needs the host to read it.
Low-precision parameters keep ``theta_t`` exactly in an fp32 ``master`` entry of their state.
DTensor parameters (FSDP2) are updated through their local shards, with the index of each
shard's first element in the whole parameter as the kernels' index base.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Callable, Iterator, Optional

import torch

from .. import noise, ops

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = None

# ops.fused_step's noise arguments with the noise off (nothing is drawn).
NOISE_OFF = dict(noise_scale=0.0, noise_loc=0.0, alphas=(1.0,), k_max=1, distribution="laplace")
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
    if group["alphas"] != alphas:  # no write when already normal: compiled steps stay one graph
        group["alphas"] = alphas
    k_max = group["k_max"]
    if isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max < 2**32 - 1:
        raise ValueError(f"k_max must be an integer in [1, 2**32 - 1), got {k_max!r}")
    if group["distribution"] not in noise.DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {noise.DISTRIBUTIONS}, got {group['distribution']!r}")


NOISE_OPTIONS = ("noise_scale", "noise_loc", "alphas", "k_max", "distribution")


def noise_options(group: dict) -> Optional[dict]:
    """A checked group's noise options as plain values, or None when its noise is off."""
    if float(group["noise_scale"]) == 0.0:
        return None
    options = {k: group[k] for k in NOISE_OPTIONS}
    options["noise_scale"], options["noise_loc"] = float(options["noise_scale"]), float(options["noise_loc"])
    return options


def local_tensor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The local shard of a DTensor (an alias: writing it writes the parameter), else ``t``."""
    if t is not None and _DTensor is not None and isinstance(t, _DTensor):
        return t.to_local()
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
    """A 64-bit seed: the one given, or one drawn from torch's default generator."""
    if seed is None:
        return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) & MASK64
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")
    return seed


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


def needs_master(p: torch.Tensor) -> bool:
    return p.dtype != torch.float32


class PerturbationMixin:
    """Noise bookkeeping for an optimizer whose ``param_groups`` carry the noise options."""

    def _start_perturbation(self, seed: Optional[int], backend: str,
                            init_state: Callable[[list], None]) -> None:
        """End of construction: settle the backend and seed, give every parameter its state
        with ``init_state(params)`` and write the first perturbation, theta_0 + s_1 z_1."""
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            ops.resolve_backend(backend, device)
        self._backend = backend
        self._seed = agree_on_seed(resolve_seed(seed), seed is not None)
        self._noise_steps: dict[torch.device, torch.Tensor] = {}
        self._noise_step_start = 1
        self._launch_caches: dict = {}
        # Group index -> the noise options that wrote the perturbation it holds: restores use
        # them, so options changed between steps (a noise schedule) are applied cleanly.
        self._applied_noise: dict[int, dict] = {}
        with torch.no_grad():
            for group in self.param_groups:
                init_state(group["params"])
            self._noise_pass(restore=False, apply_offset=0)
        self._perturbed = True
        self._ready = True
        self._stamp_param_groups()

    def _begin_step(self, closure: Optional[Callable[[], torch.Tensor]]) -> Optional[torch.Tensor]:
        """What every step does first: run the closure (at the perturbed weights), check the
        noise options (they may change between steps) and, when the perturbation was removed,
        let masters take weights written into the parameters since."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            check_noise_options(group)
        if not self._perturbed:
            self._sync_masters_with_params()
        return loss

    def _param_ids(self) -> dict:
        """The parameters' identities in the noise stream: positions in the optimizer's list."""
        params = [p for group in self.param_groups for p in group["params"]]
        key = tuple(map(id, params))
        cached = getattr(self, "_param_id_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, {p: i for i, p in enumerate(params)})
            self._param_id_cache = cached
        return cached[1]

    def _index_base(self, p: torch.Tensor) -> int:
        cache = self.__dict__.setdefault("_index_base_cache", {})
        if p not in cache:
            cache[p] = index_base(p)
        return cache[p]

    def _noise_step(self, device: torch.device) -> torch.Tensor:
        if device not in self._noise_steps:
            start = next(iter(self._noise_steps.values())).to(device) if self._noise_steps else \
                torch.tensor([self._noise_step_start], dtype=torch.int64)
            self._noise_steps[device] = start.to(device)
        return self._noise_steps[device]

    def _advance_noise_step(self) -> None:
        for step in self._noise_steps.values():
            step.add_(1)

    @staticmethod
    def _group_buckets(group: dict) -> list[list]:
        """A group's params split by device and dtype: one launch each."""
        split = defaultdict(list)
        for p in group["params"]:
            split[(p.device, p.dtype)].append(p)
        return list(split.values())

    def _buckets(self) -> Iterator[tuple[int, dict, list]]:
        """(group index, group, params) per group, device and dtype."""
        for index, group in enumerate(self.param_groups):
            for params in self._group_buckets(group):
                yield index, group, params

    @torch.no_grad()
    def _launch(self, index: int, params: list, grads: list, noise: Optional[dict], *,
                restore: bool, apply_offset: int, adam: Optional[dict] = None) -> None:
        """One fused pass over a bucket of group ``index``, with the ``noise`` options (None:
        noise off). ``adam`` holds the AdamW state lists when grads are given."""
        device = params[0].device
        ids = self._param_ids()
        masters = [self._master_holder(p)["master"] for p in params] if needs_master(params[0]) else []
        noise_only = adam is None
        if noise_only:  # no moment is read: placeholders fill the lists
            placeholders = [torch.empty(0, device=device)] * len(params)
            adam = dict(exp_avgs=placeholders, exp_avg_sqs=placeholders, max_exp_avg_sqs=[],
                        steps=placeholders, lr=0.0, beta1=0.0, beta2=0.0, eps=0.0,
                        weight_decay=0.0, amsgrad=False, maximize=False)
        if _DTensor is not None and any(isinstance(p, _DTensor) for p in params):
            # Sharded parameters (FSDP2): update the local shards, each element with the noise
            # of its index in the whole parameter; ranks holding no rows skip the parameter.
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
        else:
            param_ids, index_bases = [ids[p] for p in params], [0] * len(params)
        backend = ops.resolve_backend(self._backend, device)
        # Only eager Triton launches keep their address tables here (compiled ones keep them in
        # ops.triton_step): no dict grows while compiling, so a compiled step compiles once.
        cache = self._launch_caches.setdefault((index, device, params[0].dtype, noise_only), {}) \
            if backend == "triton" and not torch.compiler.is_compiling() else None
        args = ops.FusedStepArgs(
            params=params, grads=grads, masters=masters, param_ids=param_ids, index_bases=index_bases,
            seed=self._seed, noise_step=self._noise_step(device), restore=restore,
            apply_offset=apply_offset, **(noise or NOISE_OFF), **adam)
        ops.fused_step(backend, args, cache=cache)

    def _perturb_group(self, index: int) -> None:
        """Give group ``index``, added after construction, the noise-state keys and (while
        perturbed) the current perturbation."""
        self._stamp_param_groups()
        if self._perturbed:
            self._noise_pass(restore=False, apply_offset=0, only_group=index)

    def _noise_pass(self, *, restore: bool, apply_offset: int, only_group: Optional[int] = None) -> None:
        """Restore (with the options that wrote it) or write (with the current options) the
        perturbation of every noisy parameter, without updating."""
        for index, group in enumerate(self.param_groups):
            if only_group is not None and index != only_group:
                continue
            noise = self._applied_noise.pop(index, None) if restore else noise_options(group)
            if noise is None:
                continue
            for params in self._group_buckets(group):
                self._launch(index, params, [None] * len(params), noise, restore=restore,
                             apply_offset=apply_offset)
            if not restore:
                self._applied_noise[index] = noise

    def _master_holder(self, p: torch.Tensor) -> dict:
        """The dict whose ``"master"`` entry is ``p``'s fp32 master: its optimizer state."""
        return self.state[p]

    def _init_masters(self, params: list) -> None:
        for p in params:
            if needs_master(p) and "master" not in self._master_holder(p):
                self._master_holder(p)["master"] = p.detach().float()

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
            # A load_state_dict() inside has already written the loaded step's perturbation.
            if was_perturbed:
                self.apply_perturbation()
            elif not self._perturbed:
                self._sync_masters_with_params()

    @torch.no_grad()
    def _sync_masters_with_params(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                master = self._master_holder(p).get("master")
                if master is not None:
                    changed = master.to(p.dtype) != p
                    master.copy_(torch.where(changed, p.float(), master))

    @torch.no_grad()
    def apply_perturbation(self) -> None:
        """Write the current step's perturbation into parameters that hold theta_t (idempotent).

        The inverse of ``remove_perturbation()``: after it, the next forward/backward sees
        theta_t + s_t z_t again. Weights written into the parameters while they were clean
        (a loaded checkpoint) are taken as theta_t. ``step()`` does this by itself, so it is only
        needed to train on from the same step, e.g. after saving clean weights between
        ``remove_perturbation()`` and the next forward (``integrations.hf.MergOptCallback``).
        """
        if not self._perturbed:
            self._sync_masters_with_params()
            self._noise_pass(restore=False, apply_offset=0)
            self._perturbed = True

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
        return state

    @staticmethod
    def _split_mergopt_state(state_dict: dict, owner: str) -> tuple[dict, dict]:
        """(the noise state, ``state_dict`` without it); checked before anything is modified."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError("state_dict must be an optimizer state dict with 'param_groups'")
        groups = state_dict["param_groups"]
        per_group = [(g.get("mergopt_seed"), g.get("mergopt_noise_step")) for g in groups]
        saved = state_dict.get("mergopt")
        if saved is None:
            found = {pair for pair in per_group if pair != (None, None)}
            if len(found) != 1 or (None, None) in per_group:
                raise ValueError(f"state_dict has no 'mergopt' entry (nor one seed and noise step in its "
                                 f"param_groups): it was not saved by {owner}")
            seed, step = found.pop()
            saved = {"seed": seed, "noise_step": step}
        if not isinstance(saved, dict) or set(saved) != {"seed", "noise_step"}:
            raise ValueError("state_dict['mergopt'] must hold 'seed' and 'noise_step'")
        resolve_seed(saved["seed"])
        step = saved["noise_step"]
        if isinstance(step, torch.Tensor):
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32 - 1:
            raise ValueError("state_dict['mergopt']['noise_step'] must be an integer in [0, 2**32 - 1) "
                             f"(the stream's step is 32 bits), got {step!r}")
        rest = {k: v for k, v in state_dict.items() if k != "mergopt"}
        rest["param_groups"] = [{k: v for k, v in g.items() if k not in ("mergopt_seed", "mergopt_noise_step")}
                                for g in groups]
        return {"seed": saved["seed"], "noise_step": step}, rest

    def _check_loadable_groups(self, saved_groups: list, check_group: Optional[Callable] = None) -> None:
        """Raise ``ValueError``, before anything changes, unless ``saved_groups`` match this
        optimizer's groups (count and sizes) and hold valid options (``check_group`` too)."""
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups) or any(
                len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)):
            raise ValueError("state_dict['param_groups'] does not match this optimizer's param groups "
                             "(number of groups or of parameters per group)")
        for saved in saved_groups:
            options = dict(saved)
            missing = [k for k in NOISE_OPTIONS if k not in options]
            if missing:
                raise ValueError(f"state_dict['param_groups'] entries lack the noise options {missing}")
            check_noise_options(options)
            if check_group is not None:
                check_group(options)

    def _load_mergopt_state(self, saved: dict) -> None:
        """Take the noise state that ``_split_mergopt_state`` returned (checked there)."""
        self._seed = saved["seed"]
        step = int(saved["noise_step"])
        self._noise_step_start = step
        for tensor in self._noise_steps.values():
            tensor.fill_(step)
        self._stamp_param_groups()
