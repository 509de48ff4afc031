"""Merge options: checked once into a ``MergeSpec``; which options each method uses is in ``registry``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

from ..validation import check_choice, check_seed, number_in
from .registry import METHODS, REGISTRY, MergeMethod

Progress = Callable[[Iterable, str, int], Iterable]
MERGE_FUNCS = ("mean", "sum")
RESCALES = ("inverse", "l1", "none")
COUNT_ROUNDINGS = ("nearest", "down")
ZERO_SIGNS = ("majority", "positive")


def _real(name: str, value) -> float:
    return number_in(name, value)


def _per_expert(name: str, value, count: int, check: Callable[[str, object], float]) -> tuple[float, ...]:
    """A number, or a sequence of one number per expert, as a ``count``-tuple of checked floats."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name} must be one number or {count} (one per expert), got {len(value)}")
        return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))
    return (check(name, value),) * count


def _density(name: str, value) -> float:
    return number_in(name, value, 0.0, 1.0, low_open=True)


def _drop_rate(name: str, value) -> float:
    return number_in(name, value, 0.0, 1.0, high_open=True)


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
    count_rounding: str = "nearest"
    zero_sign: str = "majority"
    allow_non_finite: bool = False

    @property
    def method_def(self) -> MergeMethod:
        """The method's configuration in the registry."""
        return REGISTRY[self.method]

    @property
    def uses_ties(self) -> bool:
        """TIES-Merging runs (``ties``, or ``dare`` with ``ties=True``)."""
        return self.method_def.uses_ties(self.ties)

    @property
    def needs_base(self) -> bool:
        """The method works on task vectors (every method but the weight average)."""
        return self.method_def.task_vectors


# option -> its value when not given
OPTION_DEFAULTS = {"scaling": 0.3, "weights": None, "density": 0.2, "per_tensor": False, "exact_count": False,
                   "merge_func": "mean", "drop_rate": 0.5, "seed": 0, "rescale": "inverse", "ties": False,
                   "count_rounding": "nearest", "zero_sign": "majority"}


def merge_spec(method: str, num_experts: int, *, allow_non_finite: bool = False, **options) -> MergeSpec:
    """Check merge options and return a ``MergeSpec`` (see the module docstring for each option).

    An option left out takes its default (``OPTION_DEFAULTS``); an option given (other than
    ``None``) to a method that does not use it (``registry.REGISTRY``; DARE uses the TIES options
    only with ``ties=True``) is refused, for every method alike.

    Args:
        method: one of ``METHODS``.
        num_experts: K >= 1.
        scaling: lambda of ``base + scaling * merged`` (finite real).
        weights: ``None`` (every expert 1) or K finite reals.
        density: TIES keep fraction in (0, 1], one or K values.
        per_tensor / exact_count / merge_func: TIES trim scope, exact keep count, mean or sum.
        count_rounding: TIES keep count ``density * n`` rounded ``"nearest"`` or ``"down"``.
        zero_sign: TIES sign of an element whose weighted sum is 0: the model's ``"majority"``
            sign or ``"positive"``.
        drop_rate: DARE drop probability in [0, 1), one or K values.
        seed: DARE mask seed, an integer in [0, 2**64).
        rescale: DARE rescale of kept entries, ``"inverse"``, ``"l1"`` or ``"none"``.
        ties: DARE followed by TIES instead of task arithmetic.
        allow_non_finite: merge inputs holding NaN or Inf, and write non-finite results,
            instead of raising (module docstring, "Non-finite values").
    Raises:
        TypeError / ValueError naming the argument (an unknown or unused option is a ValueError).
    """
    method = check_choice("method", method, METHODS)
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown merge options {unknown} (accepted: {list(OPTION_DEFAULTS)})")
    used = REGISTRY[method].uses(bool(options.get("ties")))
    unused = [name for name, value in options.items() if name not in used and value is not None]
    if unused:
        raise ValueError(f"{method}{' without ties' if method == 'dare' else ''} does not use {unused}; "
                         f"its options are {list(used)}")
    values = {**OPTION_DEFAULTS, **options}
    (scaling, weights, density, per_tensor, exact_count, merge_func, drop_rate, seed, rescale, ties,
     count_rounding, zero_sign) = (values[name] for name in OPTION_DEFAULTS)
    scaling = _real("scaling", scaling)
    if weights is not None:
        if not isinstance(weights, Sequence) or isinstance(weights, str):
            raise TypeError(f"weights must be None or a sequence of {num_experts} numbers, got {type(weights).__name__}")
        weights = _per_expert("weights", weights, num_experts, _real)
        if method == "weight_average" and sum(weights) == 0:
            raise ValueError(f"weights must not sum to 0 for a weight average, got {list(weights)}")
    density = _per_expert("density", density, num_experts, _density)
    drop_rate = _per_expert("drop_rate", drop_rate, num_experts, _drop_rate)
    seed = check_seed("seed", seed)
    return MergeSpec(method, num_experts, scaling, weights, density, bool(per_tensor), bool(exact_count),
                     check_choice("merge_func", merge_func, MERGE_FUNCS), drop_rate, int(seed),
                     check_choice("rescale", rescale, RESCALES), bool(ties),
                     check_choice("count_rounding", count_rounding, COUNT_ROUNDINGS),
                     check_choice("zero_sign", zero_sign, ZERO_SIGNS), bool(allow_non_finite))
