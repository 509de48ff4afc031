"""Loader of the optional native library ``mergopt_kernels._C`` (csrc/, built by setup.py).

It registers ``torch.ops.mergopt_kernels.fused_step`` for CPU tensors and, where it was built
with CUDA, for CUDA tensors; the schema and semantics are those of ``ops/torch_step.fused_step``,
except that ``seed`` must be an int64: pass ``noise.seed_as_int64(seed)`` (the same 64 bits,
two's-complement). Nothing is loaded at import time; the first ``available()`` or ``fused_step``
call loads the library, and if it is missing warns once and reports it unavailable.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

from .. import noise

_LOCK = threading.Lock()
_STATE: dict = {}  # "loaded": bool, "devices": frozenset of device types with a kernel
_OP_NAME = "mergopt_kernels::fused_step"


def _library_path() -> Path | None:
    package_dir = Path(__file__).resolve().parent.parent
    candidates = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    return candidates[0] if candidates else None


def _register_fake() -> None:
    @torch.library.register_fake(_OP_NAME)
    def _fused_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, param_ids,
                         index_bases, seed, noise_step, lr, beta1, beta2, eps, weight_decay, amsgrad,
                         maximize, noise_loc, noise_scale, alphas, k_max, distribution, restore,
                         apply_offset):
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


def fused_step(**kwargs) -> None:
    """``torch.ops.mergopt_kernels.fused_step`` with the keyword arguments of ``torch_step.fused_step``.

    ``seed`` may be any integer in [0, 2**64); ``lr`` a Python float or a 1-element tensor read here.
    """
    if not _load()["loaded"]:
        raise RuntimeError("mergopt_kernels native library is not available")
    kwargs["seed"] = noise.seed_as_int64(kwargs["seed"])
    kwargs["lr"] = float(kwargs["lr"])
    kwargs["grads"] = list(kwargs["grads"])
    torch.ops.mergopt_kernels.fused_step(**kwargs)
