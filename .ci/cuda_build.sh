#!/usr/bin/env bash
# Builds the whole dsmoe extension with its CUDA kernels against a CUDA build of torch, links it
# and imports it. Needs no GPU (the GPU is never asked at build time or import).
#
# usage: .ci/cuda_build.sh [VENV] [BUILD_DIR]
#   VENV       a venv with a CUDA build of torch, ninja, numpy and nvidia-cutlass (default
#              /opt/venv-cuda)
#   BUILD_DIR  where the build goes (default build/cuda-ci): BUILD_DIR/tmp the objects,
#              BUILD_DIR/lib/dsmoe the package (the built _C next to a copy of dsmoe's Python
#              files). The source tree's dsmoe/_C*.so (the CPU build) is left alone.
# Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS (default 2), CUDA_HOME
# (default /usr/local/cuda), CUTLASS_DIR (else the headers of the venv's nvidia-cutlass).
# Builds run under flock /tmp/dsmoe-cuda-build.lock so concurrent builds on one machine queue.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(cd "${1:-/opt/venv-cuda}" && pwd)
dir=${2:-$root/build/cuda-ci}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
py="$venv/bin/python"
[ -x "$py" ] || { echo "cuda_build: no python at $py" >&2; exit 2; }

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "cuda_build: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2; exit 2; }
export PATH="$venv/bin:$CUDA_HOME/bin:$PATH"  # the venv's ninja, then nvcc
export DSMOE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
export MAX_JOBS=${MAX_JOBS:-2}

echo "cuda_build: torch $("$py" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')," \
  "archs $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs, into $dir"
start=$(date +%s)
cd "$root"
flock /tmp/dsmoe-cuda-build.lock \
  "$py" setup.py build_ext --build-lib "$dir/lib" --build-temp "$dir/tmp"
echo "cuda_build: built in $(( $(date +%s) - start )) s"

# The package beside the built extension: every Python file of dsmoe/, sub-packages included.
pkg="$dir/lib/dsmoe"
(cd "$root/dsmoe" && find . -name '*.py' -not -path '*/__pycache__/*' -print0) |
  while IFS= read -r -d '' f; do
    mkdir -p "$pkg/$(dirname "$f")"
    cp "$root/dsmoe/$f" "$pkg/$f"
  done

# Import from outside the source tree, so the CPU build in dsmoe/ cannot be picked up.
cd "$(mktemp -d)"
PYTHONPATH="$dir/lib" "$py" - "$pkg" <<'EOF'
import os
import sys

import torch

import dsmoe

pkg = sys.argv[1]
assert os.path.dirname(os.path.abspath(dsmoe.__file__)) == pkg, (dsmoe.__file__, pkg)
info = dsmoe.build_info()
print("cuda_build: build_info", info)
assert info["cuda"] is True, f"the CUDA build reports cuda={info['cuda']}"

has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("dsmoe::"))
with_cuda = [op for op in ops if has(f"dsmoe::{op}", "CUDA")]
print("cuda_build: ops with a CUDA kernel:", ", ".join(with_cuda) or "none")
print("cuda_build: ops without:", ", ".join(op for op in ops if op not in with_cuda) or "none")
required = ["gate", "gate_backward", "permute", "permute_backward", "unpermute", "unpermute_backward",
            "swiglu", "swiglu_backward"]
missing = [op for op in required if op not in with_cuda]
assert not missing, f"no CUDA kernel registered for: {missing}"
print("cuda_build: OK")
EOF
