"""The noise clock: the stream's seed and t, the step whose perturbation the parameters hold.

t lives in one int64 device tensor per device, so that no step reads it on the host (a step
can be captured in a CUDA graph or compiled); ``value()`` reads it (a sync).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import validation


class NoiseClock:
    """The seed and t (``start`` until a device holds it; then one tensor per device)."""

    def __init__(self, seed: int, start: int = 1):
        self.seed = seed
        self._start = start
        self._steps: dict[torch.device, torch.Tensor] = {}

    def tensor(self, device: torch.device) -> torch.Tensor:
        """The int64 tensor [1] on ``device`` holding t (made from another device's on first use)."""
        if device not in self._steps:
            start = next(iter(self._steps.values())) if self._steps else \
                torch.tensor([self._start], dtype=torch.int64)
            self._steps[device] = start.to(device)
        return self._steps[device]

    def value(self) -> int:
        """t as a number (reads a device tensor: syncs)."""
        return int(next(iter(self._steps.values())).item()) if self._steps else self._start

    def advance(self) -> None:
        """t += 1 on every device, without a host sync."""
        for step in self._steps.values():
            step.add_(1)

    def set(self, seed: int, step: int) -> None:
        """Take a saved seed and t (checked by the caller)."""
        self.seed, self._start = seed, step
        for tensor in self._steps.values():
            tensor.fill_(step)


def resolve_seed(seed: Optional[int]) -> int:
    """A 64-bit seed: the one given, or (``seed=None``) 8 bytes of ``os.urandom``, so that
    torch's and numpy's random streams are left untouched."""
    seed = validation.check_seed("seed", seed, allow_none=True)
    return int.from_bytes(os.urandom(8), "little") if seed is None else seed


def agree_on_seed(seed: int, given: bool) -> int:
    """The seed every rank uses when torch.distributed is initialised (a collective call).

    A drawn seed (``seed=None``) is rank 0's, broadcast; a given seed must be the same on every
    rank, else every rank raises ``ValueError`` naming ``seed``. Without torch.distributed, or
    with one process, ``seed`` itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return seed
    seeds: list = [None] * dist.get_world_size()
    dist.all_gather_object(seeds, (seed, given))
    given_seeds = {s for s, was_given in seeds if was_given}
    if given_seeds and (len(given_seeds) > 1 or not all(was_given for _, was_given in seeds)):
        raise ValueError("seed must be the same on every rank (or None on every rank, then rank 0's "
                         f"drawn seed is used); got seeds per rank {[s if g else None for s, g in seeds]}")
    return seeds[0][0]
