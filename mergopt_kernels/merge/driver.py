"""The merge itself: every planned entry made by its method's configuration (``registry``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from ..merge_plan import Entry, TensorSource
from .consensus import ties_entries
from .spec import MergeSpec, Progress
from .task_vectors import average, linear


def no_progress(items: Iterable, desc: str, total: int) -> Iterable:
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
    progress = progress or no_progress
    ties = iter(ties_entries(spec, base, experts, entries, progress)) if spec.uses_ties else None
    items = entries if ties is not None else progress(entries, "merging", len(entries))
    for entry in items:
        if not entry.merged:
            value = entry.copy_from.load(entry.key).clone()
        elif not spec.needs_base or not entry.in_base:
            value = average(entry, experts, spec)
        elif ties is not None and entry.numel > 0:
            _, value = next(ties)
        else:
            value = linear(entry, base, experts, spec)
        yield entry.key, value.to(entry.dtype)
        del value  # free before the next entry is made
    if ties is not None:
        next(ties, None)  # run the TIES generator to its end, which closes its progress bar
