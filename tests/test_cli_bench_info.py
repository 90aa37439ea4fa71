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


def test_bench_options():
    assert vars(_ns(bench)) == dict(shape=None, tokens=None, hidden=None, inter=None, experts=None, topk=None, shared=None,
                                    dtype=["fp32"], mode=["fwd", "fwdbwd"], impl=["dsmoe", "reference"], reps=None,
                                    warmup=2, device="auto", seed=0)
    assert _ns(bench, "--seed", "5").seed == 5 and _ns(bench, "--impl", "reference").impl == ["reference"]
    with pytest.raises(SystemExit):
        _ns(bench, "--impl", "loop")


def test_the_timed_layer_at_the_edges():
    # every expert chosen (k = E); a hidden size of one even head (the layer's attention config is unused)
    layer = bench._layer((4, 4, 34, 8, 3, 3, 0), torch.float32, torch.device("cpu"), seed=0)
    assert layer.gate.top_k == layer.gate.num_experts == 3 and layer.gate.hidden_size == 34
    w = layer.experts.w_down.detach()
    assert abs(w.mean().item()) < 0.005 and 0.015 < w.std().item() < 0.025  # normal(0, 0.02) too


def test_what_each_pass_times(monkeypatch, capsys):
    """Each row times what it says: the same seeded input for both paths; fwd in eval mode without
    autograd; fwd+bwd in training mode, backpropagating a fixed seeded gradient of the output plus
    the balance loss, the parameters' gradients dropped after each step. T is the shape's CPU count."""
    monkeypatch.setitem(bench.SHAPES, "probe", (5, 7, 32, 16, 4, 2, 1))
    monkeypatch.setitem(bench.SHAPES, "probe2", (3, 9, 16, 8, 4, 1, 0))
    calls, layers = [], []
    real_layer = bench._layer

    def layer_spy(shape, dtype, device, seed):
        layer = real_layer(shape, dtype, device, seed)
        real_forward = layer.forward

        def forward(x):
            out = real_forward(x)
            seen = dict(impl=layer.impl, training=layer.training, grad_enabled=torch.is_grad_enabled(),
                        x=x.detach().clone(), requires_grad=x.requires_grad)
            calls.append(seen)
            if out.hidden_states.requires_grad:
                out.hidden_states.register_hook(lambda g: seen.__setitem__("upstream", g.clone()))
                out.aux_loss.register_hook(lambda g: seen.__setitem__("aux_upstream", g.clone()))
            return out

        layer.forward = forward
        layers.append((layer, shape, dtype, seed))
        return layer

    times = iter([2.0, 5.0, 6.0, 20.0, 1.0, 1.0, 1.0, 1.0])  # (dsmoe, reference) x (fwd, fwd+bwd), per shape

    def one_call(fn, reps, warmup, device):
        fn()
        return next(times)

    monkeypatch.setattr(bench, "_layer", layer_spy)
    monkeypatch.setattr(bench, "_time", one_call)
    assert bench.run(_ns(bench, "--shape", "probe", "probe2", "--dtype", "bf16", "--seed", "3")) == 0
    assert [(shape, dtype, seed) for _, shape, dtype, seed in layers] == [
        (bench.SHAPES["probe"], torch.bfloat16, 3), (bench.SHAPES["probe2"], torch.bfloat16, 3)]
    g = torch.Generator().manual_seed(3)
    x, upstream = torch.randn(1, 5, 32, generator=g).bfloat16(), torch.randn(1, 5, 32, generator=g).bfloat16()
    # per path: the timed fwd, the timed fwd+bwd, then the untimed forward compared across paths
    probe = calls[:6]
    assert [(c["impl"], c["training"], c["grad_enabled"], c["requires_grad"]) for c in probe] == [
        ("dsmoe", False, False, False), ("dsmoe", True, True, True), ("dsmoe", False, False, False),
        ("reference", False, False, False), ("reference", True, True, True), ("reference", False, False, False)]
    for c in probe:
        assert torch.equal(c["x"], x)
    for c in (probe[1], probe[4]):
        assert torch.equal(c["upstream"], upstream) and c["aux_upstream"].item() == 1.0
    layer = layers[0][0]
    assert all(p.grad is None for p in layer.parameters())
    assert [c["x"].shape for c in calls[6:]] == [(1, 3, 16)] * 6

    out = capsys.readouterr().out.splitlines()
    assert out[1] == "fwd: inference (eval mode; reference = moe_infer); fwd+bwd: training (reference = loop over experts)"
    assert out[3].split() == ["shape", "dtype", "pass", "dsmoe", "ms", "reference", "ms", "speed-up", "max", "|diff|"]
    rows = [line.split() for line in out if line.startswith("probe")]
    assert [r[:6] for r in rows] == [["probe", "(T5)", "bf16", "fwd", "2.0000", "6.0000"],
                                     ["probe", "(T5)", "bf16", "fwd+bwd", "5.0000", "20.0"],
                                     ["probe2", "(T3)", "bf16", "fwd", "1.0000", "1.0000"],
                                     ["probe2", "(T3)", "bf16", "fwd+bwd", "1.0000", "1.0000"]]
    assert [r[6] for r in rows] == ["3.00x", "4.00x", "1.00x", "1.00x"]  # reference time / dsmoe time
    assert len(rows[1]) == 7 and float(rows[0][7]) < 0.05  # the difference, on the fwd row only
    assert out[-1] == "shapes: probe: h32 I16 E4 top-2 +1 shared; probe2: h16 I8 E4 top-1 +0 shared"
    # no --shape: the device's default shapes
    monkeypatch.setitem(bench.DEFAULT_SHAPES, "cpu", ("probe2",))
    times = iter([1.0] * 4)
    assert bench.run(_ns(bench, "--device", "cpu")) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in out if line.startswith("probe")] == [["probe2", "(T3)", "fp32", "fwd"],
                                                                              ["probe2", "(T3)", "fp32", "fwd+bwd"]]
    assert out[-1] == "shapes: probe2: h16 I8 E4 top-1 +0 shared"


