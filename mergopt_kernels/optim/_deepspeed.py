"""DeepSpeed ZeRO: where each element of DeepSpeed's flat fp32 partitions comes from.

ZeRO (stages 1, 2 and 3) replaces the parameters of the optimizer it is given (the "client"
optimizer) by flat fp32 partitions: on each rank, one tensor per param group (stages 1 and 2)
or per sub-group (stage 3) that concatenates this rank's slices of the parameters. The
optimizer updates those; DeepSpeed then copies them into the model's weights. Every element of
a partition draws the noise of its (parameter, index) in the whole parameter, so this module
maps each partition back to its segments, and writes partitions into the model (``publish``)
when the optimizer changed them outside DeepSpeed's step (``clean_weights()`` and the like).

This is the one module that reaches into DeepSpeed's internals, because DeepSpeed offers no
way in for a client optimizer: it gives the optimizer no reference to its ZeRO wrapper (found
here among the objects that refer to the optimizer, once: ``find_owner``), and its checkpoint
loads rewrite the partitions without calling the optimizer (its load methods are wrapped, on
that one wrapper object: ``ZeroLayout.watch_loads``). Nothing here imports DeepSpeed: the
layouts are read from the ZeRO optimizer object, whose attributes are those of DeepSpeed 0.19
(``deepspeed.runtime.zero``); another version is refused (``check_version``), and the tests
pin 0.19.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

SUPPORTED = "ZeRO stages 1, 2 and 3, fp32 or bf16, without offload"
# The DeepSpeed releases whose internals this module reads (major.minor).
SUPPORTED_VERSIONS = ("0.19",)
# The DeepSpeed classes that can wrap a client optimizer and hand it other tensors.
ZERO_OPTIMIZERS = ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3")
MIXED_PRECISION_WRAPPERS = ("FP16_Optimizer", "FP16_UnfusedOptimizer", "BF16_Optimizer")
# The methods with which DeepSpeed rewrites the partitions when it loads a checkpoint.
LOADS = ("load_state_dict", "_restore_from_bit16_weights", "refresh_fp32_params")
# The engine method with which ZeRO-3's save_16bit_model gathers the weights without calling
# the module's state_dict() (so no state-dict hook sees it).
ZERO3_16BIT_SAVE = "_zero3_consolidated_16bit_state_dict"


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, start + length)`` of the flattened ``param`` held at
    ``[offset, offset + length)`` of a partition."""
    param: torch.Tensor
    start: int
    offset: int
    length: int


class ZeroLayout:
    """The partitions one rank's ZeRO optimizer gives the client optimizer, and their segments.

    Attributes:
        owner: the DeepSpeed ZeRO optimizer (its ``.optimizer`` is the client optimizer).
        partitions: the flat fp32 tensors this rank updates, in DeepSpeed's order.
        segments: partition -> its segments (a partition may also end in padding, which no
            segment covers and which the optimizer leaves alone).
        members: partition -> the parameters of its DeepSpeed (sub-)group, whether or not
            this rank holds a slice of them (a rank may hold only padding).
    """

    def __init__(self, owner, partitions: list, segments: dict, members: dict):
        self.owner = owner
        self.partitions = partitions
        self.segments = segments
        self.members = members
        self._loading = 0

    def publish(self) -> None:
        """Copy the partitions into the model's weights (a collective call under stages 1 and 2,
        and under stage 3 with persistent parameters: every rank must make it)."""
        raise NotImplementedError

    def watch_loads(self, after_load) -> None:
        """Call ``after_load()`` whenever one of ``owner``'s checkpoint loads (``LOADS``) has
        rewritten the partitions, once per outermost call.

        DeepSpeed writes the partitions through ``.data``, which no version counter sees, and
        loads without optimizer states (``load_module_only``, ``load_optimizer_states=False``)
        do not call the client optimizer at all: the loads themselves are wrapped, on this
        ``owner`` object only."""
        for name in LOADS:
            method = getattr(self.owner, name, None)
            if method is None:
                continue

            def watched(*args, _method=method, **kwargs):
                self._loading += 1
                try:
                    result = _method(*args, **kwargs)
                finally:
                    self._loading -= 1
                if self._loading == 0:
                    after_load()
                return result

            setattr(self.owner, name, watched)


