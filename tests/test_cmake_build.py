"""The CMake half of the build: configures and builds the op library and the C++ benchmark with
ninja against the torch of this interpreter, then runs the benchmark on a tiny shape.

Part of the product (C++ users link libdsmoe_ops), so it runs by default; it compiles the op
sources once more (about 1.5 min on 2 cores).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cmake"))
from dsmoe_sources import read_sources  # noqa: E402

TINY = ["--shape", "T8,h16,I8,E4,k2", "--iters", "1", "--warmup", "0", "--device", "cpu"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is needed to build dsmoe's C++ targets: install it (pip install {name})"
    return path


def _configure(source: Path, build: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        _tool("cmake"), "-S", str(source), "-B", str(build), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", f"-DDSMOE_PYTHON={sys.executable}",
        # The CUDA kernels are compiled by the CI's nvcc step; here the C++ path is what counts.
        "-DDSMOE_CUDA=OFF", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "DSMOE_CUDA"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def registered_op_names() -> list[str]:
    """Every op schema of csrc/registration.cpp (the one TORCH_LIBRARY)."""
    text = (ROOT / "csrc" / "registration.cpp").read_text()
    names = re.findall(r'm\.def\(\s*"([a-z_0-9]+)\(', text)
    assert names, "no m.def(\"name(...\") found in csrc/registration.cpp"
    return names


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cmake-build")
    configured = _configure(ROOT, build)
    assert configured.returncode == 0, f"cmake configure failed:\n{configured.stdout}\n{configured.stderr}"
    built = subprocess.run([_tool("cmake"), "--build", str(build)], capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, f"cmake --build failed:\n{built.stdout[-6000:]}\n{built.stderr[-6000:]}"
    return build


def _bench(build: Path) -> Path:
    path = build / "benchmarks" / "cpp" / "bench_ops"
    assert path.is_file(), f"the build made no {path}"
    return path


def _table(stdout: str) -> list[dict]:
    """Rows of bench_ops' table as dicts keyed by its header."""
    lines = [line for line in stdout.splitlines() if line and not line.startswith("#")]
    header = lines[0].split()
    assert header[:4] == ["dev", "dtype", "shape", "op"], f"unexpected table header {lines[0]!r}"
    rows = []
    for line in lines[1:]:
        # The shape column has spaces; split it off by the fixed fields around it.
        parts = line.split()
        dev, dtype = parts[0], parts[1]
        rest = parts[2:]
        shape_end = next(i for i, p in enumerate(rest) if p.startswith("dsmoe::") or p == "layer")
        op, *case_and_numbers = rest[shape_end:]
        median_ms, min_ms, gflops, gbps = case_and_numbers[-4:]
        rows.append({
            "dev": dev, "dtype": dtype, "shape": " ".join(rest[:shape_end]), "op": op,
            "case": " ".join(case_and_numbers[:-4]), "median_ms": float(median_ms),
            "min_ms": float(min_ms), "gflops": gflops, "gbps": gbps,
        })
    return rows


def test_compiles_exactly_the_listed_sources(build_dir):
    """The op library is built from csrc/sources.txt's ops list (CPU build), nothing else."""
    commands = json.loads((build_dir / "compile_commands.json").read_text())
    compiled = {Path(c["file"]).resolve() for c in commands}
    listed = {(ROOT / p).resolve() for p in read_sources(ROOT)["ops"]}
    benches = set((ROOT / "benchmarks" / "cpp").resolve().glob("*.cpp"))
    assert compiled == listed | benches


def test_bench_times_every_op(build_dir):
    done = subprocess.run([str(_bench(build_dir)), *TINY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"bench_ops failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    assert done.stdout.startswith("# dsmoe bench_ops: torch ")
    rows = _table(done.stdout)
    for dtype in ("fp32", "bf16"):
        ops = {r["op"] for r in rows if r["dtype"] == dtype}
        for name in registered_op_names():
            assert f"dsmoe::{name}" in ops, f"bench_ops did not time dsmoe::{name} in {dtype}"
        layer_cases = {r["case"] for r in rows if r["dtype"] == dtype and r["op"] == "layer"}
        assert layer_cases == {"fwd", "fwd+bwd"}
    for row in rows:
        assert row["dev"] == "cpu" and row["shape"] == "T8 h16 I8 E4 k2", row
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
        assert row["min_ms"] <= row["median_ms"], row
        if row["op"] in ("dsmoe::grouped_gemm", "dsmoe::grouped_gemm_wgrad", "layer"):
            assert float(row["gflops"]) > 0, row


def test_bench_rejects_bad_arguments(build_dir):
    bench = str(_bench(build_dir))
    for args, message in [
        (["--shape", "T8,h16,I8,E4"], "must give all of T, h, I, E and k"),
        (["--shape", "T8,h16,I8,E4,k5"], "k must be <= E"),
        (["--shape", "T8,x3"], "must start with T, h, I, E or k"),
        (["--dtype", "int8"], "--dtype must be fp32, bf16, fp16 or fp64"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--routing", "zipf"], "--routing must be uniform or skewed"),
    ]:
        done = subprocess.run([bench, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)


def test_skewed_routing_runs(build_dir):
    done = subprocess.run([str(_bench(build_dir)), *TINY, "--dtype", "fp32", "--routing", "skewed"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    rows = _table(done.stdout)
    assert rows and all(r["shape"] == "T8 h16 I8 E4 k2 skew" for r in rows)


def test_bad_source_list_stops_configure(tmp_path):
    """A source list naming a missing file fails at configure time, naming the line."""
    source = tmp_path / "src"
    for part in ("CMakeLists.txt", "setup.py"):
        (source / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / part, source / part)
    shutil.copytree(ROOT / "cmake", source / "cmake")
    shutil.copytree(ROOT / "csrc", source / "csrc")
    shutil.copytree(ROOT / "benchmarks" / "cpp", source / "benchmarks" / "cpp")
    sources = source / "csrc" / "sources.txt"
    sources.write_text(sources.read_text() + "ops     csrc/cpu/missing.cpp\n")
    done = _configure(source, tmp_path / "build")
    assert done.returncode != 0
    assert "csrc/cpu/missing.cpp does not exist" in done.stderr, done.stderr


def test_op_library_links_the_shared_libstdcxx(build_dir):
    from test_build_linkage import assert_shared_libstdcxx

    libraries = list(build_dir.rglob("libdsmoe_ops.so"))
    assert libraries, f"the build made no libdsmoe_ops.so under {build_dir}"
    assert_shared_libstdcxx(libraries[0])
    assert_shared_libstdcxx(_bench(build_dir))
