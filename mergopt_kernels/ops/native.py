"""Loader of the optional native library ``mergopt_kernels._C`` (csrc/, built by setup.py).

It registers ``torch.ops.mergopt_kernels.fused_step`` for CPU tensors and, where it was built
with CUDA, for CUDA tensors; its schema is ``step_args.op_schema()`` (the fields of
``FusedStepArgs`` in order) and ``fused_step(args)`` calls it with ``step_args.op_arguments``
(``seed`` as its int64, ``lr`` a float). Nothing is loaded at import time; the first
``available()`` or ``fused_step`` call loads the library, and if it is missing warns once and
reports it unavailable.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

from . import step_args
from .step_args import FusedStepArgs

_LOCK = threading.Lock()
_STATE: dict = {}  # "loaded": bool, "devices": frozenset of device types with a kernel
_OP_NAME = "mergopt_kernels::fused_step"


def _library_path() -> Path | None:
    package_dir = Path(__file__).resolve().parent.parent
    candidates = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    return candidates[0] if candidates else None


def _register_fake() -> None:
    @torch.library.register_fake(_OP_NAME)
    def _fused_step_fake(*args, **kwargs):
        return None


def _load() -> dict:
    if _STATE:  # loaded (or found missing) already: no lock, so torch.compile traces through
        return _STATE
    with _LOCK:
        if _STATE:
            return _STATE
        path = _library_path()
        error = "it is not built (python setup.py build_ext --inplace)" if path is None else None
        if path is not None:
            try:
                torch.ops.load_library(str(path))
                _register_fake()
            except (OSError, RuntimeError) as exc:
                error = f"loading {path.name} failed: {exc}"
        if error is not None:
            warnings.warn(f"mergopt_kernels: native library unavailable, {error}; "
                          "using the Triton/torch implementations", RuntimeWarning, stacklevel=3)
            _STATE.update(loaded=False, devices=frozenset())
            return _STATE
        devices = {"cpu"}
        if torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, "CUDA"):
            devices.add("cuda")
        _STATE.update(loaded=True, devices=frozenset(devices))
        return _STATE


def available(device_type: str = "cpu") -> bool:
    """Whether the native fused step runs tensors of ``device_type`` ("cpu" or "cuda")."""
    return device_type in _load()["devices"]


def fused_step(args: FusedStepArgs) -> None:
    """``torch.ops.mergopt_kernels.fused_step`` over ``args`` (see ``FusedStepArgs``; a tensor
    ``lr`` is read here, on the host)."""
    if not _load()["loaded"]:
        raise RuntimeError("mergopt_kernels native library is not available")
    torch.ops.mergopt_kernels.fused_step(*step_args.op_arguments(args))