class Stage12Layout(ZeroLayout):
    """``DeepSpeedZeroOptimizer`` (stages 1 and 2): one partition per param group, the rank's
    equal share of the group's parameters flattened in DeepSpeed's order (round robin or not),
    each at ``round_robin_bit16_offsets``."""

    def __init__(self, owner):
        import torch.distributed as dist

        partitions, segments, members = [], {}, {}
        for i, partition in enumerate(_attribute(owner, "single_partition_of_fp32_groups")):
            rank = dist.get_rank(group=_attribute(owner, "real_dp_process_group")[i])
            size = int(_attribute(owner, "partition_size")[i])
            begin, end = rank * size, (rank + 1) * size
            pieces = []
            for param, meta, offset in zip(_attribute(owner, "round_robin_bit16_groups")[i],
                                           _attribute(owner, "round_robin_bit16_meta")[i],
                                           _attribute(owner, "round_robin_bit16_offsets")[i]):
                low, high = max(offset, begin), min(offset + meta.numel(), end)
                if high > low:
                    pieces.append(Segment(param, low - offset, low - begin, high - low))
            partitions.append(partition)
            segments[partition] = pieces
            members[partition] = list(_attribute(owner, "bit16_groups")[i])
        super().__init__(owner, partitions, segments, members)

    def publish(self) -> None:
        self.owner.update_lp_params()


def zero3_range(param: torch.Tensor) -> tuple[int, int, int]:
    """This rank's slice of a ZeRO-3 parameter: (its size in ``ds_tensor``, padding included;
    the index of its first element in the whole parameter; how many elements of the parameter
    it holds). A parameter of ``n`` elements is cut in slices of ``ceil(n / world)`` elements
    (the last one padded); rank ``r``'s starts at ``r * ceil(n / world)``."""
    import torch.distributed as dist

    size = int(param.ds_tensor.ds_numel)
    start = size * dist.get_rank(group=param.ds_process_group)
    return size, start, max(0, min(size, int(param.ds_numel) - start))


class Stage3Layout(ZeroLayout):
    """``DeepSpeedZeroOptimizer_Stage3``: one partition per sub-group, the concatenation of the
    rank's slice (``ds_tensor``, see ``zero3_range``) of each parameter of the sub-group."""

    def __init__(self, owner):
        partitions, segments, members = [], {}, {}
        for sub_group, params in enumerate(_attribute(owner, "fp16_groups")):
            partition = _attribute(owner, "fp32_partitioned_groups_flat")[sub_group]
            pieces, offset = [], 0
            for param in params:
                slice_size, start, length = zero3_range(param)
                if length > 0:
                    pieces.append(Segment(param, start, offset, length))
                offset += slice_size
            partitions.append(partition)
            segments[partition] = pieces
            members[partition] = list(params)
        super().__init__(owner, partitions, segments, members)

    def publish(self) -> None:
        # As DeepSpeed around a checkpoint: release the gathered parameters (the persistent
        # ones stay gathered between steps), write the slices, gather the persistent ones again.
        owner = self.owner
        owner.checkpoint_event_prologue()
        for sub_group in range(len(self.partitions)):
            owner._reassign_or_swap_out_partitioned_parameters(sub_group)
        owner.checkpoint_event_epilogue()


def _attribute(owner, name: str):
    if not hasattr(owner, name):
        raise RuntimeError(f"DeepSpeed's {type(owner).__name__} has no attribute {name!r}: this DeepSpeed "
                           "version is not supported (supported: 0.19)")
    return getattr(owner, name)


def find_owner(optimizer) -> Optional[object]:
    """The DeepSpeed object whose ``.optimizer`` is ``optimizer`` (its ZeRO or mixed-precision
    wrapper), or None.

    DeepSpeed gives the client optimizer no reference to its wrapper, so the wrapper is found
    among the objects that refer to the optimizer (once per optimizer: it scans the heap).
    DeepSpeed's engine and LR schedulers also hold the optimizer as ``.optimizer``; other
    DeepSpeed wrappers are returned, to be refused by ``layout_of``."""
    if "deepspeed" not in sys.modules:
        return None
    candidates = []
    for referrer in gc.get_referrers(optimizer):
        owners = [referrer]
        if isinstance(referrer, dict):  # an instance's __dict__: find its instance
            owners = [o for o in gc.get_referrers(referrer) if getattr(o, "__dict__", None) is referrer]
        for owner in owners:
            kind = type(owner)
            if getattr(owner, "optimizer", None) is optimizer and kind.__module__.startswith("deepspeed.") and \
                    kind.__name__ != "DeepSpeedEngine" and not kind.__module__.startswith("deepspeed.runtime.lr_schedules"):
                candidates.append(owner)
    known = [o for o in candidates if type(o).__name__ in ZERO_OPTIMIZERS + MIXED_PRECISION_WRAPPERS]
    return (known or candidates or [None])[0]


