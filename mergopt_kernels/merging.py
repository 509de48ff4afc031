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
      tensor: one 64 MiB fp32 tensor and 3 experts, weight average 4.1x, task arithmetic 5.2x,
      TIES 6.0x to 6.4x (whole model, exact count, per tensor), DARE 5.5x, DARE-TIES 5.9x
      (bound ``3 * (K + 1)`` = 12x); one 32 MiB bf16 tensor and 1 expert, 2.2x to 4.1x (bound
      6x). Inputs are never modified.

TIES-Merging (``ties_merging``)
    1. Trim: expert ``i`` keeps the ``k_i = max(1, floor(density_i * n + 1/2))`` entries of
       ``tau_i`` with the largest magnitude, ``n`` counting the float entries of the whole model
       (default; FusionBench) or of one tensor (``per_tensor=True``; mergekit, which keeps
       ``max(1, int(density * n))``). An entry is kept when ``|tau_i| >= t_i``, ``t_i`` the exact
       ``k_i``-th largest magnitude, so entries tied with ``t_i`` are all kept (FusionBench's rule);
       with ``exact_count=True`` exactly ``k_i`` are kept: of the entries equal to ``t_i``, the
       first ones in sorted key order and then element order (never the inputs' key order).
    2. Elect: ``sign = sign(sum_i w_i trimmed_i)`` per element. Where that sum is 0, the element
       takes the majority sign: the sign of ``(#elements elected +) - (#elements elected -)``
       counted over the whole model (as FusionBench does over its flattened model), +1 on a tie.
       (mergekit takes +1 for each such element; it matters only where nonzero entries cancel.)
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

import dataclasses
import hashlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from . import noise
from .ops import native
from .merge_plan import Entry, MappingSource, TensorSource, _choice, plan_entries

StateDict = Mapping[str, torch.Tensor]
Progress = Callable[[Iterable, str, int], Iterable]

__all__ = ["weight_average", "task_arithmetic", "ties_merging", "dare", "MergeSpec", "merge_spec", "merge_tensors"]

METHODS = ("weight_average", "task_arithmetic", "ties", "dare")
MERGE_FUNCS = ("mean", "sum")
RESCALES = ("inverse", "l1", "none")
CHUNK = 1 << 18            # elements per chunk of the elementwise TIES and DARE work
L1_EPS = 1e-7              # mergekit's threshold for a norm too small to rescale by

_DIGIT_BITS = 16
_DIGIT_BINS = 1 << _DIGIT_BITS
_INT64_MAX = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _per_expert(name: str, value, count: int, check: Callable[[str, object], float]) -> tuple[float, ...]:
    """A number, or a sequence of one number per expert, as a ``count``-tuple of checked floats."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name} must be one number or {count} (one per expert), got {len(value)}")
        return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))
    return (check(name, value),) * count


def _density(name: str, value) -> float:
    value = _real(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _drop_rate(name: str, value) -> float:
    value = _real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """A checked merge configuration (build it with ``merge_spec``)."""

    method: str
    num_experts: int
    scaling: float
    weights: tuple[float, ...] | None
    density: tuple[float, ...]
    per_tensor: bool
    exact_count: bool
    merge_func: str
    drop_rate: tuple[float, ...]
    seed: int
    rescale: str
    ties: bool
    allow_non_finite: bool = False

    @property
    def uses_ties(self) -> bool:
        """TIES-Merging runs (``ties``, or ``dare`` with ``ties=True``)."""
        return self.method == "ties" or (self.method == "dare" and self.ties)

    @property
    def needs_base(self) -> bool:
        """Every method but the weight average works on task vectors."""
        return self.method != "weight_average"


_TIES_OPTIONS = ("density", "per_tensor", "exact_count", "merge_func")
# option -> its value when not given; each method's options; all others are refused for it
OPTION_DEFAULTS = {"scaling": 0.3, "weights": None, "density": 0.2, "per_tensor": False, "exact_count": False,
                   "merge_func": "mean", "drop_rate": 0.5, "seed": 0, "rescale": "inverse", "ties": False}
METHOD_OPTIONS = {"weight_average": ("weights",), "task_arithmetic": ("scaling", "weights"),
                  "ties": ("scaling", "weights", *_TIES_OPTIONS),
                  "dare": ("scaling", "weights", "drop_rate", "seed", "rescale", "ties")}


def merge_spec(method: str, num_experts: int, *, allow_non_finite: bool = False, **options) -> MergeSpec:
    """Check merge options and return a ``MergeSpec`` (see the module docstring for each option).

    An option left out takes its default (``OPTION_DEFAULTS``); an option given (other than
    ``None``) to a method that does not use it (``METHOD_OPTIONS``; DARE uses the TIES options
    only with ``ties=True``) is refused, for every method alike.

    Args:
        method: one of ``METHODS``.
        num_experts: K >= 1.
        scaling: lambda of ``base + scaling * merged`` (finite real).
        weights: ``None`` (every expert 1) or K finite reals.
        density: TIES keep fraction in (0, 1], one or K values.
        per_tensor / exact_count / merge_func: TIES trim scope, exact keep count, mean or sum.
        drop_rate: DARE drop probability in [0, 1), one or K values.
        seed: DARE mask seed, an integer in [0, 2**64).
        rescale: DARE rescale of kept entries, ``"inverse"``, ``"l1"`` or ``"none"``.
        ties: DARE followed by TIES instead of task arithmetic.
        allow_non_finite: merge inputs holding NaN or Inf, and write non-finite results,
            instead of raising (module docstring, "Non-finite values").
    Raises:
        TypeError / ValueError naming the argument (an unknown or unused option is a ValueError).
    """
    method = _choice("method", method, METHODS)
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown merge options {unknown} (accepted: {list(OPTION_DEFAULTS)})")
    used = METHOD_OPTIONS[method] + (_TIES_OPTIONS if method == "dare" and options.get("ties") else ())
    unused = [name for name, value in options.items() if name not in used and value is not None]
    if unused:
        raise ValueError(f"{method}{' without ties' if method == 'dare' else ''} does not use {unused}; "
                         f"its options are {list(used)}")
    values = {**OPTION_DEFAULTS, **options}
    scaling, weights, density, per_tensor, exact_count, merge_func, drop_rate, seed, rescale, ties = (
        values[name] for name in OPTION_DEFAULTS)
    scaling = _real("scaling", scaling)
    if weights is not None:
        if not isinstance(weights, Sequence) or isinstance(weights, str):
            raise TypeError(f"weights must be None or a sequence of {num_experts} numbers, got {type(weights).__name__}")
        weights = _per_expert("weights", weights, num_experts, _real)
        if method == "weight_average" and sum(weights) == 0:
            raise ValueError(f"weights must not sum to 0 for a weight average, got {list(weights)}")
    density = _per_expert("density", density, num_experts, _density)
    drop_rate = _per_expert("drop_rate", drop_rate, num_experts, _drop_rate)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return MergeSpec(method, num_experts, scaling, weights, density, bool(per_tensor), bool(exact_count),
                     _choice("merge_func", merge_func, MERGE_FUNCS), drop_rate, int(seed),
                     _choice("rescale", rescale, RESCALES), bool(ties), bool(allow_non_finite))


# ---------------------------------------------------------------------------------------------
# Task vectors, entry by entry
# ---------------------------------------------------------------------------------------------

def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def _stack(entry: Entry, experts: Sequence[TensorSource], device=None) -> torch.Tensor:
    """``[K, n]`` in the entry's dtype: expert ``i``'s tensor in row ``i``, zeros where it has none.

    On ``device``, or the first holder's device when it is ``None``.
    """
    out = None
    for i in entry.experts:
        value = experts[i].load(entry.key)
        if out is None:
            out = torch.zeros((len(experts), entry.numel), dtype=entry.dtype,
                              device=value.device if device is None else device)
        out[i].copy_(value.reshape(-1))
        del value  # free it before the next read
    if out is None:  # only the base holds the key (keys="union")
        out = torch.zeros((len(experts), entry.numel), dtype=entry.dtype, device=device)
    return out


def _element_words(seed: int, param_id: int, step: int, start: int, count: int) -> torch.Tensor:
    """``noise.element_words``, from the native op when it is built (the same words, tested bitwise)."""
    if native.available("cpu") and hasattr(torch.ops.mergopt_kernels, "noise_words"):
        return torch.ops.mergopt_kernels.noise_words(noise.seed_as_int64(seed), param_id, step, start, count)
    return noise.element_words(seed, param_id, step, start, count)


def _dare_keep(seed: int, key: str, expert: int, start: int, count: int, drop_rate: float) -> torch.Tensor:
    """Keep mask (bool ``[count]``, CPU) of elements ``start .. start+count-1`` (module docstring)."""
    h = int.from_bytes(hashlib.sha256(f"{expert}:{key}".encode()).digest()[:8], "little")
    words = _element_words(seed, h >> 32, h & noise.MASK32, start, count)
    return (words >> 8) >= math.ceil(drop_rate * 2**24)


class _TaskVectors:
    """The task vectors of one entry, made chunk by chunk.

    The experts' tensors are held as one ``[K, n]`` stack in the entry's own dtype (a bf16
    checkpoint stays bf16 in memory), the base as read; ``chunk(part)`` computes the fp32 (fp64)
    task vectors of columns ``part``, with DARE's drop and rescale for ``dare``.
    """

    def __init__(self, entry: Entry, base: TensorSource | None, experts: Sequence[TensorSource], spec: MergeSpec):
        self.entry, self.spec = entry, spec
        self.names = ([base.name] if base is not None else []) + [source.name for source in experts]
        self.base = base.load(entry.key).reshape(-1) if base is not None else None
        self.experts = _stack(entry, experts, self.base.device if self.base is not None else None)
        device = self.experts.device
        rows = len(experts)
        self.present = None if len(entry.experts) == rows else \
            torch.tensor([i in entry.experts for i in range(rows)], device=device)[:, None]
        self.dare = spec.method == "dare"
        self.l1_scale = None
        if self.dare and spec.rescale == "l1":
            before = torch.zeros(rows, dtype=entry.compute_dtype, device=device)
            after = torch.zeros_like(before)
            for part in _chunks(entry.numel):
                _, tau = self._task_vectors(part)
                before += tau.abs().sum(1)
                after += self._drop(tau, part).abs().sum(1)
            self.l1_scale = torch.where((before >= L1_EPS) & (after >= L1_EPS), before / after,
                                        torch.ones((), dtype=before.dtype, device=device))[:, None]

    def _check_finite(self, values: torch.Tensor, part: slice) -> None:
        """Raise naming the input and key when ``values`` (computed from columns ``part``) is not finite."""
        if self.spec.allow_non_finite or bool(torch.isfinite(values).all()):
            return
        inputs = ([self.base[part][None]] if self.base is not None else []) + list(self.experts[:, part][:, None])
        name = next(name for name, x in zip(self.names, inputs) if not bool(torch.isfinite(x).all()))
        raise ValueError(f"{name}[{self.entry.key!r}] holds a non-finite value (NaN or Inf); the merge stops "
                         f"(allow_non_finite=True, --allow-non-finite, merges it anyway)")

    def _task_vectors(self, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        ref = self.base[part].to(self.entry.compute_dtype)
        tau = self.experts[:, part].to(self.entry.compute_dtype) - ref
        if self.present is not None:
            tau = torch.where(self.present, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
        self._check_finite(tau, part)
        return ref, tau

    def _drop(self, tau: torch.Tensor, part: slice) -> torch.Tensor:
        rows = []
        for i, row in enumerate(tau):
            p = self.spec.drop_rate[i]
            keep = _dare_keep(self.spec.seed, self.entry.key, i, part.start, part.stop - part.start, p).to(row.device)
            kept = row / (1.0 - p) if self.spec.rescale == "inverse" else row
            rows.append(torch.where(keep, kept, torch.zeros((), dtype=row.dtype, device=row.device)))
        return torch.stack(rows)

    def chunk(self, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(base ``[m]``, task vectors ``[K, m]``) of columns ``part``, in the compute dtype."""
        ref, tau = self._task_vectors(part)
        if self.dare:
            tau = self._drop(tau, part)
            if self.l1_scale is not None:
                tau = tau * self.l1_scale
        return ref, tau

    def raw_chunk(self, part: slice) -> torch.Tensor:
        """The experts' values ``[K, m]`` of columns ``part`` in the compute dtype."""
        values = self.experts[:, part].to(self.entry.compute_dtype)
        self._check_finite(values, part)
        return values


def _check_output(spec: MergeSpec, entry: Entry, values: torch.Tensor) -> None:
    """Raise naming the key when merged ``values`` (finite inputs) overflowed to Inf or NaN."""
    if not spec.allow_non_finite and not bool(torch.isfinite(values).all()):
        raise ValueError(f"the merged {entry.key!r} is not finite: it overflows {entry.dtype} (scaling "
                         f"{spec.scaling}, weights {list(spec.weights) if spec.weights else 'all 1'}); the merge stops "
                         f"(allow_non_finite=True, --allow-non-finite, writes it anyway)")


def _column(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(weights, dtype=like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))


def _average(entry: Entry, experts: Sequence[TensorSource], spec: MergeSpec) -> torch.Tensor:
    """Mean (weighted: ``sum_i w_i x_i / sum_i w_i``) of the experts holding the entry."""
    values, weights = _TaskVectors(entry, None, experts, spec), spec.weights
    plain = weights is None and len(entry.experts) == len(experts)
    w = [(weights[i] if weights is not None else 1.0) if i in entry.experts else 0.0 for i in range(len(experts))]
    if not plain and sum(w) == 0:
        raise ValueError(f"the weights of the experts holding {entry.key!r} sum to 0: no weighted average")
    out = torch.empty(entry.numel, dtype=entry.dtype, device=values.experts.device)
    for part in _chunks(entry.numel):
        chunk = values.raw_chunk(part)
        out[part] = chunk.mean(0) if plain else (_column(w, chunk) * chunk).sum(0) / sum(w)
        _check_output(spec, entry, out[part])
    return out.view(entry.shape)


def _linear(entry: Entry, base: TensorSource, experts: Sequence[TensorSource], spec: MergeSpec,
            coefficients: Sequence[float] | None = None) -> torch.Tensor:
    """``base + sum_i c_i tau_i`` with ``c_i = scaling * w_i`` unless ``coefficients`` are given."""
    if coefficients is None:
        coefficients = [spec.scaling * (spec.weights[i] if spec.weights is not None else 1.0)
                        for i in range(len(experts))]
    vectors = _TaskVectors(entry, base, experts, spec)
    out = torch.empty(entry.numel, dtype=entry.dtype, device=vectors.experts.device)
    for part in _chunks(entry.numel):
        ref, tau = vectors.chunk(part)
        out[part] = ref + (_column(coefficients, tau) * tau).sum(0)
        _check_output(spec, entry, out[part])
    return out.view(entry.shape)


# ---------------------------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------------------------

def _keep_count(density: float, n: int) -> int:
    return min(n, max(1, math.floor(density * n + 0.5)))


def _magnitude_bits(tau: torch.Tensor, select_dtype: torch.dtype) -> torch.Tensor:
    """IEEE bit patterns of ``|tau|`` in ``select_dtype`` as int64, ``tau`` ``[K, m]``."""
    mag = tau.abs().to(select_dtype)
    if select_dtype == torch.float32:
        return mag.view(torch.int32).to(torch.int64)
    return mag.view(torch.int64)


def _kth_largest_magnitude(stream: Callable[[], Iterable[torch.Tensor]], k, rows: int,
                           select_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k[r]``-th largest ``|tau[r]|`` for each row ``r`` over all tensors of ``stream()``.

    Radix select: ``stream()`` (chunks ``[rows, m]``) is replayed once per 16-bit digit of the
    magnitudes' bit patterns (most significant first), each time histogramming the digit of the
    entries whose higher bits equal the prefix chosen so far. ``k`` is an int or
    a ``[rows]`` int64 tensor. Returns ``(threshold, ties)``, both ``[rows]`` on the CPU: the
    values in ``select_dtype``, and how many entries equal to the threshold are among the
    ``k[r]`` largest.
    """
    nbits = 32 if select_dtype == torch.float32 else 64
    prefix = torch.zeros(rows, dtype=torch.int64)
    prefix_mask = torch.zeros(rows, dtype=torch.int64)
    remaining = torch.as_tensor(k, dtype=torch.int64).expand(rows).clone()
    row_offset = torch.arange(rows, dtype=torch.int64) * _DIGIT_BINS
    for shift in range(nbits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hist = torch.zeros(rows * _DIGIT_BINS, dtype=torch.int64)
        for tau in stream():
            mask_d, prefix_d, offset_d = (x.to(tau.device)[:, None] for x in (prefix_mask, prefix, row_offset))
            bits = _magnitude_bits(tau, select_dtype)
            match = (bits & mask_d) == prefix_d
            digit = ((bits >> shift) & (_DIGIT_BINS - 1)) + offset_d
            hist += torch.bincount(digit[match], minlength=rows * _DIGIT_BINS).cpu()
        hist = hist.view(rows, _DIGIT_BINS)
        # at_least[r, d]: matching entries of row r whose digit is >= d (non-increasing in d).
        at_least = torch.cat([hist.flip(1).cumsum(1).flip(1), torch.zeros(rows, 1, dtype=torch.int64)], 1)
        chosen = (at_least[:, :_DIGIT_BINS] >= remaining[:, None]).sum(1) - 1
        remaining -= at_least.gather(1, (chosen + 1)[:, None]).squeeze(1)
        prefix |= chosen << shift
        prefix_mask |= (_DIGIT_BINS - 1) << shift & _INT64_MAX
    if select_dtype == torch.float32:
        return prefix.to(torch.int32).view(torch.float32), remaining
    return prefix.view(torch.float64), remaining


class _Trim:
    """Per-expert thresholds of one TIES merge, and with ``exact_count`` the tie budgets per tensor."""

    def __init__(self, spec: MergeSpec, entries: Sequence[Entry], stream, rows: int):
        self.spec, self.rows = spec, rows
        self.thresholds: dict[str, torch.Tensor] = {}
        self.tie_budget: dict[str, torch.Tensor] = {}
        if spec.per_tensor or not entries:
            return
        n = sum(entry.numel for entry in entries)
        select_dtype = torch.float64 if any(e.compute_dtype == torch.float64 for e in entries) else torch.float32
        k = torch.tensor([_keep_count(d, n) for d in spec.density], dtype=torch.int64)
        threshold, ties = _kth_largest_magnitude(lambda: (tau for _, tau in stream("TIES threshold")), k, rows,
                                                 select_dtype)
        self.thresholds = dict.fromkeys((e.key for e in entries), threshold)
        if spec.exact_count:
            # The entries tied with the threshold are shared out in sorted key order, so that the
            # kept ones never depend on the order in which the inputs list their keys.
            equal = dict.fromkeys(self.thresholds, 0)
            for entry, tau in stream("TIES ties"):
                equal[entry.key] = equal[entry.key] + (tau.abs().to(threshold.dtype) == threshold[:, None].to(
                    tau.device)).sum(1).cpu()
            for key in sorted(equal):
                self.tie_budget[key] = torch.minimum(ties, torch.as_tensor(equal[key], dtype=torch.int64))
                ties = ties - self.tie_budget[key]

    def prepare(self, entry: Entry, vectors: _TaskVectors) -> None:
        """Fix the threshold and tie budget of ``entry`` when they are per tensor; call once per entry."""
        def taus():
            return (vectors.chunk(part)[1] for part in _chunks(entry.numel))

        if self.spec.per_tensor:
            k = torch.tensor([_keep_count(d, entry.numel) for d in self.spec.density], dtype=torch.int64)
            self.thresholds[entry.key], ties = _kth_largest_magnitude(taus, k, self.rows, entry.compute_dtype)
            if self.spec.exact_count:
                self.tie_budget[entry.key] = ties

    def trimmed(self, key: str, chunk: torch.Tensor, ties_seen: torch.Tensor | None) -> torch.Tensor:
        """A chunk ``[K, m]`` of ``key``'s task vectors with the entries below the threshold zeroed.

        With ``exact_count``, ``ties_seen`` ``[K]`` counts the tied entries met in earlier chunks
        (updated in place) and only the first ``tie_budget`` of them are kept.
        """
        device = chunk.device
        threshold = self.thresholds[key].to(device)[:, None]
        mag = chunk.abs().to(threshold.dtype)
        if self.spec.exact_count:
            tied = mag == threshold
            order = tied.cumsum(1) + ties_seen.to(device)[:, None]
            keep = (mag > threshold) | (tied & (order <= self.tie_budget[key].to(device)[:, None]))
            ties_seen += tied.sum(1).cpu()
        else:
            keep = mag >= threshold
        return torch.where(keep, chunk, torch.zeros((), dtype=chunk.dtype, device=chunk.device))


def _ties_chunks(trim: _Trim, spec: MergeSpec, entry: Entry, vectors: _TaskVectors):
    """Yield ``(part, base [m], weighted trimmed [K, m], elected sign [m])`` chunk by chunk."""
    ties_seen = torch.zeros(trim.rows, dtype=torch.int64) if spec.exact_count else None
    for part in _chunks(entry.numel):
        ref, tau = vectors.chunk(part)
        trimmed = trim.trimmed(entry.key, tau, ties_seen)
        if spec.weights is not None:
            trimmed = _column(spec.weights, trimmed) * trimmed
        yield part, ref, trimmed, torch.sign(trimmed.sum(0))


def _ties_merge(trimmed: torch.Tensor, sign: torch.Tensor, majority: float, spec: MergeSpec) -> torch.Tensor:
    """Disjoint mean or sum of the (weighted) trimmed entries agreeing with the elected sign."""
    sign = torch.where(sign == 0, torch.tensor(majority, dtype=sign.dtype, device=sign.device), sign)
    selected = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    zero = torch.zeros((), dtype=trimmed.dtype, device=trimmed.device)
    total = torch.where(selected, trimmed, zero).sum(0)
    if spec.merge_func == "sum":
        return total
    if spec.weights is None:
        return total / selected.sum(0).clamp(min=1)
    divisor = torch.where(selected, _column(spec.weights, trimmed), zero).sum(0)
    return total / torch.where(divisor == 0, torch.ones((), dtype=divisor.dtype, device=divisor.device), divisor)


def _ties_entries(spec: MergeSpec, base: TensorSource, experts: Sequence[TensorSource], entries: Sequence[Entry],
                  progress: Progress) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Yield ``(entry, merged)`` for the TIES entries (base-held float entries) in order."""
    ties_entries = [e for e in entries if e.merged and e.in_base and e.numel > 0]
    rows = len(experts)

    def vectors(desc: str) -> Iterator[tuple[Entry, _TaskVectors]]:
        for entry in progress(ties_entries, desc, len(ties_entries)):
            yield entry, _TaskVectors(entry, base, experts, spec)

    def stream(desc: str) -> Iterator[tuple[Entry, torch.Tensor]]:
        for entry, entry_vectors in vectors(desc):
            for part in _chunks(entry.numel):
                yield entry, entry_vectors.chunk(part)[1]
            del entry_vectors  # free before the next entry is read

    trim = _Trim(spec, ties_entries, stream, rows)
    # Pass: the majority sign over the whole model, for elements whose summed sign is 0.
    balance = 0
    for entry, entry_vectors in vectors("TIES signs"):
        trim.prepare(entry, entry_vectors)
        for _, _, _, sign in _ties_chunks(trim, spec, entry, entry_vectors):
            balance += int(sign.sum(dtype=torch.int64))
        del entry_vectors
    majority = 1.0 if balance >= 0 else -1.0
    for entry, entry_vectors in vectors("merging"):
        out = torch.empty(entry.numel, dtype=entry.dtype, device=entry_vectors.experts.device)
        for part, ref, trimmed, sign in _ties_chunks(trim, spec, entry, entry_vectors):
            out[part] = ref + spec.scaling * _ties_merge(trimmed, sign, majority, spec)
            _check_output(spec, entry, out[part])
        del entry_vectors
        yield entry, out.view(entry.shape)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _no_progress(items: Iterable, desc: str, total: int) -> Iterable:
    return items


def merge_tensors(spec: MergeSpec, base: TensorSource | None, experts: Sequence[TensorSource],
                  entries: Sequence[Entry], progress: Progress | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for every planned entry, in order: the merge itself.

    Args:
        spec: from ``merge_spec``; ``spec.num_experts == len(experts)``.
        base: the base source (``None`` only for a weight average).
        experts: the expert sources.
        entries: ``merge_plan.plan_entries(base, experts, ...)``.
        progress: ``progress(items, description, total)`` wrapping each pass over entries (a
            progress bar); TIES makes 2 to 6 passes, the other methods one.
    Yields:
        Each output tensor in its entry's dtype and shape, on the base's device (the first
        holder's for entries without a base).
    """
    progress = progress or _no_progress
    ties = iter(_ties_entries(spec, base, experts, entries, progress)) if spec.uses_ties else None
    items = entries if ties is not None else progress(entries, "merging", len(entries))
    for entry in items:
        if not entry.merged:
            value = entry.copy_from.load(entry.key).clone()
        elif not spec.needs_base or not entry.in_base:
            value = _average(entry, experts, spec)
        elif ties is not None and entry.numel > 0:
            _, value = next(ties)
        else:
            value = _linear(entry, base, experts, spec)
        yield entry.key, value.to(entry.dtype)
        del value  # free before the next entry is made
    if ties is not None:
        next(ties, None)  # run the TIES generator to its end, which closes its progress bar


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
        value = _linear(entry, base_source, expert_sources, spec, coefficients) if entry.merged else base[entry.key].clone()
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
        (``non_float="base"`` takes ``experts[0]``'s here.)
    Returns:
        A new state dict in ``experts[0]``'s key order: each float entry the mean (computed in
        fp32, fp64 for fp64 entries, cast back to the entry's dtype); non-float entries copied.
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
        {inputs}
    Returns:
        A new state dict in the base's key order and dtypes; non-float entries copied from the base.
    Raises:
        TypeError / ValueError: no experts; mismatched keys, shapes, dtypes or non-float entries;
        density not in (0, 1]; non-finite scaling; unknown merge_func.
    """
    return _merge_state_dicts("ties", base, experts, keys, non_float, promote_dtypes, scaling=scaling,
                              density=density, per_tensor=per_tensor, weights=weights, exact_count=exact_count,
                              merge_func=merge_func, allow_non_finite=allow_non_finite)


def dare(base: StateDict, experts: Sequence[StateDict], scaling: float = 0.3,
         drop_rate: float | Sequence[float] = 0.5, seed: int = 0, ties: bool = False,
         density: float | Sequence[float] | None = None, *, weights: Sequence[float] | None = None,
         rescale: str = "inverse", per_tensor: bool | None = None, exact_count: bool | None = None,
         merge_func: str | None = None, keys: str = "strict",
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
        per_tensor / exact_count / merge_func: TIES options (defaults ``False``, ``False``,
            ``"mean"``), only with ``ties=True`` (refused without).
        {inputs}
    Returns:
        A new state dict in the base's key order and dtypes; non-float entries copied from the base.
    Raises:
        TypeError / ValueError: no experts; mismatched keys, shapes, dtypes or non-float entries;
        drop_rate not in [0, 1); density not in (0, 1]; non-finite scaling; seed not an integer
        in [0, 2**64).
    """
    tie_options = {name: value for name, value in zip(_TIES_OPTIONS, (density, per_tensor, exact_count, merge_func))
                   if value is not None}
    return _merge_state_dicts("dare", base, experts, keys, non_float, promote_dtypes, scaling=scaling,
                              drop_rate=drop_rate, seed=seed, ties=ties, weights=weights, rescale=rescale,
                              allow_non_finite=allow_non_finite, **tie_options)


for _function in (weight_average, task_arithmetic, ties_merging, dare):
    _function.__doc__ = _function.__doc__.replace("{inputs}", _INPUT_DOC)
del _function
