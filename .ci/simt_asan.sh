#!/usr/bin/env bash
# The CUDA kernel sources under the SIMT emulator built with AddressSanitizer: every out-of-bounds
# access of a kernel (or of the emulator) on CPU memory is reported. Runs the emulator's test
# cases of tests/test_cuda_ops.py and tests/test_simt_grouped_gemm.py in fp32 and bf16 (the
# kernels' addressing does not depend on the dtype beyond the vector width, which these two cover
# with 4- and 8-element vectors) and without the largest shapes, which repeat the same kernels:
# ASan and the fibers make every case ~10x slower than the plain run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
start=$(date +%s)
"$PY" tools/simt_build.py --asan
echo "simt_asan: built in $(( $(date +%s) - start )) s"
eval "$("$PY" - <<'PYEOF'
import shlex, sys
sys.path.insert(0, "tools")
from simt_build import asan_env
env = asan_env({})
print(" ".join(f"export {k}={shlex.quote(v)};" for k, v in env.items()))
PYEOF
)"
"$PY" -m pytest -q -m simt tests/test_cuda_ops.py tests/test_simt_grouped_gemm.py \
  -k "not float64 and not float16 and not ties_match_cpu_exactly and not sequences_of_any_length \
      and not deterministic and not T4096 and not T3000 and not T2000 and not T1000 and not rows1379" \
  --durations=10
echo "simt_asan: finished in $(( $(date +%s) - start )) s"
