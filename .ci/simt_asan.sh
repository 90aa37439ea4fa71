#!/usr/bin/env bash
# The CUDA kernel sources under the SIMT emulator built with AddressSanitizer: every out-of-bounds
# access of a kernel (or of the emulator) on CPU memory is reported. Runs the emulator's test
# cases of tests/test_cuda_ops.py and tests/test_simt_grouped_gemm.py (without the two slowest,
# which repeat the same kernels at larger sizes).
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
  -k "not ties_match_cpu_exactly and not sequences_of_any_length"
echo "simt_asan: finished in $(( $(date +%s) - start )) s"
