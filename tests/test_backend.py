"""dsmoe.backend: run-time settings (set_backend / use_backend, environment defaults read once),
weight forms made without per-call copies (the dense MLP's stacked gate|up), weights placed in
memory when made and converted (huge pages) without undoing shared memory."""
import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsmoe
from dsmoe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM
from dsmoe.backend import BACKENDS, backend_settings, set_backend, stacked, stacked_alias, use_backend
from dsmoe.layers import MLP

ROOT = Path(__file__).resolve().parents[1]


class _OpLog(TorchDispatchMode):
    """Every aten op run inside, with the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def copies_of(self, shape):
        """Ops that made a tensor of ``shape`` by copying (cat/clone/copy/contiguous)."""
        names = ("aten.cat", "aten.clone", "aten._to_copy", "aten.copy", "aten.stack")
        return [op for op, shapes in self.ops if op.startswith(names) and tuple(shape) in shapes]


def _small_config(**overrides):
    base = dict(vocab_size=64, hidden_size=256, intermediate_size=384, moe_intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8, n_shared_experts=2,
                num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64)
    base.update(overrides)
    return DeepSeekMoEConfig(**base)


# ---------------------------------------------------------------- settings


def test_settings_defaults_and_round_trip():
    s = backend_settings()
    assert dataclasses.asdict(s).keys() >= {"cpu_bf16_gemm", "cpu_fp32_gemm", "cuda_gemm_path", "huge_pages"}
    before = set_backend(cpu_fp32_gemm="mkl", dense_own_gemm_min_rows=17)
    try:
        assert backend_settings().cpu_fp32_gemm == "mkl"
        assert backend_settings().dense_own_gemm_min_rows == 17
        assert dsmoe.cpu_kernels()["fp32_gemm"] == "mkl"  # the kernels read the table
    finally:
        set_backend(**dataclasses.asdict(before))
    assert backend_settings() == s


def test_use_backend_restores_on_exit_and_on_error():
    s = backend_settings()
    with use_backend(cuda_gemm_path="simt", huge_pages=not s.huge_pages) as inside:
        assert inside.cuda_gemm_path == "simt" and inside.huge_pages != s.huge_pages
    assert backend_settings() == s
    with pytest.raises(KeyError):
        with use_backend(cpu_fp32_gemm="mkl"):
            raise KeyError("inside")
    assert backend_settings() == s


@pytest.mark.parametrize("changes, error, message", [
    (dict(cpu_fp32_gemm="cublas"), ValueError, "cpu_fp32_gemm must be one of"),
    (dict(cuda_gemm_tile="square"), ValueError, "cuda_gemm_tile must be one of"),
    (dict(cuda_gemm_verbose="yes"), TypeError, "cuda_gemm_verbose must be a bool"),
    (dict(huge_pages=1), TypeError, "huge_pages must be a bool"),
    (dict(dense_own_gemm_min_rows=-1), ValueError, "dense_own_gemm_min_rows must be an int"),
    (dict(fastest=True), TypeError, "unknown setting 'fastest'"),
])
def test_set_backend_refuses_bad_values_and_changes_nothing(changes, error, message):
    s = backend_settings()
    with pytest.raises(error, match=message):
        set_backend(cpu_bf16_gemm="onednn", **changes)  # a good value first: not applied either
    assert backend_settings() == s


def test_set_backend_refuses_a_kernel_this_cpu_cannot_run():
    s = backend_settings()
    if dsmoe.cpu_kernels()["cpu_avx512_bf16"]:
        with use_backend(cpu_bf16_gemm="avx512"):
            assert dsmoe.cpu_kernels()["bf16_gemm"] == "avx512"
    else:
        with pytest.raises(ValueError, match="no AVX512-BF16"):
            set_backend(cpu_bf16_gemm="avx512")
    assert backend_settings() == s


def _python(code, **env):
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)


def test_environment_is_the_default_read_once():
    code = ("import os, dsmoe; print(dsmoe.backend_settings().cpu_fp32_gemm, dsmoe.backend_settings().huge_pages); "
            "os.environ['DSMOE_CPU_FP32_GEMM'] = 'onednn'; os.environ['DSMOE_CPU_HUGE_PAGES'] = '1'; "
            "print(dsmoe.backend_settings().cpu_fp32_gemm, dsmoe.backend_settings().huge_pages)")
    r = _python(code, DSMOE_CPU_FP32_GEMM="mkl", DSMOE_CPU_HUGE_PAGES="0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["mkl", "False", "mkl", "False"]


def test_bad_environment_value_is_refused_naming_the_variable():
    r = _python("import dsmoe; dsmoe.backend_settings()", DSMOE_GROUPED_GEMM_PATH="fastest")
    assert r.returncode != 0 and "DSMOE_GROUPED_GEMM_PATH must be 'auto', 'sm90', 'sm80' or 'simt'" in r.stderr


def test_info_prints_the_settings_in_force():
    r = subprocess.run([sys.executable, "-m", "dsmoe", "info"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, DSMOE_CPU_FP32_GEMM="mkl", DSMOE_CPU_HUGE_PAGES="0",
                                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cpu_fp32_gemm: mkl" in r.stdout and "huge_pages: False" in r.stdout
    assert "fp32 GEMM mkl" in r.stdout


# ---------------------------------------------------------------- the dense MLP's stacked weight


def test_stacked_is_cat_without_a_copy():
    torch.manual_seed(0)
    mlp = MLP(32, 24)
    g, u = mlp.gate_proj.weight, mlp.up_proj.weight
    alias = stacked_alias(g, u)
    assert alias is not None and alias.data_ptr() == g.data_ptr()
    torch.testing.assert_close(alias, torch.cat([g, u]), rtol=0, atol=0)
    # differentiable: the gradient reaches both parameters, as through cat
    grad = torch.randn(48, 32)
    got = torch.autograd.grad(stacked(g, u), [g, u], grad)
    want = torch.autograd.grad(torch.cat([g, u]), [g, u], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # not one storage: the copy
    other = torch.randn(24, 32)
    assert stacked_alias(g, other) is None
    torch.testing.assert_close(stacked(g, other), torch.cat([g, other]), rtol=0, atol=0)
    assert stacked_alias(u, g) is None  # wrong order


def _mlp_on_own_gemm(monkeypatch):
    backend = BACKENDS["dsmoe"]
    monkeypatch.setattr(backend, "own_cpu_gemm", lambda dtype: True)  # the path on any CPU
    return use_backend(dense_own_gemm_min_rows=1)


@pytest.mark.parametrize("convert", ["none", "to_bf16", "share_memory", "double_round_trip"])
def test_dense_mlp_forward_makes_no_weight_copy(convert, monkeypatch):
    """The own-GEMM path multiplies by the gate|up weight as it is stored: no cat of the weights,
    in eval and in training (forward and backward), also after conversions."""
    torch.manual_seed(0)
    mlp = MLP(64, 96)
    dtype = torch.float32
    if convert == "to_bf16":
        mlp, dtype = mlp.to(torch.bfloat16), torch.bfloat16
    elif convert == "share_memory":
        mlp.share_memory()
    elif convert == "double_round_trip":
        mlp = mlp.double().float()
    assert stacked_alias(mlp.gate_proj.weight, mlp.up_proj.weight) is not None
    x = torch.randn(40, 64, dtype=dtype, requires_grad=True)
    with _mlp_on_own_gemm(monkeypatch):
        assert BACKENDS["dsmoe"]._on_own_cpu_gemm(mlp, x)
        with torch.no_grad(), _OpLog() as log:
            out = mlp(x)
        assert log.copies_of((192, 64)) == [], log.ops
        assert any("dsmoe.grouped_gemm" in op for op, _ in log.ops)  # the path ran
        with _OpLog() as log:
            mlp(x).square().sum().backward()
        assert log.copies_of((192, 64)) == [], log.ops
    want = mlp(x, dsmoe_kernels=False)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, want.detach(), **tol)


def test_dense_mlp_gradients_through_the_alias_match_cat(monkeypatch):
    torch.manual_seed(0)
    mlp = MLP(32, 16)
    ref = copy.deepcopy(mlp)
    x = torch.randn(20, 32)
    with _mlp_on_own_gemm(monkeypatch):
        mlp(x).square().sum().backward()
    ref(x, dsmoe_kernels=False).square().sum().backward()
    for a, b in zip(mlp.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_optimizer_updates_keep_the_stack(monkeypatch):
    """In-place updates of the two parameters are updates of the stacked weight."""
    torch.manual_seed(0)
    mlp = MLP(16, 8)
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-2)
    x = torch.randn(12, 16)
    with _mlp_on_own_gemm(monkeypatch):
        for _ in range(3):
            opt.zero_grad()
            mlp(x).square().sum().backward()
            opt.step()
    alias = stacked_alias(mlp.gate_proj.weight, mlp.up_proj.weight)
    torch.testing.assert_close(alias, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), rtol=0, atol=0)


# ---------------------------------------------------------------- whole models


def test_share_memory_leaves_every_parameter_shared():
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(_small_config())
    experts = model.model.layers[1].mlp.experts
    assert experts.w_gate_up.numel() * 4 >= 2 << 20  # large enough for huge pages
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    model.share_memory()
    for name, p in model.named_parameters():
        assert p.is_shared(), name
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 8)))
    after = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert before.keys() == after.keys()
    for name, p in model.named_parameters():
        assert p.is_shared(), f"{name} lost its shared memory after a forward"
    shared = model.model.layers[1].mlp.shared_experts
    assert stacked_alias(shared.gate_proj.weight, shared.up_proj.weight) is not None


def test_shared_weights_are_seen_by_another_process():
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(_small_config())
    model.share_memory()
    ctx = torch.multiprocessing.get_context("fork")
    experts = model.model.layers[1].mlp.experts

    proc = ctx.Process(target=_fill_ones, args=(experts.w_gate_up,))
    proc.start()
    proc.join(60)
    if proc.exitcode is None:
        proc.kill()
    assert proc.exitcode == 0
    assert bool((experts.w_gate_up == 1).all())


def _fill_ones(t):
    # numpy, not torch: a forked child must not touch the parent's OpenMP pool.
    t.detach().numpy().fill(1.0)
    os._exit(0)


def _train(model, steps=3):
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 12))
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    return losses


@pytest.mark.parametrize("dtype, via", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_to_dtype_round_trip_keeps_training_bit_exact(dtype, via):
    torch.manual_seed(0)
    a = DeepSeekMoEForCausalLM(_small_config()).to(dtype)
    b = copy.deepcopy(a).to(via).to(dtype)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    mlp = b.model.layers[0].mlp
    assert stacked_alias(mlp.gate_proj.weight, mlp.up_proj.weight) is not None
    for la, lb in zip(_train(a), _train(b)):
        assert torch.equal(la, lb)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs after training"


def test_expert_weights_are_made_and_converted_on_huge_pages():
    if not backend_settings().huge_pages:
        pytest.skip("huge pages are turned off in this environment (DSMOE_CPU_HUGE_PAGES=0)")
    model = DeepSeekMoEForCausalLM(_small_config())
    experts = model.model.layers[1].mlp.experts
    # Weights of 2 MiB or more: fp32 w_gate_up 4 MiB, w_down 2 MiB; bf16 w_gate_up 2 MiB (w_down 1 MiB is not).
    aligned = lambda *ps: all(p.data_ptr() % (2 << 20) == 0 for p in ps)  # noqa: E731
    assert aligned(experts.w_gate_up, experts.w_down)
    model.to(torch.bfloat16)
    assert experts.w_gate_up.dtype == torch.bfloat16
    assert aligned(experts.w_gate_up)
    with use_backend(huge_pages=False):
        plain = DeepSeekMoEForCausalLM(_small_config())
        plain.to(torch.float64)  # conversions do not place them either
    assert plain.model.layers[1].mlp.experts.w_gate_up.dtype == torch.float64


def test_from_pretrained_keeps_the_stack(tmp_path):
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(_small_config())
    model.save_pretrained(tmp_path / "m")
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    for layer in loaded.model.layers:
        mlp = layer.mlp.shared_experts if layer.is_moe else layer.mlp
        assert stacked_alias(mlp.gate_proj.weight, mlp.up_proj.weight) is not None
    experts = loaded.model.layers[1].mlp.experts
    if backend_settings().huge_pages:
        assert experts.w_gate_up.data_ptr() % (2 << 20) == 0
    torch.testing.assert_close(experts.w_gate_up, model.model.layers[1].mlp.experts.w_gate_up.bfloat16(), rtol=0, atol=0)
