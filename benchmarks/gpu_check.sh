#!/usr/bin/env bash
# The device call that checks dsmoe's CUDA kernels on a GPU machine. A session gets ~15 device
# minutes, start-up included, so one call of at most 600 s is all there is: PHASE=all (default)
# does everything in order of what matters most, each step capped so the whole fits BUDGET:
#   build     in place with CUDA, 16 jobs (the .so stays on the warm machine for a rerun)
#   errors    an op's argument error raises a RuntimeError on CPU and GPU (op_errors_check.sh;
#             if not, what tells the causes apart)
#   tests     every CUDA-marked test (test_cuda_*, test_simt_* and the op tests' cuda cases) in
#             8 pytest-xdist workers, -rfE with durations, a stack dump of a test stuck past 120 s
#   memcheck  compute-sanitizer memcheck over every CUDA op (all grouped-GEMM paths,
#             bf16/fp16/fp32, E up to 256, h >= 512)
#   bench     the layer against its peers (bench_cuda_moe; T=8192 and decode-sized T=64), kernel
#             timings (bench_cuda_ops) and the grouped GEMM against torch._grouped_mm and a dense
#             cuBLAS GEMM (bench_grouped_gemm), markdown tables in bench.log
#   sanitize  synccheck, racecheck and initcheck over the same ops, with what time is left
# PHASE=1 (build tests) and PHASE=2 (memcheck bench sanitize, reusing PHASE=1's build) split it.
# Logs go to $OUT (8 files at most, what the device tool brings back); a summary is printed last.
# The SIMT emulator has already run every kernel on the CPU in CI, so a failure here is a
# GPU-only matter (timing, memory model, tensor cores); the logs name the kernel and the case.
#
# On the device tool, from the repository root, with the CUTLASS and expecttest wheels carried
# (the image has torch, nvcc, ninja, pybind11 and pytest-xdist, but neither of those and no network):
#   here, once:  mkdir -p wheels && echo /wheels/ >> .git/info/exclude
#                pip download --no-deps -d wheels nvidia-cutlass==4.2.0.0 expecttest
#   device run:  command "bash benchmarks/gpu_check.sh", carry ["wheels"], timeout_s 600
# CUTLASS_DIR (a folder holding include/cutlass/cutlass.h) or .cutlass/ (the headers copied
# there) take the place of the nvidia-cutlass wheel.
#
# Environment: STEPS (default: the PHASE's), ARCHS (default 9.0a, the H100/H200), JOBS (default:
# all cores), WORKERS (pytest-xdist workers, default 8), PYTHON (default python3), BUDGET
# (default 570 s: every step stops by then, so the whole run fits a 600 s device call).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
OUT=${OUT:-$root/out/gpu_check}  # out/ is git-ignored
mkdir -p "$OUT"
PY=${PYTHON:-python3}
case "${PHASE:-all}" in
  1) default_steps="build errors tests" ;;
  2) default_steps="memcheck bench sanitize" ;;
  all) default_steps="build errors tests memcheck bench sanitize" ;;
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

# Carried wheels (the CUTLASS headers, expecttest for opcheck), installed beside the image's packages.
if ls "$root"/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dsmoe-wheels "$root"/wheels/*.whl &&
    export PYTHONPATH="$PYTHONPATH:/tmp/dsmoe-wheels" || note "warning: installing wheels/*.whl FAILED"
fi
if [ -z "${CUTLASS_DIR:-}" ] && [ -f "$root/.cutlass/include/cutlass/cutlass.h" ]; then
  export CUTLASS_DIR="$root/.cutlass"
fi
[ -n "${CUTLASS_DIR:-}" ] && note "CUTLASS_DIR=$CUTLASS_DIR"
"$PY" -c 'import cutlass_library' 2>/dev/null || [ -n "${CUTLASS_DIR:-}" ] ||
  note "warning: no CUTLASS headers (wheels/, .cutlass/ or CUTLASS_DIR): kernels that need them are not built"

# 1. Build in place (the tree that travels holds no _C*.so: *.so is git-ignored). PHASE=2 reuses
#    the build that PHASE=1 left on the warm machine.
built=0
case " $STEPS " in *" build "*) ;; *) ls dsmoe/_C*.so >/dev/null 2>&1 || { note "no build from PHASE=1 on this machine"; built=1; } ;; esac
if [ $built -eq 0 ]; then
  step build 270 env DSMOE_CUDA=1 TORCH_CUDA_ARCH_LIST="${ARCHS:-9.0a}" MAX_JOBS="${JOBS:-$(nproc)}" \
    "$PY" setup.py build_ext --inplace || built=1
fi
if [ $built -eq 0 ]; then
  "$PY" -c 'import dsmoe, torch; i = dsmoe.build_info(); print("build_info", i); assert i["cuda"]' >> "$summary" 2>&1 ||
    { note "import of the build FAILED"; built=1; }
fi

if [ $built -eq 0 ]; then
  # 2. An op's argument error must raise, not crash (it crashed on the first H200 run).
  step errors 150 env PY="$PY" bash benchmarks/op_errors_check.sh
  # 3. Every CUDA-marked test, in parallel workers (most cases are small; the CPU references dominate).
  step tests 230 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rfE --durations=15 --continue-on-collection-errors \
    -n "${WORKERS:-8}" -o faulthandler_timeout=120 tests
  # 4. compute-sanitizer over every CUDA op (no caching allocator, so each buffer is its own
  #    allocation and an out-of-bounds access cannot land in a neighbour).
  #    Each tool gets TOOL_LIMIT seconds (initcheck is the slow one: it ran past 150 s on an H200).
  sanitize_with() {
    local rc=0 tool
    for tool in "$@"; do
      echo "== compute-sanitizer --tool $tool"
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${TOOL_LIMIT:-100}" compute-sanitizer --tool $tool \
        --error-exitcode 1 --print-limit 10 "$PY" benchmarks/bench_cuda_ops.py --sanitize --dtypes bf16,fp32 ||
        { rc=1; echo "== $tool FAILED"; }
    done
    return $rc
  }
  export -f sanitize_with
  export PY
  step memcheck 120 bash -c 'sanitize_with memcheck'
  # 5. Timings (markdown tables): the memory-bound kernels, then the grouped GEMM against its peers.
  bench_all() {
    "$PY" benchmarks/bench_cuda_moe.py
    echo
    "$PY" benchmarks/bench_cuda_moe.py --shapes ds16b,fine --tokens 64 --impls dsmoe_layer,dsmoe,grouped_mm,hf_infer
    echo
    "$PY" benchmarks/bench_cuda_ops.py --tokens ${BENCH_TOKENS:-64 8192 32768} --reps 30
    echo
    "$PY" benchmarks/bench_grouped_gemm.py --shapes ds16b,fine,ds145b --tokens 8192,32768 --reps 10
  }
  export -f bench_all
  step bench 170 bash -c bench_all
  step sanitize 230 bash -c 'sanitize_with synccheck racecheck initcheck'
else
  note "build failed: tests, sanitizers and benchmarks not run (see build.log)"
fi

note "total: $(( $(date +%s) - t_start ))s"
echo "== summary"
cat "$summary"
[ -f "$OUT/tests.log" ] && { echo "== failed tests"; grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -n 80; }
[ -f "$OUT/bench.log" ] && { echo "== bench.log (tables)"; grep -E '^(\||Device)' "$OUT/bench.log"; }
grep -q "FAILED" "$summary" && exit 1
exit 0
