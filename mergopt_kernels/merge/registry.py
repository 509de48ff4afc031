"""Merge methods as configurations of one generalized task arithmetic, registered by name.

As in mergekit (``merge_methods/generalized_task_arithmetic.py``), a method is data: which
options it uses, whether it works on task vectors (``expert - base``) or on the experts'
weights, which sparsification the task vectors get (``"magnitude"``: TIES trim to the top
``density``; ``"dare"``: random drop and rescale) and which consensus combines them
(``"ties"``: sign election and disjoint merge; none: their weighted sum). ``merge_tensors``
runs whatever ``REGISTRY[spec.method]`` says; DARE-TIES is DARE with ``ties=True``, which adds
the magnitude trim and the TIES consensus.
"""

from __future__ import annotations

import dataclasses

TIES_OPTIONS = ("density", "per_tensor", "exact_count", "merge_func", "count_rounding", "zero_sign")


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """One merge method: its options and its place in generalized task arithmetic."""

    name: str
    options: tuple[str, ...]               # the options it uses; any other given option is refused
    task_vectors: bool                     # merges expert - base (needs a base); else averages the experts
    sparsification: str | None = None      # "magnitude" or "dare"
    consensus: str | None = None           # "ties"
    ties_switch: bool = False              # ties=True adds the magnitude trim and TIES consensus

    def uses(self, ties: bool) -> tuple[str, ...]:
        """The options the method uses, with ``ties`` given as it is."""
        return self.options + (TIES_OPTIONS if self.ties_switch and ties else ())

    def uses_ties(self, ties: bool) -> bool:
        """Whether the TIES consensus (with its magnitude trim) runs."""
        return self.consensus == "ties" or (self.ties_switch and ties)


REGISTRY = {method.name: method for method in (
    MergeMethod("weight_average", ("weights",), task_vectors=False),
    MergeMethod("task_arithmetic", ("scaling", "weights"), task_vectors=True),
    MergeMethod("ties", ("scaling", "weights", *TIES_OPTIONS), task_vectors=True, sparsification="magnitude",
                consensus="ties"),
    MergeMethod("dare", ("scaling", "weights", "drop_rate", "seed", "rescale", "ties"), task_vectors=True,
                sparsification="dare", ties_switch=True),
)}
METHODS = tuple(REGISTRY)
