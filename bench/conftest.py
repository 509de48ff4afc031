"""pytest options of the benchmark smoke tests: ``--bench-mode smoke|cpu|gpu|gpu-dry`` (sets
``BENCH_MODE``); ``BENCH_THREADS`` sets torch's CPU thread count for the run."""

import os

import pytest

from bench import common


def pytest_addoption(parser):
    parser.addoption("--bench-mode", choices=sorted(common.MODES), default=None,
                     help="benchmark sizes and device (default: $BENCH_MODE or smoke)")


def pytest_configure(config):
    chosen = config.getoption("--bench-mode")
    if chosen is not None:
        os.environ["BENCH_MODE"] = chosen
    if os.environ.get("BENCH_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


@pytest.fixture(autouse=True)
def _free_device_memory():
    """Give each group the device memory of the last one back (1B-parameter groups)."""
    yield
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
