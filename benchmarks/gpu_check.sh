#!/usr/bin/env bash
# The one device call that checks dsmoe's CUDA kernels on a GPU machine: build in place with
# CUDA, the CUDA tests, compute-sanitizer (memcheck, racecheck) over every CUDA op, and the
# kernel benchmarks. Logs and tables go to $OUT (at most 8 files); a summary is printed last.
#
# On the device tool, from the repository root, with the CUTLASS headers carried (the image has
# torch, nvcc, ninja and pybind11, but no nvidia-cutlass and no network):
#   here, once:  mkdir -p .cutlass && cp -r <venv>/lib/python3.11/site-packages/cutlass_library/source/include .cutlass/
#                echo /.cutlass/ >> .git/info/exclude          (27 MB; the tree limit is 64 MiB)
#   device run:  command "bash benchmarks/gpu_check.sh", carry [".cutlass"], timeout_s 600
# CUTLASS_DIR (a folder holding include/cutlass/cutlass.h) overrides .cutlass; a wheel
# wheels/nvidia_cutlass-*.whl is used when neither exists.
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
STEPS=${STEPS:-build tests memcheck racecheck bench}
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

# 1. Build in place (the tree that travels holds no _C*.so: *.so is git-ignored).
step build 270 env DSMOE_CUDA=1 TORCH_CUDA_ARCH_LIST="${ARCHS:-9.0a}" MAX_JOBS="${JOBS:-$(nproc)}" \
  "$PY" setup.py build_ext --inplace
built=$?
if [ $built -eq 0 ]; then
  "$PY" -c 'import dsmoe, torch; i = dsmoe.build_info(); print("build_info", i); assert i["cuda"]' >> "$summary" 2>&1 ||
    { note "import of the build FAILED"; built=1; }
fi

if [ $built -eq 0 ]; then
  # 2. Every CUDA-marked test: this repository's CUDA tests and the op tests' cuda cases.
  step tests 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rfE tests
  # 3. compute-sanitizer over every CUDA op (no caching allocator, so each buffer is its own
  #    allocation and an out-of-bounds access cannot land in a neighbour).
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  step memcheck 75 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 30 \
    "$PY" benchmarks/bench_cuda_ops.py --sanitize
  step racecheck 75 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 30 \
    "$PY" benchmarks/bench_cuda_ops.py --sanitize --dtypes bf16
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
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
