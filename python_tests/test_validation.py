"""The checks shared by the optimizers, merging and the command lines (mergopt_kernels.validation)."""

from __future__ import annotations

import argparse

import numpy
import pytest

from mergopt_kernels.__main__ import main
from mergopt_kernels.validation import check_seed, cli_type, number_in, positive_integer


@pytest.mark.parametrize("value, low, high, options, message", [
    (-5, 1, None, {}, r"x must be in \[1, inf\), got -5.0"),
    (5, None, 2, {}, r"x must be in \(-inf, 2\], got 5.0"),
    (0.0, 0.0, 1.0, {"low_open": True}, r"x must be in \(0, 1\], got 0.0"),
    (1.0, 0.0, 1.0, {"high_open": True}, r"x must be in \[0, 1\), got 1.0"),
    (float("nan"), None, None, {}, "x must be finite"),
])
def test_number_in_names_the_interval(value, low, high, options, message):
    with pytest.raises(ValueError, match=message):
        number_in("x", value, low, high, **options)


def test_number_in_takes_python_and_numpy_reals_and_refuses_the_rest():
    assert number_in("x", numpy.float32(0.5), 0.0, 1.0) == 0.5
    assert number_in("x", 3, 1) == 3.0
    for bad in ("0.5", True, None, [1.0]):
        with pytest.raises(TypeError, match="x must be a real number"):
            number_in("x", bad)


def test_integers_and_seeds():
    assert positive_integer("n", numpy.int64(3)) == 3
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        positive_integer("n", 0)
    with pytest.raises(TypeError, match="n must be a positive integer"):
        positive_integer("n", 2.0)
    assert check_seed("seed", 2**64 - 1) == 2**64 - 1
    with pytest.raises(TypeError, match="seed must be an integer"):
        check_seed("seed", 1.0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        check_seed("seed", -1)


def test_cli_type_turns_both_failures_into_argparse_errors():
    convert = cli_type(int, positive_integer, "a positive integer")
    assert convert("7") == 7
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive integer, got 'seven'"):
        convert("seven")
    with pytest.raises(argparse.ArgumentTypeError, match="the value must be a positive integer, got -1"):
        convert("-1")


@pytest.mark.parametrize("args, message", [
    (["merge", "--method", "ties", "--experts", "a", "--out", "o", "--max-shard-size", "0.5B"],
     r"argument --max-shard-size: the value must be in [1, inf), got 0.5"),
    (["merge", "--method", "ties", "--experts", "a", "--out", "o", "--max-shard-size", "5XB"],
     "argument --max-shard-size: must be a size such as 5GB"),
    (["demo", "--seeds", "x"], "argument --seeds: must be a positive integer, got 'x'"),
    (["demo", "--noise-scale", "inf"], "argument --noise-scale: the value must be finite, got inf"),
])
def test_command_line_numbers_exit_2_naming_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
