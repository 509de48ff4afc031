"""Shared fixtures. Triton runs through its interpreter when no GPU is present, so the Triton
kernels are tested on CPU tensors too. Nothing here touches CUDA at import time beyond asking
whether it is available."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _cases():
    from mergopt_kernels.ops import native

    cases = [("cpu", "torch"), ("cpu", "triton")]
    if native.available("cpu"):
        cases.append(("cpu", "native"))
    if torch.cuda.is_available():
        cases.append(("cuda", "triton"))
        if native.available("cuda"):
            cases.append(("cuda", "native"))
    return cases


@pytest.fixture(params=_cases(), ids=lambda case: f"{case[0]}-{case[1]}")
def device_backend(request):
    """(device, backend) pairs this machine can run."""
    return request.param


@pytest.fixture
def fresh_seed():
    """A fresh 64-bit seed per test run (printed on failure through the test's repr)."""
    return int.from_bytes(os.urandom(8), "little")


@pytest.fixture
def shifted_seed():
    """A fresh seed whose first step scale s_1 = K alpha - 1 is not zero (K alpha = 1 happens
    for about one seed in twenty), for tests that need the first perturbation to be visible."""
    from mergopt_kernels import noise

    while True:
        seed = int.from_bytes(os.urandom(8), "little")
        if noise.step_scale(seed, 1, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), 7) != 0.0:
            return seed


@pytest.fixture
def visible_seed():
    """A fresh seed whose step scales s_1 to s_4 are all nonzero: every perturbation of a short
    run is visible."""
    from mergopt_kernels import noise

    while True:
        seed = int.from_bytes(os.urandom(8), "little")
        if all(noise.step_scale(seed, t, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), 7) != 0.0 for t in range(1, 5)):
            return seed
