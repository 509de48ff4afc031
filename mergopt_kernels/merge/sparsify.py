"""Sparsification of task vectors: magnitude trim (TIES) and random drop and rescale (DARE).

The rules (thresholds, ties at the threshold, the DARE stream) are in ``mergopt_kernels.merging``'s
docstring.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence

import torch

from .. import noise
from ..merge_plan import Entry
from ..ops import native
from .spec import MergeSpec

_DIGIT_BITS = 16
_DIGIT_BINS = 1 << _DIGIT_BITS


def keep_count(density: float, n: int, rounding: str = "nearest") -> int:
    """Entries an expert keeps of ``n`` at ``density``: ``density * n`` rounded to the nearest
    integer (halves up) or ``"down"`` (mergekit's ``int(density * n)``), at least 1, at most ``n``."""
    kept = math.floor(density * n + 0.5) if rounding == "nearest" else math.floor(density * n)
    return min(n, max(1, kept))


def magnitude_bits(tau: torch.Tensor, select_dtype: torch.dtype) -> torch.Tensor:
    """IEEE bit patterns of ``|tau|`` in ``select_dtype`` (int32 for float32, int64 for float64),
    ``tau`` ``[K, m]``: non-negative, so they order as the magnitudes do."""
    mag = tau.abs().to(select_dtype)
    return mag.view(torch.int32 if select_dtype == torch.float32 else torch.int64)


def kth_largest_magnitude(stream: Callable[[], Iterable[torch.Tensor]], k, rows: int,
                           select_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k[r]``-th largest ``|tau[r]|`` for each row ``r`` over all tensors of ``stream()``.

    Radix select: ``stream()`` (chunks ``[rows, m]``) is replayed once per 16-bit digit of the
    magnitudes' bit patterns (most significant first), each time histogramming the digit of the
    entries whose higher bits equal the prefix chosen so far (the others are counted in one
    spare bin per row, which is dropped). ``k`` is an int or a ``[rows]`` int64 tensor. Returns
    ``(threshold, ties)``, both ``[rows]`` on the CPU: the values in ``select_dtype``, and how
    many entries equal to the threshold are among the ``k[r]`` largest.
    """
    nbits = 32 if select_dtype == torch.float32 else 64
    bins = _DIGIT_BINS + 1  # the digits, then the spare bin of entries off the prefix
    prefix = torch.zeros(rows, dtype=torch.int64)
    remaining = torch.as_tensor(k, dtype=torch.int64).expand(rows).clone()
    for shift in range(nbits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hist = torch.zeros(rows * bins, dtype=torch.int64)
        for tau in stream():
            bits = magnitude_bits(tau, select_dtype)
            row_offset = torch.arange(rows, dtype=bits.dtype, device=bits.device)[:, None] * bins
            digit = (bits >> shift) & (_DIGIT_BINS - 1)
            if shift + _DIGIT_BITS < nbits:  # higher digits chosen: count only the entries on the prefix
                high = (prefix >> (shift + _DIGIT_BITS)).to(bits.dtype).to(bits.device)[:, None]
                digit = torch.where((bits >> (shift + _DIGIT_BITS)) == high, digit, _DIGIT_BINS)
            hist += torch.bincount((digit + row_offset).view(-1), minlength=rows * bins).cpu()
        hist = hist.view(rows, bins)[:, :_DIGIT_BINS]
        # at_least[r, d]: matching entries of row r whose digit is >= d (non-increasing in d).
        at_least = torch.cat([hist.flip(1).cumsum(1).flip(1), torch.zeros(rows, 1, dtype=torch.int64)], 1)
        chosen = (at_least[:, :_DIGIT_BINS] >= remaining[:, None]).sum(1) - 1
        remaining -= at_least.gather(1, (chosen + 1)[:, None]).squeeze(1)
        prefix |= chosen << shift
    if select_dtype == torch.float32:
        return prefix.to(torch.int32).view(torch.float32), remaining
    return prefix.view(torch.float64), remaining


def keeps_all(density: Sequence[float], n: int, rounding: str) -> bool:
    """Whether every expert keeps all ``n`` entries (``density`` 1, as in mergekit's dare_ties)."""
    return all(keep_count(d, n, rounding) == n for d in density)


class MagnitudeTrim:
    """Per-expert thresholds of one TIES merge, and with ``exact_count`` the tie budgets per tensor.

    A threshold of ``None`` keeps every entry but NaN (what the selection gives when the keep
    count is the entry count: the threshold is the smallest magnitude), without selecting."""

    def __init__(self, spec: MergeSpec, entries: Sequence[Entry], stream, rows: int):
        self.spec, self.rows = spec, rows
        self.thresholds: dict[str, torch.Tensor | None] = {}
        self.tie_budget: dict[str, torch.Tensor] = {}
        if spec.per_tensor or not entries:
            return
        n = sum(entry.numel for entry in entries)
        if keeps_all(spec.density, n, spec.count_rounding):
            self.thresholds = dict.fromkeys((e.key for e in entries), None)
            return
        select_dtype = torch.float64 if any(e.compute_dtype == torch.float64 for e in entries) else torch.float32
        k = torch.tensor([keep_count(d, n, spec.count_rounding) for d in spec.density], dtype=torch.int64)
        threshold, ties = kth_largest_magnitude(lambda: (tau for _, tau in stream("TIES threshold")), k, rows,
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

    def prepare(self, entry: Entry, vectors) -> None:
        """Fix the threshold and tie budget of ``entry`` when they are per tensor; call once per entry."""
        if self.spec.per_tensor and keeps_all(self.spec.density, entry.numel, self.spec.count_rounding):
            self.thresholds[entry.key] = None
        elif self.spec.per_tensor:
            k = torch.tensor([keep_count(d, entry.numel, self.spec.count_rounding) for d in self.spec.density],
                             dtype=torch.int64)
            self.thresholds[entry.key], ties = kth_largest_magnitude(vectors.taus, k, self.rows, entry.compute_dtype)
            if self.spec.exact_count:
                self.tie_budget[entry.key] = ties

    def trimmed(self, key: str, chunk: torch.Tensor, ties_seen: torch.Tensor | None) -> torch.Tensor:
        """A chunk ``[K, m]`` of ``key``'s task vectors with the entries below the threshold zeroed.

        With ``exact_count``, ``ties_seen`` ``[K]`` counts the tied entries met in earlier chunks
        (updated in place) and only the first ``tie_budget`` of them are kept.
        """
        device = chunk.device
        if self.thresholds[key] is None:  # every entry kept; NaN only where allowed, as the selection drops it
            if not self.spec.allow_non_finite:
                return chunk
            return torch.where(torch.isnan(chunk), torch.zeros((), dtype=chunk.dtype, device=device), chunk)
        threshold = self.thresholds[key].to(device)[:, None]
        mag = chunk.abs().to(threshold.dtype)
        if self.spec.exact_count:
            keep = mag > threshold
            tied = mag == threshold
            tied_count = tied.sum(1).cpu()
            if bool(tied_count.any()):  # rare: the position order of the tied entries decides
                order = tied.cumsum(1) + ties_seen.to(device)[:, None]
                keep |= tied & (order <= self.tie_budget[key].to(device)[:, None])
                ties_seen += tied_count
        else:
            keep = mag >= threshold
        return torch.where(keep, chunk, torch.zeros((), dtype=chunk.dtype, device=chunk.device))


def element_words(seed: int, param_id: int, step: int, start: int, count: int) -> torch.Tensor:
    """``noise.element_words``, from the native op when it is built (the same words, tested bitwise)."""
    if native.available("cpu") and hasattr(torch.ops.mergopt_kernels, "noise_words"):
        return torch.ops.mergopt_kernels.noise_words(noise.seed_as_int64(seed), param_id, step, start, count)
    return noise.element_words(seed, param_id, step, start, count)


def dare_keep(seed: int, key: str, expert: int, start: int, count: int, drop_rate: float) -> torch.Tensor:
    """Keep mask (bool ``[count]``, CPU) of elements ``start .. start+count-1`` (module docstring)."""
    h = int.from_bytes(hashlib.sha256(f"{expert}:{key}".encode()).digest()[:8], "little")
    words = element_words(seed, h >> 32, h & noise.MASK32, start, count)
    return (words >> 8) >= math.ceil(drop_rate * 2**24)


def dare_drop(spec: MergeSpec, key: str, tau: torch.Tensor, part: slice) -> torch.Tensor:
    """DARE: task vectors ``tau`` ``[K, m]`` of columns ``part`` of ``key`` with the dropped entries
    zeroed and, for ``rescale="inverse"``, the kept ones divided by ``1 - drop_rate``."""
    rows = []
    for i, row in enumerate(tau):
        p = spec.drop_rate[i]
        keep = dare_keep(spec.seed, key, i, part.start, part.stop - part.start, p).to(row.device)
        kept = row / (1.0 - p) if spec.rescale == "inverse" else row
        rows.append(torch.where(keep, kept, torch.zeros((), dtype=row.dtype, device=row.device)))
    return torch.stack(rows)
