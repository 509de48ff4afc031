#!/usr/bin/env bash
# The test suite on another torch stack than requirements.txt's, as CI runs it:
#   bash .ci/stack.sh NAME PIN...        e.g.  bash .ci/stack.sh oldest torch==2.11.0 triton==3.6.0
# 1. a venv build/stacks/NAME-venv with the pins and the rest of requirements*.txt (DeepSpeed
#    without build isolation, against that torch),
# 2. a copy of the working tree in build/stacks/NAME with its own in-place native build against
#    that torch (the pinned stack's build in the tree stays as it is),
# 3. .ci/check_native.py there: that torch loads that build, with the CUDA op where torch has CUDA
#    and nvcc is here, compiled for STACK_CUDA_ARCHES (default: setup.py's default set),
# 4. python_tests (the Triton kernels through Triton's interpreter) and the benchmark smoke run.
# The C++ unit tests do not depend on torch: `make test` runs them once. Exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
shift
stacks=$PWD/build/stacks
venv=$stacks/$name-venv
tree=$stacks/$name
py=$venv/bin/python
mkdir -p "$stacks"
echo "== stack $name: $*"
test -x "$py" || python3 -m venv "$venv"
grep -vE '^(torch|triton)([=<>!~ ]|$)' requirements.txt >"$stacks/$name-requirements.txt"
"$py" -m pip install -q "$@" -r "$stacks/$name-requirements.txt" -r requirements-test.txt
"$py" -m pip install -q --no-build-isolation -r requirements-deepspeed.txt
export TORCH_EXTENSIONS_DIR=$venv/torch_extensions  # DeepSpeed's JIT op, built against this torch
rm -rf "$tree"
mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard | tar -c --null -T - | tar -x -C "$tree"
cd "$tree"
devices=cpu
arches=()
if "$py" -c "import sys, torch; sys.exit(torch.version.cuda is None)" && command -v nvcc >/dev/null 2>&1; then
  devices=cpu,cuda
  arches=(--arches "${STACK_CUDA_ARCHES:-sm_80,sm_86,sm_89,sm_90,compute_90}")
fi
MAX_JOBS=$(nproc) "$py" setup.py -q build_ext --inplace
"$py" .ci/check_native.py --devices "$devices" "${arches[@]}"
status=0  # the benchmark smoke run runs even when a python test failed
"$py" -m pytest python_tests -q -p no:cacheprovider || status=1
"$py" -m pytest bench -q -p no:cacheprovider || status=1
exit $status
