"""`dsmoe bench` and `dsmoe info` in-process: shape selection, the layer it times, the timing
loop's counts and median, refusals in full, the table's rows, and info's lines."""
from __future__ import annotations

import argparse
import builtins

import pytest
import torch

from dsmoe.cli import bench, info
from dsmoe.cli.common import CLIError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ns(module, *argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(list(argv))


def test_shapes(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench._shapes(_ns(bench), cpu) == [("small", bench.SHAPES["small"]), ("s64", bench.SHAPES["s64"])]
    assert [n for n, _ in bench._shapes(_ns(bench), cuda)] == ["ds16b", "fine"]
    (name, shape), = bench._shapes(_ns(bench, "--shape", "fine", "--tokens", "100"), cpu)
    assert name == "fine" and shape == (100, 100) + bench.SHAPES["fine"][2:]
    assert bench._shapes(_ns(bench, "--shape", "gshard", "small"), cpu) == [
        ("gshard", bench.SHAPES["gshard"]), ("small", bench.SHAPES["small"])]
    custom = _ns(bench, "--hidden", "32", "--inter", "16", "--experts", "4", "--topk", "2")
    assert bench._shapes(custom, cpu) == [("T2048 h32 I16 E4 k2", (2048, 2048, 32, 16, 4, 2, 0))]
    custom = _ns(bench, "--hidden", "32", "--inter", "16", "--experts", "4", "--topk", "2", "--shared", "3", "--tokens", "9")
    assert bench._shapes(custom, cpu) == [("T9 h32 I16 E4 k2 +3", (9, 9, 32, 16, 4, 2, 3))]
    for missing in ("--hidden", "--inter", "--experts", "--topk"):
        argv = [a for pair in (("--hidden", "32"), ("--inter", "16"), ("--experts", "4"), ("--topk", "2"))
                if pair[0] != missing for a in pair]
        with pytest.raises(CLIError) as e:
            bench._shapes(_ns(bench, *argv), cpu)
        assert str(e.value) == "a custom shape needs all of --hidden, --inter, --experts, --topk"


def test_the_timed_layer():
    layer = bench._layer((8, 8, 32, 16, 4, 2, 1), torch.bfloat16, torch.device("cpu"), seed=3)
    assert layer.experts.w_gate_up.shape[0] == 4 and layer.experts.w_down.shape[0] == 4
    assert {p.dtype for p in layer.parameters() if p.is_floating_point()} == {torch.bfloat16}
    std = layer.experts.w_gate_up.float().std().item()
    assert 0.015 < std < 0.025  # normal(0, 0.02): outputs of a useful size, not the zero init
    again = bench._layer((8, 8, 32, 16, 4, 2, 1), torch.bfloat16, torch.device("cpu"), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), again.state_dict().values()))
    assert layer.shared_experts is not None
    assert bench._layer((8, 8, 32, 16, 4, 2, 0), torch.float32, torch.device("cpu"), 0).shared_experts is None
    assert (layer.gate.num_experts, layer.gate.top_k, layer.gate.hidden_size) == (4, 2, 32)
    assert layer.config.moe_intermediate_size == 16 and layer.config.aux_loss_alpha == 0.001
    with pytest.raises(CLIError) as e:
        bench._layer((8, 8, 32, 16, 4, 5, 0), torch.float32, torch.device("cpu"), 0)
    assert str(e.value) == "--topk 5 exceeds --experts 4"


def test_timing_loop_counts_and_median(monkeypatch):
    calls = []
    clock = iter([0.0, 0.003, 1.0, 1.001, 2.0, 2.010])  # 3 ms, 1 ms, 10 ms
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench._time(lambda: calls.append(1), reps=3, warmup=2, device=torch.device("cpu")) == pytest.approx(3.0)
    assert len(calls) == 5


