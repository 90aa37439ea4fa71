#!/usr/bin/env bash
# The device calls that check dsmoe's CUDA kernels on a GPU machine, in two calls that each fit
# ~450 s on a warm machine (a session gets ~15 device minutes, start-up included):
#   PHASE=1  build in place with CUDA (the .so stays for the next call), then every CUDA test,
#            test_cuda_* first, -v with durations, a stack dump of any test stuck past 120 s
#   PHASE=2  compute-sanitizer memcheck, racecheck, initcheck and synccheck over every CUDA op
#            (all grouped-GEMM paths, bf16/fp16/fp32, E up to 256, h >= 512), then the benchmarks
#   PHASE=all (default) both in one call, for a machine with time to spare.
# Logs and tables go to $OUT (at most 6 files); a summary is printed last. The SIMT emulator has
# already run every kernel on the CPU in CI, so a failure here is a GPU-only matter (timing,
# memory model, tensor cores); the -v output names the kernel and the case.
#
# On the device tool, from the repository root, with the CUTLASS headers carried (the image has
# torch, nvcc, ninja and pybind11, but no nvidia-cutlass and no network):
#   here, once:  mkdir -p .cutlass && cp -r <venv>/lib/python3.11/site-packages/cutlass_library/source/include .cutlass/
#                echo /.cutlass/ >> .git/info/exclude          (27 MB; the tree limit is 64 MiB)
#   device run:  command "bash benchmarks/gpu_check.sh", carry [".cutlass"], timeout_s 600
# CUTLASS_DIR (a folder holding include/cutlass/cutlass.h) overrides .cutlass; a wheel
# wheels/nvidia_cutlass-4.2.0.0-*.whl (the pinned version; pip download nvidia-cutlass==4.2.0.0) is used
# when neither exists.
#
# Environment: STEPS (default "build tests memcheck racecheck bench"), ARCHS (default 9.0a, the
# H100/H200), JOBS (default: all cores), PYTHON (default python3), BENCH_TOKENS (default
# "64 8192 32768"), BUDGET (default 570 s: every step stops by then, so the whole run fits a
# 600 s device call; each step also has its own limit).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
OUT=${OUT:-$root/out/gpu_check}  # out/ is git-ignored
mkdir -p "$OUT"
PY=${PYTHON:-python3}
case "${PHASE:-all}" in
  1) default_steps="build tests" ;;
  2) default_steps="sanitize bench" ;;
  all) default_steps="build tests sanitize bench" ;;
  *) echo "PHASE must be 1, 2 or all, got $PHASE" >&2; exit 2 ;;
esac
STEPS=${STEPS:-$default_steps}
BUDGET=${BUDGET:-570}
summary="$OUT/summary.txt"
: > "$summary"
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
t_start=$(date +%s)

note() { echo "$*" | tee -a "$summary"; }

# step NAME LIMIT_S CMD...: runs CMD with its output in $OUT/NAME.log, for at most LIMIT_S seconds
# and never past BUDGET seconds from the start (the device run is killed at its own limit).
step() {
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) note "$name: skipped"; return 0 ;; esac
  local t0=$(date +%s)
  local left=$(( BUDGET - (t0 - t_start) - 5 ))
  [ $left -lt $limit ] && limit=$left
  if [ $limit -lt 15 ]; then note "$name: not run, no time left"; return 1; fi
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 0 ] || verdict="FAILED (rc=$rc$([ $rc -eq 124 ] && echo ", timed out after ${limit}s"))"
  note "$name: $verdict in $(( $(date +%s) - t0 ))s -> $name.log"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$summary"
  return $rc
}

{
  echo "== device"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 1 || echo "no compute-sanitizer on PATH"
} >> "$summary" 2>&1
cat "$summary"

# CUTLASS headers for the grouped GEMM kernels.
if [ -z "${CUTLASS_DIR:-}" ] && [ -f "$root/.cutlass/include/cutlass/cutlass.h" ]; then
  export CUTLASS_DIR="$root/.cutlass"
fi
if [ -z "${CUTLASS_DIR:-}" ]; then
  whl=$(ls "$root"/wheels/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)
  if [ -n "$whl" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dsmoe-cutlass "$whl" &&
      export PYTHONPATH="$PYTHONPATH:/tmp/dsmoe-cutlass"
  else
    note "warning: no CUTLASS headers (.cutlass/, CUTLASS_DIR or wheels/): kernels that need them are not built"
  fi
fi
[ -n "${CUTLASS_DIR:-}" ] && note "CUTLASS_DIR=$CUTLASS_DIR"

# 1. Build in place (the tree that travels holds no _C*.so: *.so is git-ignored). PHASE=2 reuses
#    the build that PHASE=1 left on the warm machine.
built=0
case " $STEPS " in *" build "*) ;; *) ls dsmoe/_C*.so >/dev/null 2>&1 || { note "no build from PHASE=1 on this machine"; built=1; } ;; esac
[ $built -eq 0 ] && step build 270 env DSMOE_CUDA=1 TORCH_CUDA_ARCH_LIST="${ARCHS:-9.0a}" MAX_JOBS="${JOBS:-$(nproc)}" \
  "$PY" setup.py build_ext --inplace
[ $built -eq 0 ] && built=$?
if [ $built -eq 0 ]; then
  "$PY" -c 'import dsmoe, torch; i = dsmoe.build_info(); print("build_info", i); assert i["cuda"]' >> "$summary" 2>&1 ||
    { note "import of the build FAILED"; built=1; }
fi

if [ $built -eq 0 ]; then
  # 2. Every CUDA-marked test: the CUDA test files first, then the op tests' cuda cases.
  step tests 400 "$PY" -m pytest -v -p no:cacheprovider -m cuda -rfE --durations=20 \
    -o faulthandler_timeout=120 tests/test_cuda_ops.py tests/test_cuda_grouped_gemm.py \
    tests/test_simt_grouped_gemm.py tests
  # 3. compute-sanitizer over every CUDA op (no caching allocator, so each buffer is its own
  #    allocation and an out-of-bounds access cannot land in a neighbour), four tools, one log.
  sanitize_all() {
    local rc=0 tool
    for tool in memcheck racecheck initcheck synccheck; do
      echo "== compute-sanitizer --tool $tool"
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 1 --print-limit 30 \
        "$PY" benchmarks/bench_cuda_ops.py --sanitize --dtypes bf16,fp32 || { rc=1; echo "== $tool FAILED"; }
    done
    return $rc
  }
  export -f sanitize_all
  export PY
  step sanitize 330 bash -c sanitize_all
  # 4. Kernel timings (markdown tables).
  step bench 100 "$PY" benchmarks/bench_cuda_ops.py --tokens ${BENCH_TOKENS:-64 8192 32768} --reps 30 \
    --out "$OUT/bench_cuda_ops.md"
else
  note "build failed: tests, sanitizers and benchmarks not run (see build.log)"
fi

note "total: $(( $(date +%s) - t_start ))s"
echo "== summary"
cat "$summary"
[ -f "$OUT/bench_cuda_ops.md" ] && { echo "== bench_cuda_ops.md"; cat "$OUT/bench_cuda_ops.md"; }
grep -q "FAILED" "$summary" && exit 1
exit 0
