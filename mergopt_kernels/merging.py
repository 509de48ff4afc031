"""Model merging on state dicts: weight averaging, task arithmetic, TIES-Merging and DARE.

Every function takes state dicts (``dict`` name -> tensor) of one architecture and returns a new
state dict in the base's key order. The semantics are the research-standard ones (FusionBench,
following the TIES-Merging and DARE papers); where we had to pick a rule, it is stated here.

Common rules
    * Task vectors ``tau_i = expert_i - base`` are computed in fp32 (fp64 for fp64 entries) and
      the result is cast back to the entry's dtype: bf16/fp16/fp32 checkpoints stay in their dtype.
    * Floating-point entries are merged; every other entry (integer counters, bool buffers) is
      copied from the base (from the first expert in ``weight_average``, which has no base).
    * Work is done tensor by tensor: peak extra memory is about one tensor times the number of
      experts, also for the global TIES threshold (see below). Inputs are never modified.
    * Keys, shapes and dtypes must agree between the base and every expert (``ValueError`` /
      ``TypeError`` naming the offending argument and key otherwise).

TIES-Merging (``ties_merging``)
    1. Trim: expert ``i`` keeps the ``k = max(1, floor(density * n + 1/2))`` entries of ``tau_i`` with
       the largest magnitude, ``n`` counting the float entries of the whole model (default) or of
       one tensor (``per_tensor=True``). An entry is kept when ``|tau_i| >= t_i``, ``t_i`` the exact
       k-th largest magnitude, so entries tied with ``t_i`` are all kept (FusionBench's rule too;
       it keeps ``floor(density * n) + 1`` entries where we keep ``floor(density * n + 1/2)``).
    2. Elect: ``sign = sign(sum_i trimmed_i)`` per element. Where that sum is 0, the element takes
       the majority sign: the sign of ``(#elements elected +) - (#elements elected -)`` counted over
       the whole model (as FusionBench does over its flattened model), with +1 on an exact tie.
    3. Disjoint mean: per element, the mean of the trimmed entries that are nonzero and agree with
       the elected sign; 0 where there is none. Result ``base + scaling * merged``.

    The global threshold is found without concatenating the models: a radix select over the
    IEEE bit patterns of the magnitudes (non-negative floats order like their bit patterns as
    integers). Each pass streams the tensors once and histograms the next 16 bits of the entries
    that still match the chosen prefix; 2 passes for fp32 (4 for a model with fp64 entries) give
    the exact k-th largest value. Memory per pass: one 65536-bin histogram per expert.

DARE (``dare``)
    Each task-vector entry is dropped with probability ``drop_rate`` (``u < drop_rate`` for a uniform
    ``u`` from a ``torch.Generator`` seeded with ``seed``, drawn key by key in the base's order, all
    experts of a key in one draw), kept entries are divided by ``1 - drop_rate``; then task
    arithmetic, or with ``ties=True`` TIES-Merging of the rescaled vectors (FusionBench's DARE-TIES).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]

__all__ = ["weight_average", "task_arithmetic", "ties_merging", "dare"]

_DIGIT_BITS = 16
_DIGIT_BINS = 1 << _DIGIT_BITS
_INT64_MAX = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------
# Argument checks
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
    for i, expert in enumerate(experts):
        if not isinstance(expert, Mapping):
            raise TypeError(f"experts[{i}] must be a state dict (a mapping name -> tensor), "
                            f"got {type(expert).__name__}")
    return experts


def _check_state_dicts(reference: StateDict, reference_name: str, others: Sequence[StateDict],
                       other_names: Sequence[str]) -> None:
    """Same keys, and per key a tensor of the same shape and dtype, in ``reference`` and ``others``."""
    if not isinstance(reference, Mapping):
        raise TypeError(f"{reference_name} must be a state dict (a mapping name -> tensor), "
                        f"got {type(reference).__name__}")
    for key, value in reference.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{reference_name}[{key!r}] must be a tensor, got {type(value).__name__}")
    keys = set(reference)
    for other, name in zip(others, other_names):
        other_keys = set(other)
        if other_keys != keys:
            missing, extra = sorted(keys - other_keys), sorted(other_keys - keys)
            raise ValueError(f"{name} does not have the keys of {reference_name}: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
        for key, ref in reference.items():
            value = other[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(value).__name__}")
            if value.shape != ref.shape:
                raise ValueError(f"{name}[{key!r}] has shape {tuple(value.shape)}, "
                                 f"{reference_name}[{key!r}] has {tuple(ref.shape)}")
            if value.dtype != ref.dtype:
                raise TypeError(f"{name}[{key!r}] has dtype {value.dtype}, "
                                f"{reference_name}[{key!r}] has {ref.dtype}")


def _checked_inputs(base: StateDict, experts) -> list[StateDict]:
    experts = _expert_list(experts)
    _check_state_dicts(base, "base", experts, [f"experts[{i}]" for i in range(len(experts))])
    return experts


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _density(density) -> float:
    density = _real("density", density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


# ---------------------------------------------------------------------------------------------
# Streaming task vectors
# ---------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _float_keys(state: StateDict) -> list[str]:
    return [key for key, value in state.items() if value.is_floating_point()]


def _stacked_task_vectors(base: StateDict, experts: Sequence[StateDict], keys: Iterable[str],
                          drop: tuple[float, int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tau)``, ``tau`` of shape ``[num_experts, *base[key].shape]`` in fp32 (fp64).

    With ``drop = (p, seed)``, DARE: entries dropped with probability ``p``, kept ones divided by
    ``1 - p``. The generator is created afresh on every call, so a replayed stream is identical.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for key in keys:
        ref = base[key]
        dtype = _compute_dtype(ref.dtype)
        ref_c = ref.to(dtype)
        tau = torch.stack([expert[key].to(device=ref.device, dtype=dtype) - ref_c for expert in experts])
        if drop is not None:
            p, seed = drop
            gen = generators.get(ref.device)
            if gen is None:
                gen = generators[ref.device] = torch.Generator(device=ref.device).manual_seed(seed)
            u = torch.rand(tau.shape, generator=gen, device=ref.device, dtype=dtype)
            tau = torch.where(u >= p, tau / (1.0 - p), torch.zeros((), dtype=dtype, device=ref.device))
        yield key, tau


def _assemble(reference: StateDict, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Output in ``reference``'s key order: merged float entries cast back, the rest cloned."""
    out = {}
    for key, ref in reference.items():
        out[key] = merged[key].to(ref.dtype) if key in merged else ref.clone()
    return out


