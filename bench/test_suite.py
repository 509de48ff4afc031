"""The interleaved timing and the report against known answers: the round-robin order, the
quartiles of per-round ratios (numpy's linear percentiles), and RESULTS.md keeping the
kernel-cost and merge-memory blocks."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from bench import common, report, suite


def test_rounds_rotate_the_order():
    calls = []
    rows = [suite.Row(name, lambda name=name: calls.append(name), lambda: (1, "state_bytes")) for name in "abc"]
    times = suite.time_interleaved(rows, torch.device("cpu"), rounds=4)
    assert calls == list("aabbcc" "bbccaa" "ccaabb" "aabbcc")
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_quartiles_match_numpy(n):
    seed = int.from_bytes(os.urandom(4), "little")
    values = list(np.random.default_rng(seed).lognormal(size=n))
    expected = np.percentile(values, [25, 50, 75])
    np.testing.assert_allclose(suite.quartiles(values), expected, rtol=1e-12, err_msg=f"seed {seed}")


def test_rounds_fill_the_target():
    mode = common.MODES["cpu"]
    assert suite.rounds_for(mode, mode.target_s / 10) == 10
    assert suite.rounds_for(mode, 100.0) == mode.min_rounds
    assert suite.rounds_for(mode, 1e-6) == mode.max_rounds
    assert suite.rounds_for(common.MODES["smoke"], 1.0) == 1


def test_render_keeps_the_marked_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_MODE", "smoke")
    results = report.run("smoke")
    (tmp_path / "cpu.json").write_text(json.dumps(results))
    block = "<!-- kernel-cost:begin -->\n## Kernel cost\n\n| kernel | regs |\n|---|---:|\n| k | 40 |\n<!-- kernel-cost:end -->"
    other = "<!-- merge-memory:begin -->\n## Merge memory\n\n| merge | peak |\n<!-- merge-memory:end -->"
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text(f"# old\n\nstale text\n\n{block}\n\nmore stale text\n\n{other}\n")
    report.render(tmp_path, markdown)
    text = markdown.read_text()
    assert block in text and other in text and "stale" not in text
    assert report.NO_GPU in text and "## CPU results" in text
    assert (tmp_path / "step_ratio.png").stat().st_size > 0


def test_one_cpu_thread_is_timed_with_its_cpu_time():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert common.clock(torch.device("cpu")) is time.thread_time
        torch.set_num_threads(2)
        assert common.clock(torch.device("cpu")) is time.perf_counter
    finally:
        torch.set_num_threads(threads)
    assert common.clock(torch.device("cuda")) is time.perf_counter
