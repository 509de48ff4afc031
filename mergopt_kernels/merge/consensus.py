"""Consensus of trimmed task vectors: TIES sign election and disjoint merge, over the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..merge_plan import Entry, TensorSource
from .sparsify import MagnitudeTrim
from .spec import MergeSpec, Progress
from .task_vectors import TaskVectors, check_output, chunks, column


def ties_chunks(trim: MagnitudeTrim, spec: MergeSpec, entry: Entry, vectors: TaskVectors):
    """Yield ``(part, base [m], weighted trimmed [K, m], elected sign [m])`` chunk by chunk."""
    ties_seen = torch.zeros(trim.rows, dtype=torch.int64) if spec.exact_count else None
    for part in chunks(entry.numel):
        ref, tau = vectors.chunk(part)
        trimmed = trim.trimmed(entry.key, tau, ties_seen)
        if spec.weights is not None:
            trimmed = column(spec.weights, trimmed) * trimmed
        yield part, ref, trimmed, torch.sign(trimmed.sum(0))


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, majority: float, spec: MergeSpec) -> torch.Tensor:
    """Disjoint mean or sum of the (weighted) trimmed entries agreeing with the elected sign."""
    sign = torch.where(sign == 0, torch.tensor(majority, dtype=sign.dtype, device=sign.device), sign)
    selected = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    zero = torch.zeros((), dtype=trimmed.dtype, device=trimmed.device)
    total = torch.where(selected, trimmed, zero).sum(0)
    if spec.merge_func == "sum":
        return total
    if spec.weights is None:
        return total / selected.sum(0).clamp(min=1)
    divisor = torch.where(selected, column(spec.weights, trimmed), zero).sum(0)
    return total / torch.where(divisor == 0, torch.ones((), dtype=divisor.dtype, device=divisor.device), divisor)


def ties_entries(spec: MergeSpec, base: TensorSource, experts: Sequence[TensorSource], entries: Sequence[Entry],
                  progress: Progress) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Yield ``(entry, merged)`` for the TIES entries (base-held float entries) in order."""
    ties_entries = [e for e in entries if e.merged and e.in_base and e.numel > 0]
    rows = len(experts)

    def vectors(desc: str) -> Iterator[tuple[Entry, TaskVectors]]:
        for entry in progress(ties_entries, desc, len(ties_entries)):
            yield entry, TaskVectors(entry, base, experts, spec)

    def stream(desc: str) -> Iterator[tuple[Entry, torch.Tensor]]:
        for entry, entry_vectors in vectors(desc):
            for part in chunks(entry.numel):
                yield entry, entry_vectors.chunk(part)[1]
            del entry_vectors  # free before the next entry is read

    trim = MagnitudeTrim(spec, ties_entries, stream, rows)
    majority, majority_pass = 1.0, spec.zero_sign == "majority"
    if majority_pass:  # it prepares each entry's trim; otherwise the merging pass does
        # Pass: the majority sign over the whole model, for elements whose summed sign is 0.
        balance = 0
        for entry, entry_vectors in vectors("TIES signs"):
            trim.prepare(entry, entry_vectors)
            for _, _, _, sign in ties_chunks(trim, spec, entry, entry_vectors):
                balance += int(sign.sum(dtype=torch.int64))
            del entry_vectors
        majority = 1.0 if balance >= 0 else -1.0
    for entry, entry_vectors in vectors("merging"):
        if not majority_pass:
            trim.prepare(entry, entry_vectors)
        out = torch.empty(entry.numel, dtype=entry.dtype, device=entry_vectors.experts.device)
        for part, ref, trimmed, sign in ties_chunks(trim, spec, entry, entry_vectors):
            out[part] = ref + spec.scaling * disjoint_merge(trimmed, sign, majority, spec)
            check_output(spec, entry, out[part])
        del entry_vectors
        yield entry, out.view(entry.shape)
