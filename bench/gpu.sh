#!/usr/bin/env bash
# The GPU benchmarks: step (1M/10M/100M/1B params) and end-to-end (125M, 1B; fp32 under bf16
# autocast and bf16 parameters), then bench/RESULTS.md and bench/step_ratio.png re-rendered
# with the GPU section next to the committed CPU one. Run from anywhere on a machine with a
# CUDA GPU where torch and triton are installed (torch is never installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
"$PYTHON" -c "import pytest, pytest_benchmark, matplotlib" 2>/dev/null \
    || "$PYTHON" -m pip install "pytest>=8" "pytest-benchmark==5.3.1" "matplotlib==3.11.2"
# Smoke first (every row once at tiny sizes on the GPU): fails fast before the long run.
BENCH_MODE=smoke BENCH_DEVICE=cuda "$PYTHON" -m pytest bench -q -p no:cacheprovider --benchmark-disable
"$PYTHON" -m bench.report --mode gpu
