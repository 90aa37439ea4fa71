#!/usr/bin/env bash
# Installs dsmoe from source with what it needs: the CPU torch wheel this kind of machine has on
# disk (a CUDA torch already installed is kept), the Python dependencies, and the extension
# built with ninja (CUDA kernels too when torch has CUDA and nvcc is found; DSMOE_CUDA=0|1 forces).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q numpy ninja pybind11 safetensors tokenizers tqdm matplotlib pytest expecttest setuptools wheel
# the optional [hf] extra, so that tests/test_hf_experts.py runs (transformers' MoE models, PEFT)
"$PY" -m pip install -q "transformers>=5.23" "peft>=0.17" accelerate
# cmake >= 3.25 for the C++ benchmark binaries (tests/test_cmake_build.py)
if ! cmake --version 2>/dev/null | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=25))}'; then
  "$PY" -m pip install -q "cmake>=3.25"
fi
"$PY" -m pip install -q --no-build-isolation -e .
