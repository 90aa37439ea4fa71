"""The SIMT emulator catches the bugs a CUDA kernel author fears, on deliberately broken kernels
(tests/simt/broken_kernels.cpp), and runs their correct twins clean: a shuffle reached by half a
warp, a __syncthreads skipped by threads that returned early, a 16-byte vector load from an odd
offset, launches over CUDA's limits are errors naming the kernel (never a hang); a missing
__syncthreads between a shared-memory write and another thread's read is reported by
ThreadSanitizer (the emulator annotates its barriers and switches fibers without synchronising)
and changes the result in both thread orders. The harness needs no torch: g++ builds it with the
emulator runtime, plain and with -fsanitize=thread.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests/simt/broken_kernels.cpp", ROOT / "csrc/cuda/simt_runtime.cpp"]
HEADERS = [ROOT / "csrc/cuda/simt.cuh", ROOT / "csrc/cuda/vec_access.cuh"]
CXX = os.environ.get("CXX", "g++")

pytestmark = [pytest.mark.simt, pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs {CXX}")]


def _build(variant: str) -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + variant.encode()).hexdigest()[:16]
    out_dir = ROOT / "build" / "simt-harness"
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / f"broken_kernels-{variant}-{digest}"
    if exe.is_file():
        return exe
    base = [CXX, "-std=c++20", "-O1", "-g", f"-I{ROOT / 'csrc'}"]
    kernels, runtime = SOURCES
    objs = []
    for src, flags in ((kernels, ["-fsanitize=thread"] if variant == "tsan" else []),
                       (runtime, ["-DDSMOE_SIMT_TSAN=1"] if variant == "tsan" else [])):
        obj = out_dir / f"{src.stem}-{variant}-{digest}.o"
        subprocess.run(base + flags + ["-c", str(src), "-o", str(obj)], check=True)
        objs.append(str(obj))
    link = [CXX] + (["-fsanitize=thread"] if variant == "tsan" else []) + objs + ["-o", str(exe), "-lpthread"]
    subprocess.run(link, check=True)
    return exe


@pytest.fixture(scope="module")
def plain():
    return _build("plain")


@pytest.fixture(scope="module")
def tsan():
    exe = _build("tsan")
    probe = subprocess.run([str(exe), "barrier"], capture_output=True, text=True, timeout=120)
    if "unexpected memory mapping" in probe.stderr:  # kernels with high ASLR entropy; setarch helps
        pytest.skip("ThreadSanitizer cannot map its shadow memory on this kernel: " + probe.stderr.strip()[:200])
    return exe


def run(exe: Path, case: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    return subprocess.run([str(exe), case, *extra], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("case,message", [
    ("divergent_shuffle", r"__shfl_xor_sync at broken_kernels.cpp:\d+ in warp 0 reached by a subset of its mask's lanes: "
                          r"lanes 16,.*,31 exited"),
    ("early_exit_barrier", r"__syncthreads at broken_kernels.cpp:\d+ reached by 32 of 64 threads \(32 exited before it\)"),
    ("odd_vector_load", r"thread \(\d+,0,0\): misaligned 16-byte vector access"),
    ("too_many_threads", r"launch of butterfly_kernel: block \(2048,1,1\) exceeds CUDA's limits"),
    ("too_much_smem", r"launch of butterfly_kernel: 65536 bytes of dynamic shared memory exceed the kernel's limit of 49152"),
])
def test_broken_kernel_is_reported(plain, case, message, order):
    import re

    r = run(plain, case, order)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert re.search(message, r.stderr), r.stderr
    if not case.startswith("too_"):
        kernel = {"divergent_shuffle": "shuffle_kernel", "early_exit_barrier": "early_exit_kernel",
                  "odd_vector_load": "vector_load_kernel"}[case]
        assert r.stderr.startswith(f"kernel {kernel}, block (0,0,0)"), r.stderr


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("case", ["barrier", "shuffle", "full_barrier", "vector_load", "raised_smem_limit", "butterfly"])
def test_correct_twin_runs(plain, case, order):
    r = run(plain, case, order)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_missing_barrier_changes_the_result(plain, order):
    r = run(plain, "missing_barrier", order)
    assert r.returncode == 4 and "wrong result" in r.stderr, (r.returncode, r.stderr)


def test_missing_barrier_is_a_data_race_under_tsan(tsan):
    r = run(tsan, "missing_barrier")
    assert r.returncode == 66, (r.returncode, r.stderr[-2000:])
    assert "WARNING: ThreadSanitizer: data race" in r.stderr
    assert "neighbour_kernel" in r.stderr


@pytest.mark.parametrize("case", ["barrier", "shuffle", "full_barrier", "butterfly"])
def test_tsan_sees_no_race_where_barriers_order_the_accesses(tsan, case):
    r = run(tsan, case)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "ThreadSanitizer" not in r.stderr
