"""The ledger: which parameters hold which perturbation.

A parameter is *noisy* when its group's ``noise_scale`` is not 0 and it requires grad; the
others (frozen ones included) are never perturbed. The rules:

- ``active``: the optimizer keeps ``theta_t + s_t z_t`` in its noisy parameters between steps
  (from construction on; False after ``remove_perturbation()`` until the next ``step()`` or
  ``apply_perturbation()``).
- ``held``: the tensors that hold the perturbation now. Only these are ever restored: a
  parameter written from outside, frozen or unfrozen since the last write, or added later,
  holds clean theta and is never restored.
- ``applied``: group index -> the noise options that wrote the perturbation its held tensors
  hold; restores use them, so options changed between steps are undone cleanly.
- ``clean_blocks``: how many ``clean_weights()`` blocks are open (``step()`` refuses to run
  inside one); ``cleaning``: one is open on an active optimizer, which perturbs again on exit.
"""

from __future__ import annotations

import torch


class Ledger:
    def __init__(self):
        self.active = False
        self._held: dict = {}  # an ordered set of tensors
        self.applied: dict[int, dict] = {}
        self.clean_blocks = 0
        self.cleaning = False

    def holds(self, t: torch.Tensor) -> bool:
        return t in self._held

    def held(self) -> list:
        """The tensors that hold the perturbation, in the order they took it."""
        return list(self._held)

    def hold(self, tensors) -> None:
        for t in tensors:
            self._held[t] = True

    def release(self, tensors) -> None:
        for t in tensors:
            self._held.pop(t, None)

    def release_all(self) -> None:
        self._held = {}

    def follow_group_indices(self, old_index_of: dict, group_ids: list) -> None:
        """The param groups were dropped or reordered (the same dicts): the options of the
        perturbation each holds follow it. ``old_index_of``: group id -> its former index."""
        self.applied = {new: self.applied[old_index_of[group_id]] for new, group_id in enumerate(group_ids)
                        if old_index_of.get(group_id) in self.applied}