@pytest.mark.parametrize("argv, message", [
    (["--reps", "0"], "--reps must be >= 1 and --warmup >= 0"),
    (["--warmup", "-1"], "--reps must be >= 1 and --warmup >= 0"),
    (["--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1, got -1"),
    (["--device", "meta"], "--device meta: only cpu and cuda are supported"),
])
def test_bench_refusals(argv, message):
    with pytest.raises(CLIError) as e:
        bench.run(_ns(bench, *argv))
    assert str(e.value) == message


def test_bench_table(capsys, monkeypatch):
    seen = []
    real = bench._time
    monkeypatch.setattr(bench, "_time", lambda fn, reps, warmup, device: (seen.append((reps, warmup)),
                                                                         real(fn, reps, warmup, device))[1])
    argv = ["--tokens", "16", "--hidden", "32", "--inter", "16", "--experts", "4", "--topk", "2", "--warmup", "1"]
    assert bench.run(_ns(bench, *argv, "--dtype", "fp32", "bf16")) == 0
    out = capsys.readouterr().out
    assert seen == [(5, 1)] * 8  # CPU default: 5 repetitions; 2 impls x 2 modes x 2 dtypes
    assert out.startswith(f"dsmoe bench on cpu ({bench.cpu_name()}, {torch.get_num_threads()} threads), torch "
                          f"{torch.__version__}; median of 5 (after 1 warm-up)\n")
    rows = [line.split() for line in out.splitlines() if line.startswith("T16 ")]
    assert [r[5:7] for r in rows] == [["fp32", "fwd"], ["fp32", "fwd+bwd"], ["bf16", "fwd"], ["bf16", "fwd+bwd"]]
    assert all(r[-1].endswith("x") for r in rows if r[6] == "fwd+bwd")  # the speed-up, last when no diff
    assert float(rows[0][-1]) < 1e-5 and float(rows[2][-1]) < 0.05  # fp32 / bf16 paths agree
    assert out.rstrip().endswith("shapes: T16 h32 I16 E4 k2: h32 I16 E4 top-2 +0 shared")
    seen.clear()
    assert bench.run(_ns(bench, *argv, "--impl", "dsmoe", "--mode", "fwd", "--reps", "2")) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("T16 ")]
    assert seen == [(2, 1)] and len(rows) == 1
    assert rows[0][-3:] == ["-", "-", "-"]  # no reference: no time, speed-up or difference


def test_cpu_name(monkeypatch):
    name = bench.cpu_name()
    assert name and name == name.strip()
    real_open = builtins.open

    def no_proc(path, *a, **kw):
        if str(path) == "/proc/cpuinfo":
            raise OSError(2, "No such file or directory")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", no_proc)
    import platform

    monkeypatch.setattr(platform, "processor", lambda: "")
    assert bench.cpu_name() == "CPU"
    monkeypatch.setattr(platform, "processor", lambda: "x86_64")
    assert bench.cpu_name() == "x86_64"


def test_info_lines(capsys):
    import dsmoe

    assert info.run(_ns(info)) == 0
    out = capsys.readouterr().out.splitlines()
    built = dsmoe.build_info()
    assert out[0] == f"dsmoe {built['version']}"
    cuda = f"on (archs {built.get('cuda_archs')})" if built.get("cuda") else "off"
    assert out[1] == f"  built against torch {built.get('torch_version')}, CUDA kernels {cuda}"
    k = dsmoe.cpu_kernels()
    assert f"  CPU kernels: elementwise {k['vec_isa']}, bf16 GEMM " in "\n".join(out)
    assert "Backend settings in force (dsmoe.set_backend; defaults from the environment):" in out
    assert ("GPU: none visible" in out) != torch.cuda.is_available()
    assert not any(line.startswith("preset") for line in out)


def test_info_presets_table(capsys):
    assert info.run(_ns(info, "--presets")) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("tiny ", "compare-dense "))}
    assert rows["compare-dense"][3] == "dense"
    from dsmoe.cli.models import make_config, parameter_counts

    cfg = make_config("tiny")
    total, active = parameter_counts(cfg)
    assert rows["tiny"][1:] == [str(cfg.num_hidden_layers), str(cfg.hidden_size),
                                f"{cfg.n_shared_experts or 0}+{cfg.n_routed_experts}", f"top-{cfg.num_experts_per_tok}",
                                f"{total / 1e6:.2f}M", f"{active / 1e6:.2f}M"]
    assert "`dsmoe train` gives a preset the byte-level one of 259 tokens" in out


@pytest.mark.parametrize("n, shown", [(999_999, "1.00M"), (1_234_567, "1.23M"), (999_999_999, "1000.00M"),
                                      (10**9, "1.0B"), (16_400_000_000, "16.4B")])
def test_human_counts(n, shown):
    assert info._human(n) == shown
