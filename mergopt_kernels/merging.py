"""Model merging: weight averaging, task arithmetic, TIES-Merging and DARE, tensor by tensor.

The functions here take state dicts (``dict`` name -> tensor) and return a new state dict in
the base's key order; ``mergopt_kernels.merge_io.merge_checkpoints`` runs the same code on
checkpoints read from disk key by key. The defaults are the paper's (FusionBench's) conventions;
each option below says which setting gives mergekit's or FusionBench's behaviour.

Common rules
    * Task vectors ``tau_i = expert_i - base`` are computed in fp32 (fp64 for fp64 entries) and
      the result is cast back to the entry's dtype: bf16/fp16/fp32 checkpoints stay in their dtype.
    * Only floating-point entries are merged. Keys, shapes, dtypes and non-float entries are
      checked before any float tensor is read (``merge_plan``): by default mismatched keys,
      differing float dtypes and non-float entries that differ between inputs are errors naming
      the key; ``keys=``, ``promote_dtypes=`` and ``non_float=`` choose otherwise.
    * ``weights`` (one per expert) scale each expert: task arithmetic gives
      ``base + scaling * sum_i w_i tau_i`` (mergekit ``task_arithmetic`` with ``lambda``), a
      weight average ``sum_i w_i x_i / sum_i w_i`` (mergekit ``linear``).
    * Memory: the experts' tensors of one entry are held as one ``[K, n]`` stack in the entry's
      own dtype (a bf16 checkpoint stays bf16), and the task vectors and everything else are made
      in chunks of ``CHUNK`` elements, so peak extra memory is about ``K + 3`` times the largest
      tensor plus fixed chunk buffers, for every method, whole-model TIES included. Measured from
      disk (``python -m bench.merge_memory``, peak resident set), as multiples of the largest
      tensor: one 64 MiB fp32 tensor and 3 experts, weight average 4.2x, task arithmetic 5.3x,
      TIES 5.9x to 6.2x (whole model, exact count, per tensor), DARE 5.7x, DARE-TIES 5.9x
      (bound ``3 * (K + 1)`` = 12x); one 32 MiB bf16 tensor and 1 expert, 2.3x to 4.3x (bound
      6x). Inputs are never modified.

TIES-Merging (``ties_merging``)
    1. Trim: expert ``i`` keeps the ``k_i = max(1, floor(density_i * n + 1/2))`` entries of
       ``tau_i`` with the largest magnitude (``count_rounding="down"``: ``max(1, floor(density_i
       * n))``, mergekit's ``int(density * n)``), ``n`` counting the float entries of the whole
       model (default; FusionBench) or of one tensor (``per_tensor=True``; mergekit). An entry is kept when ``|tau_i| >= t_i``, ``t_i`` the exact
       ``k_i``-th largest magnitude, so entries tied with ``t_i`` are all kept (FusionBench's rule);
       with ``exact_count=True`` exactly ``k_i`` are kept: of the entries equal to ``t_i``, the
       first ones in sorted key order and then element order (never the inputs' key order).
    2. Elect: ``sign = sign(sum_i w_i trimmed_i)`` per element. Where that sum is 0, the element
       takes the majority sign: the sign of ``(#elements elected +) - (#elements elected -)``
       counted over the whole model (as FusionBench does over its flattened model), +1 on a tie.
       With ``zero_sign="positive"`` it takes +1 (mergekit), and the pass that counts the
       majority is left out. Either matters only where nonzero entries cancel exactly.
    3. Disjoint merge of the entries that are nonzero and agree with the elected sign:
       ``merge_func="mean"`` (default; FusionBench ``merge_func=mean``, mergekit
       ``normalize: true``) gives ``sum_i w_i trimmed_i / sum_i w_i`` over those entries, 0 where
       there is none; ``"sum"`` (FusionBench ``merge_func=sum``, mergekit ``normalize: false``)
       their weighted sum. Result ``base + scaling * merged``.

    The global threshold comes from a first streaming pass: a radix select over the IEEE bit
    patterns of the magnitudes (non-negative floats order like their bit patterns as integers).
    Each pass streams the tensors once and histograms the next 16 bits of the entries that still
    match the chosen prefix; 2 passes for fp32 (4 for a model with fp64 entries) give the exact
    k-th largest value. Memory per pass: one 65536-bin histogram per expert.

DARE (``dare``)
    Expert ``i``'s task-vector entry ``j`` of tensor ``name`` is dropped when
    ``(w >> 8) < ceil(drop_rate_i * 2**24)`` for the 32-bit Philox4x32-10 word ``w`` of element ``j``
    under the key ``seed`` and counter ``(G & 0xffffffff, G >> 32, h & 0xffffffff, h >> 32)``,
    ``G = j >> 2``, word ``j & 3``, ``h`` the first 8 bytes (little-endian) of
    ``sha256(f"{i}:{name}")``. The masks thus depend on (seed, expert position, tensor name,
    element index) only: never on the order in which tensors are visited, so a merge from disk
    and one in memory draw the same masks. Kept entries are then rescaled: ``rescale="inverse"``
    (default; the DARE paper, FusionBench) divides by ``1 - drop_rate_i``, ``"l1"`` (mergekit
    ``rescale: true``) scales each expert's tensor so its L1 norm is that before the drop (left
    as is when either norm is below 1e-7), ``"none"`` keeps them. Then task arithmetic, or with
    ``ties=True`` TIES-Merging of the rescaled vectors (FusionBench's DARE-TIES).

Non-finite values
    By default a NaN or Inf in an input's float entry, or a merged value that overflows its
    dtype, raises ``ValueError`` naming the input and the key (``experts[1]['w'] holds a
    non-finite value``). Inputs are checked chunk by chunk as the task vectors (or, for a weight
    average, the experts' values) are made, outputs as each chunk is written: no extra pass
    over the tensors. With ``allow_non_finite=True`` the merge goes on and each method does what
    its arithmetic does: weight averaging, task arithmetic and DARE with ``rescale="inverse"``
    or ``"none"`` carry a NaN or Inf into its own element only (DARE drops it where the mask
    drops that entry); DARE with ``rescale="l1"`` makes the whole tensor of that expert
    non-finite when it holds an Inf (its L1 norm is infinite); TIES drops NaN entries (a NaN
    magnitude is never above the threshold) and keeps an Inf as the largest magnitude, so that
    element becomes +-Inf (NaN where +Inf and -Inf agree with no elected sign).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .merge.driver import merge_tensors
from .merge.registry import METHODS, REGISTRY, TIES_OPTIONS, MergeMethod
from .merge.sparsify import kth_largest_magnitude as _kth_largest_magnitude  # noqa: F401 (tested directly)
from .merge.spec import (COUNT_ROUNDINGS, MERGE_FUNCS, OPTION_DEFAULTS, RESCALES, ZERO_SIGNS, MergeSpec, Progress,
                         merge_spec)
from .merge.task_vectors import CHUNK, linear
from .merge_plan import MappingSource, plan_entries

StateDict = Mapping[str, torch.Tensor]

__all__ = ["weight_average", "task_arithmetic", "ties_merging", "dare", "MergeSpec", "merge_spec", "merge_tensors",
           "MergeMethod", "REGISTRY", "METHODS", "MERGE_FUNCS", "RESCALES", "COUNT_ROUNDINGS", "ZERO_SIGNS",
           "OPTION_DEFAULTS", "CHUNK"]


# ---------------------------------------------------------------------------------------------
# State-dict API
# ---------------------------------------------------------------------------------------------

def _expert_list(experts) -> list[StateDict]:
    if isinstance(experts, (Mapping, torch.Tensor)):
        raise TypeError("experts must be a sequence of state dicts (one per expert), got a single "
                        f"{type(experts).__name__}; wrap it in a list")
    try:
        experts = list(experts)
    except TypeError:
        raise TypeError(f"experts must be a sequence of state dicts, got {type(experts).__name__}") from None
    if not experts:
        raise ValueError("experts is empty: need at least one expert state dict")
    return experts


def _expert_sources(experts) -> list[MappingSource]:
    return [MappingSource(expert, f"experts[{i}]") for i, expert in enumerate(_expert_list(experts))]


def _check_state_dicts(reference: StateDict, reference_name: str, others: Sequence[StateDict],
                       other_names: Sequence[str]) -> None:
    """Same keys, and per key a tensor of the same shape and dtype, in ``reference`` and ``others``."""
    plan_entries(MappingSource(reference, reference_name),
                 [MappingSource(other, name) for other, name in zip(others, other_names)], non_float="base")


def _float_keys(state: StateDict) -> list[str]:
    return [key for key, value in state.items() if value.is_floating_point()]


def _merge_state_dicts(method: str, base: StateDict | None, experts, keys: str, non_float: str,
                       promote_dtypes: bool, **options) -> dict[str, torch.Tensor]:
    expert_sources = _expert_sources(experts)
    base_source = MappingSource(base, "base") if base is not None else None
    spec = merge_spec(method, len(expert_sources), **options)
    entries = plan_entries(base_source, expert_sources, keys, non_float, promote_dtypes)
    return dict(merge_tensors(spec, base_source, expert_sources, entries))


def _linear_merge(base: StateDict, experts: Sequence[StateDict], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """``base + sum_i coefficients[i] * tau_i`` per float entry (inputs already checked)."""
    base_source, expert_sources = MappingSource(base, "base"), _expert_sources(experts)
    spec = merge_spec("task_arithmetic", len(expert_sources))
    out = {}
    for entry in plan_entries(base_source, expert_sources, non_float="base"):
        value = linear(entry, base_source, expert_sources, spec, coefficients) if entry.merged else base[entry.key].clone()
        out[entry.key] = value.to(entry.dtype)
    return out


_INPUT_DOC = """keys: ``"strict"`` (default; mismatched keys raise), ``"intersection"`` or ``"union"``.
        non_float: ``"error"`` (default; non-float entries that differ raise) or ``"base"``.
        promote_dtypes: merge entries whose float dtypes differ in the promoted dtype.
        allow_non_finite: merge inputs holding NaN or Inf and return non-finite results instead
            of raising (module docstring, "Non-finite values")."""


def weight_average(experts: Sequence[StateDict], weights: Sequence[float] | None = None, *, keys: str = "strict",
                   non_float: str = "error", promote_dtypes: bool = False,
                   allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """Elementwise mean of the experts' weights (mergekit ``linear``; FusionBench simple average).

    Args:
        experts: K >= 1 state dicts with the same keys, and per key the same shape and dtype.
        weights: ``None`` for the plain mean, or K reals: ``sum_i w_i x_i / sum_i w_i``.
        {inputs}
    Returns:
        A new state dict in ``experts[0]``'s key order: each float entry the mean (computed in
        fp32, fp64 for fp64 entries, cast back to the entry's dtype); non-float entries copied
        (with ``non_float="base"``, from ``experts[0]``).
    Raises:
        TypeError / ValueError: ``experts`` empty or not a sequence of state dicts; mismatched keys,
        shapes, dtypes or non-float entries; bad weights.
    """
    return _merge_state_dicts("weight_average", None, experts, keys, non_float, promote_dtypes, weights=weights,
                              allow_non_finite=allow_non_finite)


def task_arithmetic(base: StateDict, experts: Sequence[StateDict], scaling: float = 0.3,
                    weights: Sequence[float] | None = None, *, keys: str = "strict", non_float: str = "error",
                    promote_dtypes: bool = False, allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """Task arithmetic: ``base + scaling * sum_i w_i (experts[i] - base)``.

    mergekit ``task_arithmetic`` with ``lambda = scaling`` (its default lambda is 1, ours 0.3).

    Args:
        base: the pre-trained state dict; float entries of any shape, dtype bf16/fp16/fp32/fp64.
        experts: K >= 1 fine-tuned state dicts with the base's keys, shapes and dtypes.
        scaling: the coefficient lambda (finite real; 0.3 is the usual default).
        weights: per-expert weights ``w_i`` (default all 1).
        {inputs}
    Returns:
        A new state dict in the base's key order and dtypes (maths in fp32, fp64 for fp64 entries);
        non-float entries copied from the base.
    Raises:
        TypeError / ValueError: no experts; mismatched keys, shapes, dtypes or non-float entries;
        non-finite scaling or weights.
    """
    return _merge_state_dicts("task_arithmetic", base, experts, keys, non_float, promote_dtypes,
                              scaling=scaling, weights=weights, allow_non_finite=allow_non_finite)


def ties_merging(base: StateDict, experts: Sequence[StateDict], scaling: float = 0.3,
                 density: float | Sequence[float] = 0.2, per_tensor: bool = False, *,
                 weights: Sequence[float] | None = None, exact_count: bool = False, merge_func: str = "mean",
                 count_rounding: str = "nearest", zero_sign: str = "majority",
                 keys: str = "strict", non_float: str = "error", promote_dtypes: bool = False,
                 allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """TIES-Merging: trim each task vector to its top-``density`` magnitudes, elect signs, disjoint mean.

    See the module docstring for the exact trim, sign-election and tie rules. FusionBench's TIES
    is the default; mergekit's ``ties`` is ``per_tensor=True, scaling=1`` (its lambda).

    Args:
        base: the pre-trained state dict.
        experts: K >= 1 fine-tuned state dicts with the base's keys, shapes and dtypes.
        scaling: lambda in ``base + scaling * merged_tau`` (finite real).
        density: fraction of entries each expert keeps, in (0, 1] (one value or one per expert).
        per_tensor: take the top ``density`` fraction within each tensor instead of over the
            whole model (the float entries of the whole model).
        weights: per-expert weights (default all 1), applied before the sign election.
        exact_count: keep exactly ``k`` entries per expert, breaking ties at the threshold by
            position, instead of every entry tied with the k-th largest.
        merge_func: ``"mean"`` (disjoint mean) or ``"sum"`` of the agreeing entries.
        count_rounding: ``k = density * n`` rounded to the ``"nearest"`` integer (default) or
            ``"down"`` (mergekit), at least 1.
        zero_sign: the sign elected where the weighted sum is 0: the whole model's
            ``"majority"`` sign (default; FusionBench) or ``"positive"`` (mergekit; one pass fewer).
        {inputs}
    Returns:
        A new state dict in the base's key order and dtypes; non-float entries copied from the base.
    Raises:
        TypeError / ValueError: no experts; mismatched keys, shapes, dtypes or non-float entries;
        density not in (0, 1]; non-finite scaling; unknown merge_func, count_rounding or zero_sign.
    """
    return _merge_state_dicts("ties", base, experts, keys, non_float, promote_dtypes, scaling=scaling,
                              density=density, per_tensor=per_tensor, weights=weights, exact_count=exact_count,
                              merge_func=merge_func, count_rounding=count_rounding, zero_sign=zero_sign,
                              allow_non_finite=allow_non_finite)


def dare(base: StateDict, experts: Sequence[StateDict], scaling: float = 0.3,
         drop_rate: float | Sequence[float] = 0.5, seed: int = 0, ties: bool = False,
         density: float | Sequence[float] | None = None, *, weights: Sequence[float] | None = None,
         rescale: str = "inverse", per_tensor: bool | None = None, exact_count: bool | None = None,
         merge_func: str | None = None, count_rounding: str | None = None, zero_sign: str | None = None,
         keys: str = "strict",
         non_float: str = "error", promote_dtypes: bool = False, allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """DARE: randomly drop task-vector entries, rescale the rest, then merge.

    mergekit's ``dare_linear`` is ``rescale="l1", scaling=1`` with ``drop_rate = 1 - density``;
    its ``dare_ties`` adds ``ties=True, density=1`` (no magnitude trim).

    Args:
        base: the pre-trained state dict.
        experts: K >= 1 fine-tuned state dicts with the base's keys, shapes and dtypes.
        scaling: lambda of the final task arithmetic / TIES step (finite real).
        drop_rate: probability p of dropping each entry, in [0, 1) (one value or one per expert).
        seed: the Philox key of the masks, in [0, 2**64); masks depend on (seed, expert position,
            tensor name, element index) only.
        ties: merge the rescaled task vectors with TIES-Merging instead of task arithmetic.
        density: TIES trim density (default 0.2), only with ``ties=True`` (refused without).
        weights: per-expert weights (default all 1).
        rescale: ``"inverse"`` (divide kept entries by 1 - p), ``"l1"`` or ``"none"``.
        per_tensor / exact_count / merge_func / count_rounding / zero_sign: TIES options
            (defaults ``False``, ``False``, ``"mean"``, ``"nearest"``, ``"majority"``; see
            ``ties_merging``), only with ``ties=True`` (refused without).
        {inputs}
    Returns:
        A new state dict in the base's key order and dtypes; non-float entries copied from the base.
    Raises:
        TypeError / ValueError: no experts; mismatched keys, shapes, dtypes or non-float entries;
        drop_rate not in [0, 1); density not in (0, 1]; non-finite scaling; seed not an integer
        in [0, 2**64).
    """
    tie_options = {name: value for name, value in zip(TIES_OPTIONS, (density, per_tensor, exact_count, merge_func,
                                                                      count_rounding, zero_sign))
                   if value is not None}
    return _merge_state_dicts("dare", base, experts, keys, non_float, promote_dtypes, scaling=scaling,
                              drop_rate=drop_rate, seed=seed, ties=ties, weights=weights, rescale=rescale,
                              allow_non_finite=allow_non_finite, **tie_options)


for _function in (weight_average, task_arithmetic, ties_merging, dare):
    _function.__doc__ = _function.__doc__.replace("{inputs}", _INPUT_DOC)
del _function
