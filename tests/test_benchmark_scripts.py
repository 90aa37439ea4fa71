"""The GPU benchmark scripts' host-side code, which a CPU run can reach: a bug there loses a
device session's measurements after they are taken (bench_grouped_gemm.py once crashed on its
last line, an undefined name, after timing every GEMM on an H200)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grouped_gemm_table_says_where_how_and_the_ratios():
    bench = load("bench_grouped_gemm")
    args = argparse.Namespace(dtype="bf16", routing="uniform", reps=10)
    M, N, K = 49152, 2816, 2048
    flop = 2.0 * M * N * K
    row = dict(shape="ds16b", T=8192, gemm="fwd gate_up", M=M, N=N, K=K, dsmoe_ms=0.5, gmm_ms=0.75,
               dense_ms=0.4, dsmoe_tflops=flop / 0.5 / 1e9, gmm_tflops=flop / 0.75 / 1e9,
               dense_tflops=flop / 0.4 / 1e9, rel_err_vs_gmm=1e-3)
    lines = bench.markdown_table([row], "NVIDIA H200", args, ["--shapes", "ds16b"],
                                 {"DSMOE_GROUPED_GEMM_TILE": "narrow"})
    assert lines[0].startswith("NVIDIA H200, bf16, uniform routing, median of 10 ")
    assert "--shapes ds16b" in lines[0] and "DSMOE_GROUPED_GEMM_TILE" in lines[0]
    cells = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert cells[:4] == ["ds16b", "8192", "fwd gate_up", f"{M}x{N}x{K}"]
    assert cells[4:7] == ["0.500", "0.750", "0.400"]
    assert cells[7] == f"{flop / 0.5e-3 / 1e12:.0f}" == "1134"  # TFLOP/s = 2MNK / seconds / 1e12
    assert cells[10] == "1.50x"  # _grouped_mm time over dsmoe's
    assert cells[11] == "80%"  # of the dense GEMM's rate: 0.4 / 0.5
    assert len(lines) == 5 and lines[2].count("|") == lines[-1].count("|")
    assert bench.markdown_table([], "d", args, [], {})[0].endswith("env {})")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
@pytest.mark.parametrize("script", ["bench_grouped_gemm", "bench_cuda_ops", "bench_cuda_moe"])
def test_gpu_benchmarks_say_they_need_a_gpu(script):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "CUDA device" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_gpu_check_script_is_valid_bash_and_names_every_step():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for step in ("build", "errors", "tests", "memcheck", "bench", "sanitize"):
        assert f"step {step} " in text, step


def test_layer_benchmark_runs_every_implementation_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    bench = load("bench_cuda_moe")
    out = tmp_path / "table.md"
    assert bench.main(["--device", "cpu", "--shapes", "tiny", "--dtype", "fp32", "--reps", "1", "--warmup", "0",
                       "--slow-reps", "1", "--out", str(out)]) == 0
    table = out.read_text().splitlines()
    assert "--device cpu --shapes tiny" in table[0]
    row = [c.strip() for c in table[-1].strip("|").split("|")]
    assert row[:2] == ["tiny", "96"] and len(row) == 2 + len(bench.IMPLS) + 2
    cells = dict(zip(bench.IMPLS, row[2:]))
    assert cells["hf_infer"].endswith("/ —")  # forward only
    for impl in set(bench.IMPLS) - {"hf_infer"}:
        fwd, bwd = (float(v) for v in cells[impl].split(" / "))
        assert fwd > 0 and bwd > 0, impl
    printed = capsys.readouterr().out
    assert printed.count("tiny T=96 fwd ") == len(bench.IMPLS) and printed.count("fwd+bwd") >= len(bench.IMPLS) - 1


def test_layer_table_ratios():
    bench = load("bench_cuda_moe")
    rows = [dict(shape="ds16b", T=8192, mode=m, impl=i, ms=v) for m, i, v in [
        ("fwd", "dsmoe_layer", 2.0), ("fwd+bwd", "dsmoe_layer", 5.0), ("fwd", "grouped_mm", 4.0),
        ("fwd+bwd", "grouped_mm", 11.0), ("fwd+bwd", "hf_train", 170.0)]]
    lines = bench.markdown_table(rows, "H")
    assert lines[0] == "H"
    row = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert row == ["ds16b", "8192", "2.000 / 5.000", "4.000 / 11.000", "— / 170.000", "2.00x / 2.20x", "34.00x"]
    rows[2]["wrong"] = True  # a result that differed from the first implementation's
    row = [c.strip() for c in bench.markdown_table(rows, "H")[-1].strip("|").split("|")]
    assert row[3] == "4.000 (wrong result) / 11.000"


def test_layer_benchmark_refuses_unknown_names():
    bench = load("bench_cuda_moe")
    for argv in (["--shapes", "ds16b,huge"], ["--impls", "dsmoe,megablocks"], ["--shapes", ""]):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv + ["--device", "cpu"])
        assert exc.value.code == 2