def test_smallest_counts_run(capsys):
    argv = ["--tokens", "1", "--hidden", "16", "--inter", "8", "--experts", "2", "--topk", "1", "--reps", "1",
            "--warmup", "0"]
    assert bench.run(_ns(bench, *argv)) == 0
    assert "median of 1 (after 0 warm-up)" in capsys.readouterr().out


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

    def proc(path, *a, **kw):
        if str(path) == "/proc/cpuinfo":
            import io

            return io.StringIO("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13: 64-Core \n"
                               "model name\t: second\n")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", proc)
    assert bench.cpu_name() == "AMD EPYC 7B13: 64-Core"  # the first model name, whole
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


def test_info_on_a_machine_of_stand_ins(monkeypatch, capsys):
    """Every line from what dsmoe, torch and the machine report (stand-ins for a CUDA build on two GPUs)."""
    import dataclasses
    import platform
    import types

    import dsmoe

    monkeypatch.setattr(dsmoe, "build_info", lambda: {"version": "9.9", "torch_version": "2.99", "cuda": True,
                                                      "cuda_archs": "90a;100", "compiler": "gcc 13"})
    monkeypatch.setattr(dsmoe, "cpu_kernels", lambda: {"vec_isa": "avx512", "bf16_gemm": "fp32", "fp32_gemm": "mkl"})
    monkeypatch.setattr(info, "cpu_name", lambda: "Some CPU")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus = [types.SimpleNamespace(name="H200", total_memory=int(140.6 * 2**30), major=9, minor=0),
            types.SimpleNamespace(name="B200", total_memory=178 * 2**30, major=10, minor=0)]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpus[i])
    assert info.run(_ns(info)) == 0
    settings = [f"  {k}: {v}" for k, v in dataclasses.asdict(dsmoe.backend_settings()).items()]
    assert capsys.readouterr().out.splitlines() == [
        "dsmoe 9.9",
        "  built against torch 2.99, CUDA kernels on (archs 90a;100)",
        "  compiler: gcc 13",
        f"torch {torch.__version__} (CUDA 13.0), python 3.99.1",
        f"CPU: Some CPU, {torch.get_num_threads()} threads",
        "  CPU kernels: elementwise avx512, bf16 GEMM in fp32, fp32 GEMM mkl",
        "Backend settings in force (dsmoe.set_backend; defaults from the environment):",
        *settings,
        "GPU 0: H200, 141 GiB, sm_90",
        "GPU 1: B200, 178 GiB, sm_100",
    ]
    monkeypatch.setattr(dsmoe, "build_info", lambda: {"version": "9.9", "torch_version": "2.99", "cuda": False})
    monkeypatch.setattr(dsmoe, "cpu_kernels", lambda: {"vec_isa": "avx2", "bf16_gemm": "avx512_bf16", "fp32_gemm": "own"})
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert info.run(_ns(info)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:5] == ["  built against torch 2.99, CUDA kernels off", f"torch {torch.__version__} (CUDA none), python 3.99.1",
                        f"CPU: Some CPU, {torch.get_num_threads()} threads",
                        "  CPU kernels: elementwise avx2, bf16 GEMM avx512_bf16, fp32 GEMM own"]
    assert out[-1] == "GPU: none visible"


def test_info_presets_table(capsys):
    assert info.run(_ns(info, "--presets")) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("tiny ", "compare-dense "))}
    assert rows["compare-dense"][3] == "dense"
    header = next(line for line in out.splitlines() if line.startswith("preset "))
    assert header.split() == ["preset", "layers", "hidden", "experts", "params", "activated"]
    gshard = next(line.split() for line in out.splitlines() if line.startswith("compare-gshard "))
    assert gshard[3:5] == ["0+16", "top-2"]  # no shared expert
    from dsmoe.cli.models import make_config, parameter_counts

    cfg = make_config("tiny")
    total, active = parameter_counts(cfg)
    assert rows["tiny"][1:] == [str(cfg.num_hidden_layers), str(cfg.hidden_size),
                                f"{cfg.n_shared_experts or 0}+{cfg.n_routed_experts}", f"top-{cfg.num_experts_per_tok}",
                                f"{total / 1e6:.2f}M", f"{active / 1e6:.2f}M"]
    assert "`dsmoe train` gives a preset the byte-level one of 259 tokens" in out


@pytest.mark.parametrize("n, shown", [(999_999, "1.00M"), (1_234_567, "1.23M"), (999_999_999, "1000.00M"),
                                      (10**9, "1.0B"), (16_400_000_000, "16.4B"),
                                      (1_015_001, "1.02M"), (1_050_000_001, "1.1B")])  # rounding up: in millions / billions
def test_human_counts(n, shown):
    assert info._human(n) == shown
