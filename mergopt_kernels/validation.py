"""Checks of user-given values shared by the optimizers, merging and the command line: each
raises ``TypeError``/``ValueError`` naming the argument and what was expected, and modifies
nothing (``check_flag`` normalises a valid flag in place)."""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable
from typing import Optional

import numpy
import torch

MASK64 = (1 << 64) - 1


def finite_number(name: str, value, minimum: Optional[float] = None, read_tensor: bool = True) -> None:
    """Check a number option: a real number (Python or numpy) or a 1-element float tensor.
    With ``read_tensor=False`` a tensor's value is not read (no host sync at step time)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a 1-element float tensor, got shape {tuple(value.shape)}")
        if not read_tensor:
            return
        value = float(value.detach().cpu())
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def number_in(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
              low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (Python or numpy; ``finite_number``) within the interval from ``low``
    to ``high`` (either end open with ``low_open``/``high_open``, absent with ``None``), as a float."""
    finite_number(name, value)
    value = float(value)
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high)):
        low_text = "-inf" if low is None else f"{low:g}"
        high_text = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{low_text}, {high_text}{closing}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def positive_integer(name: str, value) -> int:
    """An integer (Python or numpy, not bool) >= 1, as an int."""
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def check_choice(name: str, value, choices):
    """``value`` when it is one of ``choices`` (a sequence of names), else a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_flag(group: dict, name: str, allow_none: bool = False) -> None:
    """Check that ``group[name]`` is bool-like (a bool, numpy bool, or the integer 0 or 1, as
    torch's optimizers accept; None too with ``allow_none``) and store it as a bool."""
    value = group[name]
    if value is None and allow_none:
        return
    if not isinstance(value, (bool, numpy.bool_)) and not (isinstance(value, numbers.Integral) and value in (0, 1)):
        raise TypeError(f"{name} must be a bool{' or None' if allow_none else ''}, got {value!r}")
    if type(value) is not bool:  # no write when already a bool: compiled steps stay one graph
        group[name] = bool(value)


def check_seed(name: str, seed, allow_none: bool = False) -> Optional[int]:
    """A 64-bit seed given as an integer (Python or numpy, not bool) in [0, 2**64), as an int
    (None too with ``allow_none``): ``TypeError`` for another type, ``ValueError`` outside the range."""
    if seed is None and allow_none:
        return None
    if isinstance(seed, (bool, numpy.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be {'None or ' if allow_none else ''}an integer in [0, 2**64), "
                        f"got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= MASK64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed!r}")
    return int(seed)


def cli_type(parse: Callable[[str], object], check: Callable[[str, object], object], what: str) -> Callable[[str], object]:
    """An argparse ``type``: ``parse`` the text (``what`` names the expected form in the error),
    then ``check("the value", parsed)`` (one of this module's checks); either failure is an
    ``argparse.ArgumentTypeError``, which argparse reports with the option's name (exit 2)."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        try:
            return check("the value", value)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return convert
