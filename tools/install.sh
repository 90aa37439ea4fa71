#!/usr/bin/env bash
# Installs dsmoe from source with what it needs: the CPU torch wheel this kind of machine has on
# disk (a CUDA torch already installed is kept), the Python dependencies, and the extension
# built with ninja (CUDA kernels too when torch has CUDA and nvcc is found; DSMOE_CUDA=0|1 forces).
#
# The build is skipped when the installed one was made by this script from the same sources
# (csrc/, setup.py, cmake/), the same torch and Python and the same build settings, and still
# imports from this checkout: running the script twice (the README's two commands) builds once.
# DSMOE_REBUILD=1 forces a build. While building it prints ninja's progress; the whole log is in
# build/install.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q numpy ninja pybind11 safetensors tokenizers tqdm matplotlib pytest expecttest setuptools wheel
# the optional [hf] extra and what the tests run on it: transformers' MoE models and dsmoe's
# transformers face, PEFT, accelerate, lm-evaluation-harness (about a minute from wheels)
"$PY" -m pip install -q "transformers>=5.23,<6" "peft>=0.17" accelerate lm-eval
# the mutation-testing tool of tools/mutation_python.sh (docs/mutation_testing.md; not run by the tests)
"$PY" -m pip install -q "mutmut==3.8.1"
# cmake >= 3.25 for the C++ benchmark binaries (tests/test_cmake_build.py)
if ! cmake --version 2>/dev/null | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=25))}'; then
  "$PY" -m pip install -q "cmake>=3.25"
fi

STAMP_FILE=build/install.stamp
# what the build depends on: every source and build file, the torch and Python it builds
# against, and the settings setup.py reads
stamp() {
  "$PY" - <<'EOF'
import hashlib, os, sys
from pathlib import Path

import torch

h = hashlib.sha256()
files = [Path("setup.py"), Path("pyproject.toml")]
for root in ("csrc", "cmake"):
    files += sorted(p for p in Path(root).rglob("*") if p.is_file())
for p in files:
    if p.is_file():
        h.update(str(p).encode() + b"\0" + p.read_bytes() + b"\0")
env = [os.environ.get(k, "") for k in ("DSMOE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUTLASS_DIR", "CUDA_HOME", "CXX", "CC")]
h.update(repr((torch.__version__, sys.executable, sys.version, env)).encode())
print(h.hexdigest())
EOF
}

# the installed dsmoe is this checkout's, and its extension loads
installed_here() {
  (cd / && "$PY" - "$ROOT" <<'EOF'
import importlib.metadata, os, sys
import dsmoe.ops  # loads the compiled extension
importlib.metadata.version("dsmoe")  # installed, with its `dsmoe` command
sys.exit(0 if os.path.samefile(os.path.dirname(dsmoe.__file__), os.path.join(sys.argv[1], "dsmoe")) else 1)
EOF
  ) >/dev/null 2>&1
}

want=$(stamp)
if [ "${DSMOE_REBUILD:-0}" != 1 ] && [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$want" ] && installed_here; then
  echo "dsmoe: the installed build is current (same sources, torch and settings); not rebuilding (DSMOE_REBUILD=1 forces it)"
  exit 0
fi

mkdir -p build
rm -f "$STAMP_FILE"
echo "dsmoe: building and installing the extension (several minutes on a few CPU cores; log: build/install.log)"
start=$SECONDS
set +e
# pip -v passes ninja's output through; of it, one short line per compiled file
"$PY" -m pip install -v --no-build-isolation -e . 2>&1 | tee build/install.log | {
  grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] |^ *dsmoe: ' |
    sed -u -E 's#^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]*/)?(csrc/[^ ]+) .*#  \1 \3#; s#^ *(\[[0-9]+/[0-9]+\]) .* -o ([^ ]+)$#  \1 linking \2#; s#^ *(dsmoe: )#  \1#'
  true
}
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
  echo "dsmoe: the build failed (exit $status); the end of build/install.log:" >&2
  tail -n 40 build/install.log >&2
  exit "$status"
fi
echo "$want" > "$STAMP_FILE"
echo "dsmoe: installed in $((SECONDS - start))s"
