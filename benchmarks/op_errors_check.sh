#!/usr/bin/env bash
# Does an op given bad arguments raise a RuntimeError in this build, on the CPU and on the GPU?
# On the first GPU runs (H200, torch 2.11, the extension built with the image's /opt/gcc) every
# C++ argument error of the extension, the CPU ops' too, ended the process with a segmentation
# fault: /opt/gcc's own library folder has only libstdc++.a, so _C.so carried a static libstdc++
# (found by this script's CPU-only builds: /opt/gcc's crashed, /usr/bin/g++'s raised). setup.py
# now links libstdc++.so.6 by name. Run by gpu_check.sh after the build, as a guard; when the check
# crashes it prints what tells causes apart: the compilers, the libraries the extension loads, a
# native backtrace (cuda-gdb), and the same check on CPU-only builds made with the same compiler
# (is it the CUDA build?) and, where there is one, with the system's g++.
#
#   bash benchmarks/op_errors_check.sh        (from the repository root, after the build)
set -uo pipefail
PY=${PY:-${PYTHON:-python3}}
code='
import torch, dsmoe
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and dsmoe.build_info()["cuda"] else [])
for dev in devices:
    try:
        dsmoe.ops.swiglu(torch.randn(3, 3, device=dev))
    except RuntimeError as e:
        print(dev, "raised:", str(e).splitlines()[0], flush=True)
    else:
        raise SystemExit(f"{dev}: no error for an odd gate_up width")
'
"$PY" -c "$code"
rc=$?
[ $rc -eq 0 ] && exit 0
echo "== the check failed (rc=$rc; 139 is a segmentation fault): compilers, libraries, backtrace"
for cxx in /opt/gcc/bin/g++ /usr/bin/g++ "${CXX:-}"; do
  [ -n "$cxx" ] && [ -x "$cxx" ] && echo "$cxx: $("$cxx" --version | head -n 1)"
done
"$PY" -c 'import torch; print(torch.__config__.show())' 2>&1 | grep -iE "gcc|clang|compiler|abi" | cut -c1-300 | head -n 8
ldd dsmoe/_C*.so | grep -E "stdc|gcc_s|gomp|c10|torch_cpu"
if command -v cuda-gdb >/dev/null; then
  timeout 120 cuda-gdb -batch -ex run -ex bt "--args" "$PY" -c "$code" 2>&1 | grep -vE "^\[(New|Thread)|^warning" | tail -n 40
fi
# The same check on CPU-only builds, out of the tree (the CUDA build in dsmoe/ stays).
for cxx in "" /usr/bin/g++; do
  [ -n "$cxx" ] && { [ -x "$cxx" ] || continue; }
  dir=/tmp/dsmoe-errors-build${cxx:+-system}
  rm -rf "$dir"
  echo "== CPU-only build${cxx:+ with $cxx}"
  if env DSMOE_CUDA=0 ${cxx:+CXX=$cxx} MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --build-lib "$dir/lib" \
      --build-temp "$dir/tmp" > "$dir.log" 2>&1; then
    cp -r dsmoe/*.py dsmoe/*/ "$dir/lib/dsmoe/" 2>/dev/null
    (cd /tmp && PYTHONPATH="$dir/lib" "$PY" -c "$code") && echo "CPU-only build${cxx:+ with $cxx}: raises" ||
      echo "CPU-only build${cxx:+ with $cxx}: crashes too (rc=$?)"
  else
    echo "build failed: tail of $dir.log"; tail -n 5 "$dir.log"
  fi
done
exit 1