def check_version(version: str) -> None:
    """Raise ``RuntimeError`` naming ``version`` unless this module reads its internals."""
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VERSIONS:
        raise RuntimeError(f"DeepSpeed {version} is not supported by FusedMergOptAdamW/MergOpt, which read the "
                           f"internals of DeepSpeed's ZeRO optimizers as of {', '.join(SUPPORTED_VERSIONS)}: "
                           "pip install 'deepspeed==0.19.*'")


def layout_of(owner) -> ZeroLayout:
    """The layout of ``owner``'s partitions; ``ValueError`` naming the configuration when it is
    one this optimizer does not support, ``RuntimeError`` for another DeepSpeed version."""
    check_version(sys.modules["deepspeed"].__version__)
    name = type(owner).__name__
    if name in ZERO_OPTIMIZERS:
        if getattr(owner, "dtype", None) == torch.float16:
            raise ValueError(f"DeepSpeed fp16 (loss scaling) is not supported with FusedMergOptAdamW/MergOpt "
                             f"(supported: {SUPPORTED})")
        # (attribute of the ZeRO optimizer, the setting that turns it on): each one refused
        for flag, setting in (("zenflow", "zero_optimization.zenflow"),
                              ("elastic_checkpoint", "zero_optimization.elastic_checkpoint (its checkpoints drop "
                                                     "this optimizer's noise state)"),
                              ("cpu_offload", "zero_optimization.offload_optimizer"),
                              ("offload_optimizer", "zero_optimization.offload_optimizer"),
                              ("offload_param", "zero_optimization.offload_param"),
                              ("swap_optimizer", "zero_optimization.offload_optimizer.device=nvme"),
                              ("has_moe_layers", "MoE layers")):
            if getattr(owner, flag, False):
                raise ValueError(f"DeepSpeed {setting} is not supported with FusedMergOptAdamW/MergOpt "
                                 f"(supported: {SUPPORTED})")
        if getattr(owner, "zero_hpz_partition_size", 1) > 1:
            raise ValueError("DeepSpeed zero_optimization.zero_hpz_partition_size > 1 (ZeRO++) is not supported "
                             f"(supported: {SUPPORTED})")
    if name == "DeepSpeedZeroOptimizer":
        layout = Stage12Layout(owner)
    elif name == "DeepSpeedZeroOptimizer_Stage3":
        layout = Stage3Layout(owner)
    elif name in MIXED_PRECISION_WRAPPERS:
        setting = ("bf16 at zero_optimization.stage 1 with data_types.grad_accum_dtype fp32" if name == "BF16_Optimizer"
                   else "fp16, or bf16 without ZeRO (zero_optimization.stage 0)")
        raise ValueError(
            f"DeepSpeed wrapped FusedMergOptAdamW/MergOpt in its {name} for {setting}: not supported. Use "
            "zero_optimization.stage 1, 2 or 3 with bf16 (gradients accumulated in bf16, DeepSpeed's default) or "
            f"fp32 (supported: {SUPPORTED})")
    else:
        raise ValueError(f"DeepSpeed's {name} wraps FusedMergOptAdamW/MergOpt: not supported "
                         f"(supported: {SUPPORTED})")
    for partition in layout.partitions:
        if partition.dtype != torch.float32:
            raise ValueError(f"DeepSpeed gave {partition.dtype} partitions (master_weights_and_grads_dtype): "
                             "FusedMergOptAdamW/MergOpt update fp32 master weights only")
    return layout


def watch_16bit_saves(engine, before) -> Optional[Callable[[], None]]:
    """Call ``before()`` at the start of every ZeRO-3 16-bit consolidation of ``engine`` (a
    DeepSpeed engine; ``save_16bit_model`` gathers the weights itself). The method is wrapped on
    this engine object only; returns the function that unwraps it, or None when ``engine`` is
    not a DeepSpeed engine."""
    if not any(cls.__name__ == "DeepSpeedEngine" for cls in type(engine).__mro__):
        return None
    method = getattr(engine, ZERO3_16BIT_SAVE)

    def watched(*args, **kwargs):
        before()
        return method(*args, **kwargs)

    setattr(engine, ZERO3_16BIT_SAVE, watched)
    return lambda: engine.__dict__.pop(ZERO3_16BIT_SAVE, None)