def _linear_merge(base: StateDict, experts: Sequence[StateDict], coefficients: Sequence[float],
                  drop: tuple[float, int] | None = None) -> dict[str, torch.Tensor]:
    """``base + sum_i coefficients[i] * tau_i`` per float entry (inputs already checked)."""
    merged = {}
    for key, tau in _stacked_task_vectors(base, experts, _float_keys(base), drop):
        coeff = torch.tensor(coefficients, dtype=tau.dtype, device=tau.device).view(-1, *[1] * (tau.dim() - 1))
        merged[key] = base[key].to(tau.dtype) + (coeff * tau).sum(0)
    return _assemble(base, merged)


# ---------------------------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------------------------

def _keep_count(density: float, n: int) -> int:
    return min(n, max(1, math.floor(density * n + 0.5)))


def _magnitude_bits(tau: torch.Tensor, select_dtype: torch.dtype) -> torch.Tensor:
    """IEEE bit patterns of ``|tau|`` in ``select_dtype`` as int64, rows flattened: ``[K, n]``."""
    mag = tau.abs().to(select_dtype).reshape(tau.shape[0], -1)
    if select_dtype == torch.float32:
        return mag.view(torch.int32).to(torch.int64)
    return mag.view(torch.int64)


def _kth_largest_magnitude(stream: Callable[[], Iterable[torch.Tensor]], k: int, rows: int,
                           select_dtype: torch.dtype) -> torch.Tensor:
    """Exact k-th largest ``|tau[r]|`` for each row ``r`` over all tensors of ``stream()``.

    Radix select: ``stream()`` is replayed once per 16-bit digit of the magnitudes' bit patterns
    (most significant first), each time histogramming the digit of the entries whose higher bits
    equal the prefix chosen so far. Returns ``[rows]`` values in ``select_dtype`` on the CPU.
    """
    nbits = 32 if select_dtype == torch.float32 else 64
    prefix = torch.zeros(rows, dtype=torch.int64)
    prefix_mask = torch.zeros(rows, dtype=torch.int64)
    remaining = torch.full((rows,), k, dtype=torch.int64)
    row_offset = torch.arange(rows, dtype=torch.int64) * _DIGIT_BINS
    for shift in range(nbits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hist = None
        for tau in stream():
            bits = _magnitude_bits(tau, select_dtype)
            device = bits.device
            match = (bits & prefix_mask.to(device)[:, None]) == prefix.to(device)[:, None]
            digit = ((bits >> shift) & (_DIGIT_BINS - 1)) + row_offset.to(device)[:, None]
            counts = torch.bincount(digit[match], minlength=rows * _DIGIT_BINS)
            hist = counts if hist is None else hist + counts.to(hist.device)
        hist = hist.cpu().view(rows, _DIGIT_BINS)
        # at_least[r, d]: matching entries of row r whose digit is >= d (non-increasing in d).
        at_least = torch.cat([hist.flip(1).cumsum(1).flip(1), torch.zeros(rows, 1, dtype=torch.int64)], 1)
        chosen = (at_least[:, :_DIGIT_BINS] >= remaining[:, None]).sum(1) - 1
        remaining -= at_least.gather(1, (chosen + 1)[:, None]).squeeze(1)
        prefix |= chosen << shift
        prefix_mask |= (_DIGIT_BINS - 1) << shift & _INT64_MAX
    if select_dtype == torch.float32:
        return prefix.to(torch.int32).view(torch.float32)
    return prefix.view(torch.float64)


def _trim_and_elect(tau: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trimmed task vectors ``[K, ...]`` (``|tau_i| >= threshold[i]`` kept) and ``sign(sum_i)``."""
    thr = threshold.to(tau.device).view(-1, *[1] * (tau.dim() - 1))
    trimmed = torch.where(tau.abs().to(thr.dtype) >= thr, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
    return trimmed, torch.sign(trimmed.sum(0))


def _ties(base: StateDict, experts: Sequence[StateDict], scaling: float, density: float, per_tensor: bool,
          drop: tuple[float, int] | None = None) -> dict[str, torch.Tensor]:
    keys = [key for key in _float_keys(base) if base[key].numel() > 0]
    rows = len(experts)

    def stream():
        return _stacked_task_vectors(base, experts, keys, drop)

    # Pass 1: thresholds, per expert (and per tensor with per_tensor).
    thresholds: dict[str, torch.Tensor] = {}
    if per_tensor:
        for key, tau in stream():
            k = _keep_count(density, base[key].numel())
            thresholds[key] = _kth_largest_magnitude(lambda: (tau,), k, rows, tau.dtype)
    elif keys:
        n = sum(base[key].numel() for key in keys)
        select_dtype = torch.float64 if any(base[key].dtype == torch.float64 for key in keys) else torch.float32
        threshold = _kth_largest_magnitude(lambda: (tau for _, tau in stream()), _keep_count(density, n), rows,
                                           select_dtype)
        thresholds = dict.fromkeys(keys, threshold)

    # Pass 2: the majority sign over the whole model, for elements whose summed sign is 0.
    balance = 0
    for key, tau in stream():
        _, sign = _trim_and_elect(tau, thresholds[key])
        balance += int(sign.sum(dtype=torch.int64))
    majority = 1.0 if balance >= 0 else -1.0

    # Pass 3: disjoint mean of the entries that agree with the elected sign.
    merged = {}
    for key, tau in stream():
        trimmed, sign = _trim_and_elect(tau, thresholds[key])
        sign = torch.where(sign == 0, torch.tensor(majority, dtype=sign.dtype, device=sign.device), sign)
        selected = torch.where(sign > 0, trimmed > 0, trimmed < 0)
        total = torch.where(selected, trimmed, torch.zeros((), dtype=tau.dtype, device=tau.device)).sum(0)
        merged_tau = total / selected.sum(0).clamp(min=1)
        merged[key] = base[key].to(tau.dtype) + scaling * merged_tau
    return _assemble(base, merged)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def weight_average(experts: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """Elementwise mean of the experts' weights.

    Args:
        experts: K >= 1 state dicts with the same keys, and per key the same shape and dtype.
    Returns:
        A new state dict in ``experts[0]``'s key order: each float entry ``mean_i experts[i][key]``
        (computed in fp32, fp64 for fp64 entries, cast back to the entry's dtype); non-float
        entries copied from ``experts[0]``.
    Raises:
        TypeError / ValueError: ``experts`` empty or not a sequence of state dicts; mismatched keys,
        shapes or dtypes.
    """
    experts = _expert_list(experts)
    _check_state_dicts(experts[0], "experts[0]", experts[1:], [f"experts[{i}]" for i in range(1, len(experts))])
    merged = {}
    for key in _float_keys(experts[0]):
        dtype = _compute_dtype(experts[0][key].dtype)
        device = experts[0][key].device
        merged[key] = torch.stack([expert[key].to(device=device, dtype=dtype) for expert in experts]).mean(0)
    return _assemble(experts[0], merged)


def task_arithmetic(base: StateDict, experts: Sequence[StateDict], scaling: float = 0.3) -> dict[str, torch.Tensor]:
    """Task arithmetic: ``base + scaling * sum_i (experts[i] - base)``.

    Args:
        base: the pre-trained state dict; float entries of any shape, dtype bf16/fp16/fp32/fp64.
        experts: K >= 1 fine-tuned state dicts with the base's keys, shapes and dtypes.
        scaling: the coefficient lambda (finite real; 0.3 is the usual default).
    Returns:
        A new state dict in the base's key order and dtypes (maths in fp32, fp64 for fp64 entries);
        non-float entries copied from the base.
    Raises:
        TypeError / ValueError: no experts; mismatched keys, shapes or dtypes; non-finite scaling.
    """
    experts = _checked_inputs(base, experts)
    scaling = _real("scaling", scaling)
    return _linear_merge(base, experts, [scaling] * len(experts))


def ties_merging(base: StateDict, experts: Sequence[StateDict], scaling: float = 0.3, density: float = 0.2,
                 per_tensor: bool = False) -> dict[str, torch.Tensor]:
    """TIES-Merging: trim each task vector to its top-``density`` magnitudes, elect signs, disjoint mean.

    See the module docstring for the exact trim, sign-election and tie rules.

    Args:
        base: the pre-trained state dict.
        experts: K >= 1 fine-tuned state dicts with the base's keys, shapes and dtypes.
        scaling: lambda in ``base + scaling * merged_tau`` (finite real).
        density: fraction of entries each expert keeps, in (0, 1]; 1 keeps all.
        per_tensor: take the top ``density`` fraction within each tensor instead of over the
            whole model (the float entries of the whole model).
    Returns:
        A new state dict in the base's key order and dtypes; non-float entries copied from the base.
    Raises:
        TypeError / ValueError: no experts; mismatched keys, shapes or dtypes; density not in
        (0, 1]; non-finite scaling.
    """
    experts = _checked_inputs(base, experts)
    scaling = _real("scaling", scaling)
    density = _density(density)
    return _ties(base, experts, scaling, density, bool(per_tensor))


def dare(base: StateDict, experts: Sequence[StateDict], scaling: float = 0.3, drop_rate: float = 0.5,
         seed: int = 0, ties: bool = False, density: float = 0.2) -> dict[str, torch.Tensor]:
    """DARE: randomly drop task-vector entries, rescale the rest by ``1/(1-drop_rate)``, then merge.

    Args:
        base: the pre-trained state dict.
        experts: K >= 1 fine-tuned state dicts with the base's keys, shapes and dtypes.
        scaling: lambda of the final task arithmetic / TIES step (finite real).
        drop_rate: probability p of dropping each entry, in [0, 1); 0 is plain task arithmetic.
        seed: seed of the ``torch.Generator`` (one per device) drawing the masks; the same seed and
            key order give the same masks.
        ties: merge the rescaled task vectors with TIES-Merging instead of task arithmetic.
        density: TIES trim density, used only with ``ties=True``.
    Returns:
        A new state dict in the base's key order and dtypes; non-float entries copied from the base.
    Raises:
        TypeError / ValueError: no experts; mismatched keys, shapes or dtypes; drop_rate not in
        [0, 1); density not in (0, 1]; non-finite scaling; non-integer seed.
    """
    experts = _checked_inputs(base, experts)
    scaling = _real("scaling", scaling)
    drop_rate = _real("drop_rate", drop_rate)
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    drop = (drop_rate, int(seed))
    if ties:
        return _ties(base, experts, scaling, _density(density), False, drop)
    return _linear_merge(base, experts, [scaling] * len(experts), drop)
