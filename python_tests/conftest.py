"""Shared fixtures. Triton runs through its interpreter when no GPU is present, so the Triton
kernels are tested on CPU tensors too. Nothing here touches CUDA at import time beyond asking
whether it is available."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _cases():
    cases = [("cpu", "torch"), ("cpu", "triton")]
    if torch.cuda.is_available():
        cases.append(("cuda", "triton"))
    return cases


@pytest.fixture(params=_cases(), ids=lambda case: f"{case[0]}-{case[1]}")
def device_backend(request):
    """(device, backend) pairs this machine can run."""
    return request.param


@pytest.fixture
def fresh_seed():
    """A fresh 64-bit seed per test run (printed on failure through the test's repr)."""
    return int.from_bytes(os.urandom(8), "little")
