"""Inputs of a merge: tensor sources, and the plan of output entries with every check done up front.

A *source* is one model's tensors, read key by key: an in-memory state dict
(``MappingSource``) or a checkpoint on disk (``merge_io.SafetensorsSource``). The merge
functions only ever call ``keys()``, ``meta(key)`` and ``load(key)``, so a merge from disk and
a merge of the same tensors in memory run the same code and give the same bits.

``plan_entries`` decides, before any float tensor is read, which keys the output holds and how
each is made, and raises on every mismatch it is not told how to resolve:

* keys (``keys=``): ``"strict"`` (default) requires every input to have the reference's keys
  (``ValueError`` listing the missing and unexpected ones); ``"intersection"`` keeps the keys
  every input has; ``"union"`` keeps every key of any input. Under ``"union"`` an expert without
  a key counts as equal to the base there (zero task vector; left out of a weight average), and
  a key the base lacks is the (weighted) average of the experts that have it.
* shapes must agree (``ValueError``).
* dtypes: a float entry that is not float in another input is a ``TypeError``; differing float
  dtypes are a ``TypeError`` unless ``promote_dtypes=True``, which merges and writes the entry
  in ``torch.promote_types`` of the inputs' dtypes.
* non-float entries (integer counters, position ids, bool masks) are not merged: they must be
  equal in every input that has them (``ValueError`` naming the key), or with
  ``non_float="base"`` they are taken from the reference (the base; ``experts[0]`` for a weight
  average) without comparison.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from .validation import check_choice

KEY_POLICIES = ("strict", "intersection", "union")
NON_FLOAT_POLICIES = ("error", "base")


class TensorSource(Protocol):
    """One model's tensors, read key by key (see the module docstring)."""

    name: str

    def keys(self) -> list[str]:
        """The keys, in the model's order."""

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of ``key`` without reading its data."""

    def load(self, key: str) -> torch.Tensor:
        """The tensor of ``key`` (the caller does not modify it)."""


class MappingSource:
    """A state dict (``Mapping`` name -> tensor) as a ``TensorSource``; values are checked here."""

    def __init__(self, state: Mapping, name: str):
        if not isinstance(state, Mapping):
            raise TypeError(f"{name} must be a state dict (a mapping name -> tensor), got {type(state).__name__}")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(value).__name__}")
        self.state = state
        self.name = name

    def keys(self) -> list[str]:
        """The state dict's keys in its order."""
        return list(self.state)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of ``state[key]``."""
        value = self.state[key]
        return tuple(value.shape), value.dtype

    def load(self, key: str) -> torch.Tensor:
        """``state[key]`` itself (never modified by the merge)."""
        return self.state[key]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One output entry: its key, shape and dtype, and which inputs hold it.

    ``merged``: a float entry, merged (else a non-float entry copied from ``copy_from``).
    ``in_base``: the base holds the key. ``experts``: positions of the experts holding it.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    merged: bool
    in_base: bool
    experts: tuple[int, ...]
    copy_from: TensorSource | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp64 for fp64 entries, else fp32: the dtype the merge arithmetic runs in."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32


def _key_list(keys: Sequence[str]) -> str:
    return f"{list(keys[:5])}{'...' if len(keys) > 5 else ''}"


def _output_keys(reference: TensorSource, others: Sequence[TensorSource], key_policy: str) -> list[str]:
    ref_keys = reference.keys()
    other_keys = [set(source.keys()) for source in others]
    if key_policy == "strict":
        wanted = set(ref_keys)
        for source, keys in zip(others, other_keys):
            if keys != wanted:
                missing = [key for key in ref_keys if key not in keys]
                extra = [key for key in source.keys() if key not in wanted]
                raise ValueError(f"{source.name} does not have the keys of {reference.name}: missing "
                                 f"{_key_list(missing)}, unexpected {_key_list(extra)} (keys='intersection' "
                                 f"or keys='union' merges anyway)")
        return ref_keys
    if key_policy == "intersection":
        return [key for key in ref_keys if all(key in keys for keys in other_keys)]
    out, seen = [], set()
    for source in (reference, *others):
        for key in source.keys():
            if key not in seen:
                seen.add(key)
                out.append(key)
    return out


def _entry_dtype(key: str, holders: Sequence[TensorSource], metas, promote: bool) -> torch.dtype:
    first, (_, dtype) = holders[0], metas[0]
    floats = [meta[1].is_floating_point for meta in metas]
    for source, (_, other) in zip(holders[1:], metas[1:]):
        if other == dtype:
            continue
        if other.is_floating_point != dtype.is_floating_point or not all(floats):
            raise TypeError(f"{source.name}[{key!r}] has dtype {other}, {first.name}[{key!r}] has {dtype}: "
                            f"a float entry cannot be merged with a non-float one")
        if not promote:
            raise TypeError(f"{source.name}[{key!r}] has dtype {other}, {first.name}[{key!r}] has {dtype} "
                            f"(promote_dtypes=True merges in the promoted dtype)")
        dtype = torch.promote_types(dtype, other)
    return dtype


def _check_non_float(key: str, holders: Sequence[TensorSource]) -> None:
    first = holders[0].load(key)
    for source in holders[1:]:
        if not torch.equal(source.load(key), first):
            raise ValueError(f"non-float entry {key!r} differs between {holders[0].name} and {source.name}; "
                             f"it cannot be merged (non_float='base' takes {holders[0].name}'s)")


def plan_entries(base: TensorSource | None, experts: Sequence[TensorSource], key_policy: str = "strict",
                 non_float: str = "error", promote_dtypes: bool = False) -> list[Entry]:
    """Check the inputs and list the output entries in order (see the module docstring).

    Args:
        base: the base model, or ``None`` for a weight average (``experts[0]`` is the reference).
        experts: K >= 1 sources.
        key_policy: ``"strict"``, ``"intersection"`` or ``"union"``.
        non_float: ``"error"`` (differing non-float entries raise) or ``"base"``.
        promote_dtypes: merge differing float dtypes in their promoted dtype instead of raising.
    Returns:
        One ``Entry`` per output key, in the reference's key order (then keys only others have).
    Raises:
        ValueError / TypeError naming the input and key, before any float tensor is read.
    """
    key_policy = check_choice("keys", key_policy, KEY_POLICIES)
    non_float = check_choice("non_float", non_float, NON_FLOAT_POLICIES)
    inputs = ([base] if base is not None else []) + list(experts)
    reference = inputs[0]
    key_sets = [set(source.keys()) for source in inputs]
    entries = []
    for key in _output_keys(reference, inputs[1:], key_policy):
        holders = [source for source, keys in zip(inputs, key_sets) if key in keys]
        metas = [source.meta(key) for source in holders]
        for source, (shape, _) in zip(holders[1:], metas[1:]):
            if shape != metas[0][0]:
                raise ValueError(f"{source.name}[{key!r}] has shape {shape}, {holders[0].name}[{key!r}] "
                                 f"has {metas[0][0]}")
        dtype = _entry_dtype(key, holders, metas, promote_dtypes)
        merged = dtype.is_floating_point
        if not merged and non_float == "error":
            _check_non_float(key, holders)
        in_base = base is not None and key in key_sets[0]
        offset = 1 if base is not None else 0
        expert_ids = tuple(i for i, keys in enumerate(key_sets[offset:]) if key in keys)
        entries.append(Entry(key, tuple(metas[0][0]), dtype, merged, in_base, expert_ids,
                             None if merged else holders[0]))
    return entries
