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


# ---------------------------------------------------------------- the survivors of the mutation
# pass over dsmoe/backend.py (docs/mutation_testing.md)


def test_dense_own_gemm_min_rows_accepts_zero_and_refuses_non_ints():
    s = backend_settings()
    with use_backend(dense_own_gemm_min_rows=0):  # ">= 0": every MLP on the own GEMM where it runs
        assert backend_settings().dense_own_gemm_min_rows == 0
    for bad in (True, "3", 2.0):
        with pytest.raises(ValueError, match=f"^set_backend: dense_own_gemm_min_rows must be an int >= 0, got {bad!r}$"):
            set_backend(dense_own_gemm_min_rows=bad)
    assert backend_settings() == s


def test_unknown_setting_message_lists_every_setting():
    names = ", ".join(f.name for f in dataclasses.fields(dsmoe.BackendSettings))
    assert names.startswith("cpu_bf16_gemm, cpu_fp32_gemm, ")  # the list is the dataclass's, in order
    with pytest.raises(TypeError) as e:
        set_backend(fastest=True)
    assert str(e.value) == f"set_backend: unknown setting 'fastest'; the settings are {names}"


def test_bool_kernel_setting_round_trips_and_survives_a_refused_change():
    s = backend_settings()
    try:
        set_backend(cuda_gemm_verbose=True)
        assert backend_settings().cuda_gemm_verbose is True
        set_backend(cuda_gemm_verbose=False)
        assert backend_settings().cuda_gemm_verbose is False
        set_backend(cuda_gemm_verbose=True)
        if not dsmoe.cpu_kernels()["cpu_avx512_bf16"]:
            # refused by the kernels after cuda_gemm_verbose was written: everything restored
            with pytest.raises(ValueError, match="no AVX512-BF16"):
                set_backend(cuda_gemm_verbose=False, cpu_bf16_gemm="avx512")
            assert backend_settings().cuda_gemm_verbose is True
    finally:
        set_backend(**dataclasses.asdict(s))
    assert backend_settings() == s


class _Holder(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b


def test_deepcopy_keeps_what_is_shared_shared():
    first, second = MLP(32, 48), MLP(32, 48)
    second.down_proj = first.down_proj  # one Linear in two MLPs (tied by a user)
    first.extra = {"owner": first}  # a reference back to the module
    twin = copy.deepcopy(_Holder(first, second))
    assert twin.b.down_proj is twin.a.down_proj and twin.a.down_proj is not first.down_proj
    assert twin.a.extra["owner"] is twin.a
    assert stacked_alias(twin.a.gate_proj.weight, twin.a.up_proj.weight) is not None  # still stacked


def test_reference_route_applies_the_selection_bias():
    torch.manual_seed(0)
    logits = torch.randn(16, 8)
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 selected for every token
    # (weights, expert_ids, tokens_per_expert, score_sums) from both
    ref, fused = BACKENDS["reference"].route(logits, 2, True, bias, 1), BACKENDS["dsmoe"].route(logits, 2, True, bias, 1)
    assert (ref[1] == 5).any(-1).all()
    assert torch.equal(ref[1].sort(-1).values.long(), fused[1].sort(-1).values.long())


def test_reference_routed_experts_weight_in_the_model_dtype():
    # the seeds' gate gives routing weights in the model's dtype: scaled by the bf16 weight
    from dsmoe import reference

    torch.manual_seed(0)
    x = torch.randn(6, 16).bfloat16()
    w_gate_up, w_down = torch.randn(4, 24, 16).bfloat16() * 0.3, torch.randn(4, 16, 12).bfloat16() * 0.3
    ids = torch.randint(0, 4, (6, 2))
    weights = torch.rand(6, 2) + 0.01  # fp32, not exact in bf16
    out = BACKENDS["reference"].routed_experts(x, weights, ids, w_gate_up, w_down, training=False)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.moe_infer(x, ids, weights.bfloat16(), w_gate_up, w_down))


