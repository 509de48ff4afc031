#!/usr/bin/env bash
# The GPU check (`make gpu-check`), one command on a machine with a CUDA GPU where torch and
# triton are installed (nothing is installed or downloaded):
#   1. build the CUDA op in place for this GPU (TORCH_CUDA_ARCH_LIST = its compute capability),
#   2. python_tests on CUDA: the tests whose ids name cuda (parity with AdamW(fused=True) with the
#      noise off, the noise against the reference stream, bf16/fp16 masters, on the Triton kernel
#      and on the CUDA op), CUDA-graph capture, torch.compile,
#   3. the GPU bench (`python -m bench.report --mode gpu`): step at 10M/100M/1B against AdamW
#      fused and the copy bandwidth, training step at 125M -> bench/results/gpu.json,
#      bench/RESULTS.md, bench/step_ratio.png.
# Each stage has a time limit so that the whole fits 8 minutes on one H100/H200; a stage that
# fails does not stop the later ones, and the exit status is non-zero if any failed. Everything
# is logged to $LOG_DIR/gpu-check.log (default bench/results); where $OUT is set (the device
# machine's folder that comes back), the log, the results and RESULTS.md are copied there.
#
# GPU_CHECK_DRY=1: the same stages without a GPU, on CPU tensors at small sizes (`--mode gpu-dry`),
# with 5x the time limits, writing into $LOG_DIR (default: a new scratch folder), never into bench/.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY=${GPU_CHECK_DRY:-0}
TESTS=${GPU_CHECK_TESTS:-cuda or compile or graph}
if [ "$DRY" = 1 ]; then
  LOG_DIR=${LOG_DIR:-$(mktemp -d /tmp/mergopt-gpu-check.XXXXXX)}
  BENCH=(--mode gpu-dry --out "$LOG_DIR")
  cp bench/RESULTS.md bench/results/cpu.json bench/results/cpu-profile.json "$LOG_DIR"/ 2>/dev/null || true
else
  LOG_DIR=${LOG_DIR:-bench/results}
  BENCH=(--mode gpu)
fi
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu-check.log"
: >"$LOG"
failed=()

scale=1
[ "$DRY" = 1 ] && scale=${GPU_CHECK_DRY_SCALE:-5}  # a 2-core CPU machine is slower than the GPU one
stage() {  # stage NAME LIMIT_S COMMAND...: run, log, time and record a failure
  local name=$1 limit=$(( $2 * scale )) start rc
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $(( $(date +%s) - start ))s" | tee -a "$LOG"
  [ "$rc" = 0 ] || failed+=("$name (exit $rc)")
}

"$PYTHON" - <<'PY' 2>&1 | tee -a "$LOG"
import os, torch, triton
dry = os.environ.get("GPU_CHECK_DRY") == "1"
assert dry or torch.cuda.is_available(), "no CUDA device visible (GPU_CHECK_DRY=1 runs the CPU dry mode)"
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (dry mode, CPU)"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__, "GPU:", device)
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

if [ "$DRY" != 1 ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
stage build 120 env MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" setup.py build_ext --inplace
devices=cpu,cuda
[ "$DRY" = 1 ] && devices=cpu
stage native-op 30 "$PYTHON" .ci/check_native.py --devices "$devices"
stage tests 120 "$PYTHON" -m pytest python_tests -q -p no:cacheprovider -k "$TESTS" \
  --durations=10 --junitxml="$LOG_DIR/gpu-tests-junit.xml"
stage bench 180 "$PYTHON" -m bench.report "${BENCH[@]}"

if [ -n "${OUT:-}" ] && [ "$DRY" != 1 ]; then
  mkdir -p "$OUT"
  cp -r "$LOG_DIR"/. bench/RESULTS.md bench/step_ratio.png "$OUT"/
fi
echo "log: $LOG" | tee -a "$LOG"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}" | tee -a "$LOG"
  exit 1
fi
echo "gpu-check: every stage passed" | tee -a "$LOG"
