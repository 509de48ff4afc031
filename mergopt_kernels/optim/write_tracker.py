"""The write tracker: which parameters were written by someone else since the optimizer last
wrote them (then they hold clean theta, from which no noise may be subtracted).

Every in-place write through a tensor (or a view of it) bumps its version counter. The tracker
keeps each parameter's counter right after the optimizer's own writes; any other value means an
outside write: ``load_state_dict``, ``copy_``, torch.distributed.checkpoint's ``set_state_dict``.
Under torch.compile a step cannot read the counters (its graph cannot branch on them): the
tracker then knows nothing (``known`` False) until the next eager write.
"""

from __future__ import annotations

import torch

from .layouts import DTensor, local_tensor


def version_of(p: torch.Tensor):
    """``p``'s version counter; for a DTensor with its local shard's too (torch.distributed.checkpoint
    loads write the shards)."""
    if DTensor is not None and isinstance(p, DTensor):
        return p._version, local_tensor(p)._version
    return p._version


class WriteTracker:
    """Version counters after the optimizer's writes, and what ``load_state_dict`` wrote.

    ``loaded``: parameter -> a copy of what ``load_state_dict()`` wrote into it, kept until the
    next check: torch.distributed.checkpoint's ``set_state_dict`` loads the optimizer, then copies
    the model state dict into the parameters, and when that state dict aliases them
    (``get_state_dict``'s does) the copy rewrites the same values: not a new theta.
    """

    def __init__(self):
        self._written: dict = {}
        self.known = True
        self._loaded: dict = {}

    def record(self, params: list) -> None:
        """The optimizer has just written ``params`` (all it updates): note their counters. In a
        compiled step they cannot be read: nothing is known until the next eager record."""
        if torch.compiler.is_compiling():
            self.known = False
            return
        self._written = {p: version_of(p) for p in params}
        self.known = True

    def record_one(self, p: torch.Tensor) -> None:
        """``p`` was written by the optimizer (or is taken as written): note its counter."""
        self._written[p] = version_of(p)

    def forget(self, p: torch.Tensor) -> None:
        self._written.pop(p, None)

    def record_loaded(self, params: list) -> None:
        """``load_state_dict`` wrote ``params``: an identical rewrite before the next check is not
        an outside write."""
        self._loaded = {p: local_tensor(p).detach().clone() for p in params}

    def outside_writes(self, params: list) -> list:
        """The ``params`` written from outside since the optimizer last wrote them (none while
        compiling or unknown), forgetting what ``load_state_dict`` wrote; a rewrite of those
        same values is taken as the optimizer's."""
        if torch.compiler.is_compiling() or not self.known:
            return []
        loaded, self._loaded = self._loaded, {}
        changed = []
        for p in params:
            if self._written.get(p) == version_of(p):
                continue
            if p in loaded and torch.equal(local_tensor(p), loaded[p]):
                self.record_one(p)
            else:
                changed.append(p)
        return changed

    def was_written(self, p: torch.Tensor) -> bool:
        """Whether ``p`` was written from outside since the optimizer last wrote it (False when
        unknown); reads nothing else."""
        return self.known and self._written.get(p) != version_of(p)

    def __getstate__(self) -> dict:
        """A copy keeps which parameters were written from outside (by reference: the copy's
        own parameters in a deepcopy with them); its counters are re-read on arrival."""
        return {"written_since": [p for p in self._written if self.was_written(p)], "known": self.known,
                "params": list(self._written)}

    def __setstate__(self, state: dict) -> None:
        written_since = {id(p) for p in state["written_since"]}
        self._written = {p: version_of(p) for p in state["params"] if id(p) not in written_since}
        self._loaded = {}
        self.known = state["known"]