def test_routed_experts_layouts():
    from dsmoe import reference
    from dsmoe.backend import routed_experts

    torch.manual_seed(0)
    x, ids, weights = torch.randn(5, 16), torch.randint(0, 3, (5, 2)), torch.rand(5, 2)
    w_gate_up, w_down = torch.randn(3, 24, 16), torch.randn(3, 16, 12)
    expected = reference.moe_infer(x, ids, weights, w_gate_up, w_down)
    # default: [E, 2I, h] / [E, h, I], as RoutedExperts stores them
    torch.testing.assert_close(routed_experts(x, weights, ids, w_gate_up, w_down), expected, rtol=1e-5, atol=1e-5)
    wgu_t, wd_t = w_gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
    got = BACKENDS["dsmoe"].routed_experts(x, weights, ids, wgu_t, wd_t, trans_b=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _huge_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % (2 << 20) == 0


def test_on_huge_pages_places_only_new_large_plain_cpu_tensors():
    from dsmoe._ext import empty_huge_pages
    from dsmoe.backend import on_huge_pages

    big = torch.randn(1 << 20)  # 4 MiB of fp32
    returned = []

    def keep(fn):  # the conversion, remembering what it returned
        def wrapped(t):
            returned.append(fn(t))
            return returned[-1]
        return on_huge_pages(wrapped)

    with use_backend(huge_pages=True):
        placed = keep(lambda t: t.double())(big)  # new, large, plain, CPU: placed
        assert _huge_aligned(placed) and torch.equal(placed, big.double())
        # a copy, unless the allocator happened to align fn's result already (large mmaps may be)
        assert placed is not returned[-1] or _huge_aligned(returned[-1])
        small = keep(lambda t: t.double())(big[:100])
        assert small is returned[-1]  # under 2 MiB: as fn made it
        view = keep(lambda t: t.view(1024, 1024))(big)
        assert view is returned[-1] and view.data_ptr() == big.data_ptr()  # a view of the input
        sub = keep(lambda t: t.double().as_subclass(_TaggedTensor))(big)
        assert sub is returned[-1] and type(sub) is _TaggedTensor
        # already on 2 MiB pages (also at an odd multiple of 2 MiB): no second copy
        base = empty_huge_pages((4 << 20,), torch.float32)  # 16 MiB
        start = ((2 << 20) - base.data_ptr() % (4 << 20)) % (4 << 20) // 4  # ptr % 4 MiB == 2 MiB
        for offset in (0, start):
            aligned = keep(lambda t, o=offset: base[o : o + (1 << 20)])(big)
            assert aligned is returned[-1]
        assert keep(lambda t: t)(big) is big  # returned as it was
    with use_backend(huge_pages=False):
        off = keep(lambda t: t.double())(big)
        assert off is returned[-1]


class _TaggedTensor(torch.Tensor):
    """A tensor subclass (as a sharded or quantised weight would be): left as it is."""


def test_new_weight_device_dtype_and_placement(monkeypatch):
    from dsmoe import backend

    calls = []
    real = backend.empty_huge_pages
    monkeypatch.setattr(backend, "empty_huge_pages", lambda shape, dtype: calls.append(shape) or real(shape, dtype))
    with use_backend(huge_pages=True):
        meta = backend.new_weight((1024, 1024), device="meta", dtype=torch.bfloat16)
        assert meta.device.type == "meta" and meta.dtype == torch.bfloat16 and calls == []
        small = backend.new_weight((4, 4), dtype=torch.bfloat16)
        assert small.device.type == "cpu" and small.shape == (4, 4) and calls == []
        large = backend.new_weight((1024, 1024), dtype=torch.bfloat16)  # exactly 2 MiB
        assert large.dtype == torch.bfloat16 and large.shape == (1024, 1024) and calls == [(1024, 1024)]
        assert _huge_aligned(large)
    with use_backend(huge_pages=False):
        backend.new_weight((1024, 1024), dtype=torch.bfloat16)
    assert calls == [(1024, 1024)]


def test_routed_experts_follow_autocast_and_run_on_meta():
    from dsmoe.backend import routed_experts

    torch.manual_seed(0)
    args = (torch.randn(5, 16), torch.rand(5, 2), torch.randint(0, 3, (5, 2)), torch.randn(3, 24, 16), torch.randn(3, 16, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = routed_experts(*args)
    assert out.dtype == torch.bfloat16  # what nn.Linear gives under autocast
    plain = routed_experts(args[0].bfloat16(), args[1], args[2], args[3].bfloat16(), args[4].bfloat16())
    torch.testing.assert_close(out.float(), plain.float(), rtol=2e-2, atol=2e-2)
    meta = routed_experts(*(a.to("meta") for a in args))  # shapes only (model init on meta)
    assert meta.device.type == "meta" and meta.shape == (5, 16)


def test_reference_layer_never_calls_the_fused_ops(monkeypatch):
    from dsmoe import ops as dsmoe_ops
    from dsmoe.layers import DeepSeekMoELayer

    layer = DeepSeekMoELayer(_small_config(hidden_size=32, moe_intermediate_size=16), impl="reference")
    x = torch.randn(2, 3, 32)
    expected = layer(x).hidden_states
    for name in ("permute", "grouped_gemm", "unpermute", "moe_decode", "gate"):
        monkeypatch.setattr(dsmoe_ops, name, lambda *a, **k: pytest.fail("a fused op in a reference layer"))
    torch.testing.assert_close(layer(x).hidden_states, expected)
    layer.eval()
    with torch.no_grad():
        layer(x)


def test_decode_path_result_is_used_not_recomputed(monkeypatch):
    from dsmoe import ops as dsmoe_ops
    from dsmoe.layers import DeepSeekMoELayer

    layer = DeepSeekMoELayer(_small_config(hidden_size=32, moe_intermediate_size=16)).eval()
    monkeypatch.setattr(dsmoe_ops, "permute", lambda *a, **k: pytest.fail("the plain path ran after the decode path"))
    with torch.no_grad():
        layer(torch.randn(2, 1, 32))


def test_own_cpu_gemm_reads_the_kernel_table(monkeypatch):
    from dsmoe import backend

    for table, expected in [
        ({"bf16_gemm": "avx512", "fp32_gemm": "avx512"}, ("avx512", "avx512")),
        ({"bf16_gemm": "fp32", "fp32_gemm": "mkl"}, ("fp32", "")),
        ({"bf16_gemm": "onednn", "fp32_gemm": "onednn"}, ("", "")),
    ]:
        monkeypatch.setattr(backend._C, "cpu_kernels", lambda table=table: table)
        b = backend.DsmoeBackend()  # a fresh cache
        assert (b.own_cpu_gemm(torch.bfloat16), b.own_cpu_gemm(torch.float32)) == expected
        assert b.own_cpu_gemm(torch.float16) == ""  # no own GEMM for fp16


def test_python_settings_read_their_environment_variables(monkeypatch):
    from dsmoe import backend

    for name, var in (("huge_pages", "DSMOE_CPU_HUGE_PAGES"), ("cpu_decode", "DSMOE_CPU_DECODE")):
        for value, expected in ((None, True), ("1", True), ("0", False)):
            monkeypatch.setattr(backend, "_python_settings", None)  # read again (restored after)
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)
            assert getattr(backend_settings(), name) is expected, (var, value)


def _unstacked_mlp():
    mlp = MLP(16, 24)
    mlp.gate_proj.weight = torch.nn.Parameter(mlp.gate_proj.weight.detach().clone())  # own storage
    assert stacked_alias(mlp.gate_proj.weight, mlp.up_proj.weight) is None
    return mlp


def test_conversions_of_unstacked_and_stacked_mlps():
    mlp = _unstacked_mlp()
    before = [p.detach().clone() for p in mlp.parameters()]
    mlp.double()
    assert all(p.dtype == torch.float64 for p in mlp.parameters())
    assert all(torch.equal(p, b.double()) for p, b in zip(mlp.parameters(), before))
    for m in (_unstacked_mlp(), MLP(16, 24)):
        ptrs = [p.data_ptr() for p in m.parameters()]
        m.to_empty(device="cpu", recurse=False)  # the MLP holds no parameter itself: nothing changes
        assert [p.data_ptr() for p in m.parameters()] == ptrs


def test_dense_mlp_gemm_choice(monkeypatch):
    from dsmoe import backend
    from dsmoe import ops as dsmoe_ops

    calls = []
    real = dsmoe_ops.grouped_gemm
    monkeypatch.setattr(dsmoe_ops, "grouped_gemm", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    monkeypatch.setattr(backend._C, "cpu_kernels", lambda: {"bf16_gemm": "fp32", "fp32_gemm": "mkl"})
    b = backend.DsmoeBackend()
    mlp = MLP(16, 24)
    x = torch.randn(32, 16)  # 32 rows >= BF16_IN_FP32_MIN_ROWS
    b.dense_mlp(mlp, x)  # fp32: nn.Linear (MKL) is as good
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = b.dense_mlp(mlp, x)  # autocast's dtype decides: bf16, on the fp32 route
    assert calls == [torch.bfloat16, torch.bfloat16] and out.dtype == torch.bfloat16
    calls.clear()
    mlp.bfloat16()
    b.dense_mlp(mlp, x.bfloat16().to("meta"))  # not on the CPU
    b.dense_mlp(mlp, x[0].bfloat16())  # one row, 1-D
    assert calls == []
    hooked = []
    mlp.gate_proj.register_forward_hook(lambda m, args, out: hooked.append(1))
    b.dense_mlp(mlp, x.bfloat16())  # a hook: the modules run
    assert hooked == [1] and calls == []


def test_dense_mlp_under_torch_compile_uses_the_compilers_gemms(monkeypatch):
    from dsmoe import backend
    from dsmoe import ops as dsmoe_ops

    monkeypatch.setattr(backend._C, "cpu_kernels", lambda: {"bf16_gemm": "fp32", "fp32_gemm": "mkl"})
    b = backend.DsmoeBackend()
    mlp = MLP(16, 24).bfloat16()
    x = torch.randn(32, 16).bfloat16()
    assert b._on_own_cpu_gemm(mlp, x)  # eager: dsmoe's GEMMs
    # while dynamo traces (the rule itself: tracing through mutation-testing wrappers breaks graphs)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(dsmoe_ops, "grouped_gemm", lambda *a, **k: pytest.fail("dsmoe's GEMM while compiling"))
    assert not b._on_own_cpu_gemm(mlp, x)
    b.dense_mlp(mlp, x)


def test_get_backend_default_and_unknown():
    from dsmoe.backend import get_backend

    assert get_backend() is BACKENDS["dsmoe"] and get_backend("reference") is BACKENDS["reference"]
    with pytest.raises(ValueError, match=r"^impl must be one of \('dsmoe', 'reference'\), got 'fast'$"):
        get_backend("fast")


def test_stacked_alias_only_for_back_to_back_plain_contiguous_parts():
    joint = torch.arange(24.0)
    a, b = joint[:8].view(2, 4), joint[8:20].view(3, 4)
    alias = stacked_alias(a, b)
    assert torch.equal(alias, torch.cat([a, b])) and alias.data_ptr() == a.data_ptr()
    one_d = stacked_alias(joint[:5], joint[5:9])  # 1-D parts (biases, norm weights) stack too
    assert torch.equal(one_d, joint[:9]) and one_d.data_ptr() == joint.data_ptr()
    # a part of one row whose stride in that dim is arbitrary (contiguous all the same)
    odd = joint[:4].as_strided((1, 4), (100, 1))
    assert odd.is_contiguous()
    assert torch.equal(stacked_alias(odd, joint[4:12].view(2, 4)), joint[:12].view(3, 4))
    refused = {
        "trailing shapes differ": (joint[:6].view(2, 3), joint[6:12].view(3, 2)),
        "second not contiguous": (joint[:4].view(2, 2), joint[4:8].view(2, 2).t()),
        "dtypes differ": (joint[:4], joint[4:8].view(torch.int32)),
        "a subclass": (joint[:4], joint[4:8].as_subclass(_TaggedTensor)),
        "a subclass first": (joint[:4].as_subclass(_TaggedTensor), joint[4:8]),
        "not back to back": (joint[:4], joint[5:9]),
        "two storages": (joint[:4], joint[4:8].clone()),
    }
    for why, (first, second) in refused.items():
        assert stacked_alias(first, second) is None, why
