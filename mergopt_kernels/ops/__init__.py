"""Kernels and their launchers. ``fused_step`` dispatches one bucket of tensors to a backend.

Backends, each taking one ``FusedStepArgs`` (``ops/step_args.py``: the step's arguments and
their semantics) and computing the same step on the same noise stream:
- ``"triton"``: the multi-tensor Triton kernel (GPUs; CPU tensors under TRITON_INTERPRET=1),
- ``"native"``: the C++ op of csrc/ (CPU, and CUDA where it was built with CUDA),
- ``"cuda"``: the native op, for CUDA tensors only,
- ``"torch"``: torch tensor ops (any device; slow: the reference implementation of the step),
- ``"auto"``: Triton on GPUs; on the CPU the native op when it is built, else torch.
"""

from __future__ import annotations

import torch

from .step_args import FusedStepArgs

BACKENDS = ("auto", "triton", "native", "cuda", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ("triton", "native" or "torch") that runs tensors on ``device``.

    Raises:
        ValueError: ``backend`` is unknown or cannot run tensors on ``device`` here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cpu":
            from . import triton_step  # noqa: F401  (imported eagerly: compiled steps call it)
            return "triton"
        from . import native
        return "native" if native.available("cpu") else "torch"
    if backend == "triton":
        from . import triton_step
        if device.type == "cpu" and not triton_step.interpreted():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                             "(Triton's interpreter); use backend='auto', 'native' or 'torch'")
    if backend in ("native", "cuda"):
        if backend == "cuda" and device.type != "cuda":
            raise ValueError(f"backend='cuda' runs CUDA tensors only, got tensors on {device}")
        from . import native
        if not native.available(device.type):
            raise ValueError(f"backend={backend!r}: the native op for {device.type} tensors is not "
                             "built (python setup.py build_ext --inplace)")
        return "native"
    return backend


def fused_step(backend: str, args: FusedStepArgs) -> None:
    """Run the fused step of ``args`` on a resolved ``backend`` ("triton", "native" or "torch").
    The Triton backend keeps its address tables itself, in a bounded cache."""
    if backend == "triton":
        from . import triton_step
        if torch.compiler.is_compiling():  # an opaque custom op: torch.compile cannot trace it
            triton_step.fused_step_op(args)
        else:
            triton_step.fused_step(args)
    elif backend == "native":
        from . import native
        native.fused_step(args)
    else:
        from . import torch_step
        torch_step.fused_step(args)
