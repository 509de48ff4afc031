"""Kernels and their launchers. ``fused_step`` dispatches one bucket of tensors to a backend."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs tensors on ``device``: "triton" on GPUs, "torch" on the CPU.

    Raises:
        ValueError: ``backend`` is unknown, or "triton" was asked for CPU tensors while Triton
            is not running through its interpreter (TRITON_INTERPRET=1).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torch" if device.type == "cpu" else "triton"
    if backend == "triton" and device.type == "cpu":
        from . import triton_step
        if not triton_step.interpreted():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                             "(Triton's interpreter); use backend='auto' or 'torch'")
    return backend


def fused_step(backend: str, **kwargs) -> None:
    """Run the fused step of ``ops.torch_step.fused_step`` on the named backend."""
    if backend == "triton":
        from . import triton_step
        triton_step.fused_step(**kwargs)
    else:
        from . import torch_step
        kwargs.pop("cache", None)
        torch_step.fused_step(**kwargs)
