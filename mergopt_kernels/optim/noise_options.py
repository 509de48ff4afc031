"""A param group's noise options: their checks, and the plain values a launch takes."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy
import torch

from .. import noise, validation

NOISE_OPTIONS = ("noise_scale", "noise_loc", "alphas", "k_max", "distribution")
# FusedStepArgs' noise fields with the noise off (nothing is drawn).
NOISE_OFF = dict(noise_scale=0.0, noise_loc=0.0, alphas=(1.0,), k_max=1, distribution="laplace")


def check_noise_options(group: dict, params: Optional[list] = None) -> None:
    """Validate and normalise a param group's noise options in place (alphas become a tuple).

    With ``params`` (the group's tensors, default ``group["params"]`` when present), also check
    that the largest perturbation the options can write, ``max|s| * max|z|``, is finite in
    fp32 and in every parameter's dtype, so no perturbation can overflow a parameter."""
    validation.finite_number("noise_scale", group["noise_scale"], 0.0, read_tensor=False)
    validation.finite_number("noise_loc", group["noise_loc"], read_tensor=False)
    for name in ("noise_scale", "noise_loc"):
        if isinstance(group[name], torch.Tensor):
            raise TypeError(f"{name} must be a number (it selects the kernel's code path), not a tensor")
    alphas = group["alphas"]
    if isinstance(alphas, (int, float)) or not hasattr(alphas, "__iter__"):
        raise TypeError(f"alphas must be a sequence of positive numbers, got {alphas!r}")
    alphas = tuple(float(a) for a in alphas)
    if not alphas or any(not math.isfinite(a) or a <= 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty sequence of positive finite numbers, got {alphas}")
    if group["alphas"] != alphas:  # no write when already normal: compiled steps stay one graph
        group["alphas"] = alphas
    k_max = group["k_max"]
    if isinstance(k_max, (bool, numpy.bool_)) or not isinstance(k_max, numbers.Integral) or not 1 <= k_max < 2**32 - 1:
        raise ValueError(f"k_max must be an integer in [1, 2**32 - 1), got {k_max!r}")
    if type(k_max) is not int:
        group["k_max"] = int(k_max)
    if group["distribution"] not in noise.DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {noise.DISTRIBUTIONS}, got {group['distribution']!r}")
    params = group.get("params", ()) if params is None else params
    _check_noise_fits(group, {p.dtype for p in params} | {torch.float32})


def _check_noise_fits(group: dict, dtypes: set) -> None:
    """Raise ``ValueError`` naming ``noise_scale`` when a perturbation of the group's options
    can exceed the largest finite value of one of ``dtypes``."""
    scale = float(group["noise_scale"])
    if scale == 0.0:
        return
    largest = noise.max_abs_perturbation(scale, float(group["noise_loc"]), group["alphas"], group["k_max"],
                                         group["distribution"])
    for dtype in sorted(dtypes, key=lambda d: torch.finfo(d).max):
        if not largest < torch.finfo(dtype).max:
            raise ValueError(f"noise_scale: {scale} (noise_loc {group['noise_loc']}, k_max {group['k_max']}, "
                             f"max alpha {max(group['alphas'])}) gives perturbations up to {largest:.3g}, which "
                             f"{dtype} cannot represent (largest finite value {torch.finfo(dtype).max:.3g})")


def noise_options(group: dict) -> Optional[dict]:
    """A checked group's noise options as plain values, or None when its noise is off."""
    if float(group["noise_scale"]) == 0.0:
        return None
    options = {k: group[k] for k in NOISE_OPTIONS}
    options["noise_scale"], options["noise_loc"] = float(options["noise_scale"]), float(options["noise_loc"])
    return options
