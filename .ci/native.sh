#!/usr/bin/env bash
# Native builds and their C++ tests, as CI runs them:
#   1. the torch extension mergopt_kernels._C in place (CPU op; + CUDA op where torch has CUDA),
#      then .ci/check_native.py: torch loads this build (no fallback),
#   2. CMake: the core's ctest unit tests, and the CUDA kernels + test program compiled by nvcc
#      wherever nvcc exists (nothing CUDA runs without a GPU). CMAKE_CUDA_ARCHS (default 90) keeps
#      this compile check to one architecture; setup.py's build covers the release set.
# PYTHON selects the interpreter (default: python). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
JOBS="${JOBS:-$(nproc)}"

echo "== torch extension (setup.py build_ext --inplace)"
MAX_JOBS="$JOBS" "$PYTHON" setup.py build_ext --inplace
"$PYTHON" .ci/check_native.py --devices cpu

echo "== CMake: C++ unit tests (+ nvcc compile of the CUDA kernels)"
cuda_flag=-DMERGOPT_BUILD_CUDA=OFF
if command -v nvcc >/dev/null 2>&1; then
  cuda_flag="-DMERGOPT_BUILD_CUDA=ON -DCMAKE_CUDA_COMPILER=$(command -v nvcc) -DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHS:-90}"
fi
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
cmake -S . -B build/cmake "${generator[@]}" -DCMAKE_BUILD_TYPE=Release $cuda_flag
cmake --build build/cmake --parallel "$JOBS"
ctest --test-dir build/cmake --output-on-failure
