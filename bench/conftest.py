"""pytest options of the benchmarks: ``--bench-mode smoke|cpu|gpu`` (sets ``BENCH_MODE``);
``BENCH_THREADS`` sets torch's CPU thread count for the run."""

import os


def pytest_addoption(parser):
    parser.addoption("--bench-mode", choices=("smoke", "cpu", "gpu"), default=None,
                     help="benchmark sizes and device (default: $BENCH_MODE or smoke)")


def pytest_configure(config):
    chosen = config.getoption("--bench-mode")
    if chosen is not None:
        os.environ["BENCH_MODE"] = chosen
    if os.environ.get("BENCH_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions, threads, load and the device, written with every result."""
    import platform

    import torch

    info = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                bench_mode=os.environ.get("BENCH_MODE", "smoke"), cpu_model=_cpu_model())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if hasattr(os, "getloadavg"):
        info["loadavg"] = os.getloadavg()
    from bench import common
    device = common.mode().device
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({info['cpu_model'] or platform.processor()})"
    machine_info.update(info)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


import pytest


@pytest.fixture(autouse=True)
def _free_device_memory():
    """Give each benchmark the device memory of the last one back (1B-parameter rows)."""
    yield
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
