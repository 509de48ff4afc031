"""Every benchmark group of the mode (default ``smoke``: tiny sizes, one round) through the same
functions as ``python -m bench.report``: each row of ``peers`` runs or is skipped with a reason,
and the interleaved timing gives positive times and ratios to ``adamw_fused``."""

from __future__ import annotations

import math

import pytest
import torch

from bench import common, peers, suite

MODE = common.mode()
GROUPS = [("step", size) for size in MODE.step_sizes] + [("e2e", spec) for spec in suite.e2e_specs(MODE)]


@pytest.mark.parametrize("kind,size", GROUPS, ids=[f"{k}-{s}" for k, s in GROUPS])
def test_group(kind, size):
    device = torch.device(MODE.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    result = suite.run_group(MODE, kind, size, device)
    table = peers.step_optimizers(device) if kind == "step" else peers.e2e_optimizers(device)
    ran = [row["row"] for row in result["rows"]]
    assert sorted(ran + list(result["skipped"])) == sorted(table), result["skipped"]
    assert peers.BASELINE in ran
    for row in result["rows"]:
        assert row["rounds"] == len(row["times"]) >= 1 and (MODE.target_s > 0.0 or row["rounds"] == 1), row
        assert all(t > 0 for t in row["times"]), row
        assert math.isfinite(row["ratio"]) and row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"], row
        assert row["memory_bytes"] > 0, row


def test_copy_bandwidth():
    device = torch.device(MODE.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    assert common.copy_bandwidth(device, 1) > 0
