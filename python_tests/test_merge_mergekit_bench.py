"""The mergekit benchmark's comparison (bench/mergekit_speed.py) on a tiny model, against mergekit itself.

mergekit is an optional test dependency in its own environment (it pins its own transformers):
set ``MERGEKIT_YAML`` to its ``mergekit-yaml`` or put that on ``PATH``; without it these tests skip.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from bench import mergekit_speed  # noqa: E402

MERGEKIT = mergekit_speed.find_mergekit()
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not found (set MERGEKIT_YAML or PATH)")


def test_both_tools_agree_on_a_tiny_model(tmp_path):
    mergekit_speed.write_models(tmp_path, mergekit_speed.SIZES["tiny"], mergekit_speed.EXPERTS)
    methods = ("linear", "task_arithmetic", "ties")
    result = mergekit_speed.benchmark(MERGEKIT, tmp_path, methods, reps=1, cache="warm", log=lambda line: None)
    agreement = result["agreement"]
    # the same fp32 computation rounded once to bf16: equal bits
    assert agreement["linear"]["differ"] == 0
    assert agreement["task_arithmetic"]["differ"] == 0
    # TIES differs only among entries tied with the k-th magnitude (bench/RESULTS.md): 0.54 % here
    assert agreement["ties"]["differ"] / agreement["ties"]["elements"] < 0.01
    rows = mergekit_speed.summary_rows(result, methods)
    assert all(row["median"] > 0 and row["rss"] > 0 and row["gbps"] > 0 for row in rows)
