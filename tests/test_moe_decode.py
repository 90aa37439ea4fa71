"""The CPU decode path (dsmoe.ops.pack_decode_weights / moe_decode, dsmoe.decode): equal to a plain
PyTorch loop over tokens and experts (computed in fp64) at every decode size, dtype and expert
count, with empty and repeated experts; the packed-weight cache follows weight changes; the MoE
layer and generate() give what the plain path gives; opcheck, torch.compile and bad inputs."""
from __future__ import annotations

import pytest
import torch

import dsmoe
import torch.nn.functional as F
from torch.library import opcheck

from dsmoe import DeepSeekMoEForCausalLM, KVCache, decode, get_preset, ops
from dsmoe.layers import DeepSeekMoELayer

TOKENS = (1, 2, 3, 4, 7, 16, 33, 64)
# (rtol, atol) against the fp64 reference: the kernel accumulates in fp32 and rounds the output
# once to the dtype
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 2e-3), torch.float16: (2e-3, 2e-4)}


def reference_moe(x, weights, expert_ids, w_gate_up, w_down, shared=None):
    """Token by token, expert by expert, in fp64 (ids >= E contribute zero)."""
    E, two_i, _ = w_gate_up.shape
    I = two_i // 2
    xd, wd = x.double(), weights.double()
    y = torch.zeros_like(xd)
    for t in range(x.shape[0]):
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            if e >= E:
                continue
            gu = w_gate_up[e].double() @ xd[t]
            y[t] += wd[t, j] * (w_down[e].double() @ (F.silu(gu[:I]) * gu[I:]))
    if shared is not None:
        wg, wu, wdn = (w.double() for w in shared)
        y += (F.silu(xd @ wg.t()) * (xd @ wu.t())) @ wdn.t()
    return y


def make_problem(T, h, I, E, k, dtype, shared_i=0, ids=None):
    x = torch.randn(T, h).to(dtype)
    w_gate_up = (torch.randn(E, 2 * I, h) * 0.2).to(dtype)
    w_down = (torch.randn(E, h, I) * 0.2).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(E)[: min(k, E)] for _ in range(T)]) if E >= k else torch.randint(0, E, (T, k))
    weights = torch.rand(T, ids.shape[1])
    shared = None
    if shared_i:
        shared = tuple((torch.randn(*s) * 0.2).to(dtype) for s in ((shared_i, h), (shared_i, h), (h, shared_i)))
    return x, weights, ids.int(), w_gate_up, w_down, shared


def run_decode(x, weights, ids, w_gate_up, w_down, shared=None):
    packed = ops.pack_decode_weights(w_gate_up, w_down)
    sp = None
    if shared is not None:
        sp = ops.pack_decode_weights(torch.cat(shared[:2]).unsqueeze(0), shared[2].unsqueeze(0))
    return ops.moe_decode(x, weights, ids, packed, sp)


def check(y, expected, dtype):
    rtol, atol = TOL[dtype]
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k", [(1, 1), (63, 7), (64, 6)])
@pytest.mark.parametrize("h,I", [(40, 24), (37, 19), (24, 16)])  # 3, 3 and 2 gate|up blocks
@pytest.mark.parametrize("T", TOKENS)
def test_matches_reference(T, h, I, E, k, dtype):
    x, w, ids, wgu, wd, shared = make_problem(T, h, I, E, k, dtype, shared_i=2 * I if E > 1 else 0)
    y = run_decode(x, w, ids, wgu, wd, shared)
    assert y.shape == x.shape and y.dtype == dtype
    check(y, reference_moe(x, w, ids, wgu, wd, shared), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_wide_hidden_spans_several_down_groups(T, dtype):
    # h = 260: 33 output blocks of 8, so pass 2 splits each expert's down weights into units of
    # 16, 16 and 1 blocks, the last block 4 columns wide; every expert twice in some tokens
    x, weights, ids, wgu, wd, shared = make_problem(T, 260, 24, 6, 3, dtype, shared_i=16)
    ids[:, 1] = ids[:, 0]
    check(run_decode(x, weights, ids, wgu, wd, shared), reference_moe(x, weights, ids, wgu, wd, shared), dtype)


@pytest.mark.parametrize("T", [1, 5, 64])
def test_fp16_and_int64_ids(T):
    x, w, ids, wgu, wd, shared = make_problem(T, 48, 32, 16, 4, torch.float16, shared_i=20)
    y = run_decode(x, w, ids.long(), wgu, wd, shared)
    check(y, reference_moe(x, w, ids, wgu, wd, shared), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_expert_for_every_token_and_repeats(dtype):
    # every token picks expert 5 (twice: the same expert in two slots), the rest are empty
    T, E = 33, 64
    ids = torch.full((T, 3), 5)
    ids[:, 2] = torch.arange(T) % 2  # two more experts, each shared by many tokens
    x, w, ids, wgu, wd, _ = make_problem(T, 40, 24, E, 3, dtype, ids=ids)
    check(run_decode(x, w, ids, wgu, wd), reference_moe(x, w, ids, wgu, wd), dtype)


def test_dropped_ids_and_shared_only():
    x, w, ids, wgu, wd, shared = make_problem(4, 40, 24, 8, 2, torch.float32, shared_i=16)
    ids[0, 0] = 8  # ids >= E: rows another rank owns, contribute zero
    ids[1] = 100
    check(run_decode(x, w, ids, wgu, wd, shared), reference_moe(x, w, ids, wgu, wd, shared), torch.float32)
    ids[:] = 8  # nothing routed here: only the shared experts
    check(run_decode(x, w, ids, wgu, wd, shared), reference_moe(x, w, ids, wgu, wd, shared), torch.float32)
    assert torch.equal(run_decode(x, w, ids, wgu, wd), torch.zeros_like(x))


def test_zero_tokens_and_k_zero():
    x, w, ids, wgu, wd, shared = make_problem(3, 16, 8, 4, 2, torch.float32, shared_i=8)
    y = run_decode(x[:0], w[:0], ids[:0], wgu, wd, shared)
    assert y.shape == (0, 16)
    y = run_decode(x, w[:, :0], ids[:, :0], wgu, wd, shared)
    check(y, reference_moe(x, w[:, :0], ids[:, :0], wgu, wd, shared), torch.float32)


def test_deterministic_across_thread_counts():
    x, w, ids, wgu, wd, shared = make_problem(16, 72, 40, 16, 4, torch.float32, shared_i=24)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_decode(x, w, ids, wgu, wd, shared)
        torch.set_num_threads(max(2, n))
        many = [run_decode(x, w, ids, wgu, wd, shared) for _ in range(3)]
    finally:
        torch.set_num_threads(n)
    for y in many:
        assert torch.equal(y, one)


def test_packed_layout():
    E, I, h = 3, 11, 10  # neither a multiple of 8: zero padding
    wgu, wd = torch.randn(E, 2 * I, h), torch.randn(E, h, I)
    gu, dn = ops.pack_decode_weights(wgu, wd)
    assert gu.shape == (E, 2, h, 16) and dn.shape == (E, 2, 16, 8)
    for e, b, c, lane in [(0, 0, 0, 0), (2, 1, 9, 2), (1, 0, 3, 7), (1, 1, 4, 10), (2, 0, 7, 15)]:
        row = 8 * b + lane % 8
        expected = wgu[e, row + (I if lane >= 8 else 0), c]
        assert gu[e, b, c, lane] == expected
    assert (gu[:, 1, :, 3:8] == 0).all() and (gu[:, 1, :, 11:] == 0).all()  # rows 11..15 of I
    for e, b, i, lane in [(0, 0, 0, 0), (2, 1, 10, 1), (1, 0, 5, 7)]:
        assert dn[e, b, i, lane] == wd[e, 8 * b + lane, i]
    assert (dn[:, :, I:, :] == 0).all() and (dn[:, 1, :, 2:] == 0).all()


def _packed_by_formula(wgu: torch.Tensor, wd: torch.Tensor):
    """The packed layout element by element: gu[e, b, c, lane] = gate (lane < 8) or up row
    8b + lane % 8, column c; dn[e, b, i, lane] = w_down[e, 8b + lane, i]; zeros past I and h."""
    E, two_i, h = wgu.shape
    I = two_i // 2
    nb, nbh = -(-I // 8), -(-h // 8)
    gu = torch.zeros(E, nb, h, 16, dtype=wgu.dtype)
    dn = torch.zeros(E, nbh, 8 * nb, 8, dtype=wgu.dtype)
    for e in range(E):
        for row in range(I):
            gu[e, row // 8, :, row % 8] = wgu[e, row]
            gu[e, row // 8, :, 8 + row % 8] = wgu[e, I + row]
        for row in range(h):
            dn[e, row // 8, :I, row % 8] = wd[e, row]
    return gu, dn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,I,h", [(1, 1, 1), (3, 11, 10), (2, 16, 24), (5, 9, 17), (0, 8, 8)])
def test_packing_matches_the_layout_formula(E, I, h, dtype):
    """Every element of both packed tensors, through the op and through the one-pass packing
    into preallocated (poisoned) buffers that the decode cache uses, also from strided inputs."""
    from dsmoe._ext import _C

    torch.manual_seed(E * 100 + I)
    wgu = torch.randn(E, 2 * I, h).to(dtype)
    wd = torch.randn(E, I, h).to(dtype).transpose(1, 2)  # not contiguous
    want_gu, want_dn = _packed_by_formula(wgu, wd)
    gu, dn = ops.pack_decode_weights(wgu, wd)
    assert torch.equal(gu, want_gu) and torch.equal(dn, want_dn)
    out_gu = torch.full_like(want_gu, float("nan"))
    out_dn = torch.full_like(want_dn, float("nan"))
    _C.pack_decode_weights_into(wgu, wd, out_gu, out_dn)
    assert torch.equal(out_gu, want_gu) and torch.equal(out_dn, want_dn)
    packed = decode._pack(wgu, wd)  # what the cache holds
    assert torch.equal(packed.gate_up, want_gu) and torch.equal(packed.down, want_dn)


def test_packing_into_refuses_wrong_buffers():
    from dsmoe._ext import _C

    wgu, wd = torch.randn(2, 22, 10), torch.randn(2, 10, 11)
    gu, dn = ops.pack_decode_weights(wgu, wd)
    for bad_gu, bad_dn, message in [
        (gu[:, :1], dn, "gate_up_out must be a contiguous CPU tensor of shape \\[2, 2, 10, 16\\]"),
        (gu.transpose(2, 3).contiguous().transpose(2, 3), dn, "gate_up_out must be a contiguous"),
        (gu, dn.double(), "down_out must be a contiguous CPU tensor of shape \\[2, 2, 16, 8\\] and dtype Float"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            _C.pack_decode_weights_into(wgu, wd, bad_gu, bad_dn)
    with pytest.raises(RuntimeError, match="w_down.size\\(2\\) must be 11"):
        _C.pack_decode_weights_into(wgu, wd[:, :, :5], gu, dn)


def test_packed_copies_of_large_weights_are_on_huge_pages():
    E, I, h = 4, 256, 512  # 2 MiB of fp32 gate|up
    wgu, wd = torch.randn(E, 2 * I, h), torch.randn(E, h, I)
    with dsmoe.use_backend(huge_pages=True):
        packed = decode._pack(wgu, wd)
    assert packed.gate_up.data_ptr() % (2 << 20) == 0 and packed.down.data_ptr() % (2 << 20) == 0
    with dsmoe.use_backend(huge_pages=False):
        assert torch.equal(decode._pack(wgu, wd).gate_up, packed.gate_up)


# ---------------------------------------------------------------- the cache


def test_cache_follows_weight_changes():
    layer = torch.nn.Module()
    layer.w_gate_up = torch.nn.Parameter(torch.randn(4, 16, 8))
    layer.w_down = torch.nn.Parameter(torch.randn(4, 8, 8))
    p1 = decode.packed_experts(layer.w_gate_up, layer.w_down)
    assert decode.packed_experts(layer.w_gate_up, layer.w_down) is p1  # made once
    x, w, ids = torch.randn(2, 8), torch.rand(2, 2), torch.tensor([[0, 1], [2, 3]])

    def out():
        with torch.no_grad():
            return decode.decode_routed_experts(x, w, ids, layer.w_gate_up, layer.w_down)

    def expected():
        return reference_moe(x, w, ids, layer.w_gate_up.detach(), layer.w_down.detach())

    with torch.no_grad():
        layer.w_down.copy_(torch.randn(4, 8, 8))  # in place: the version counter moves
    assert decode.packed_experts(layer.w_gate_up, layer.w_down) is not p1
    check(out(), expected(), torch.float32)
    layer.load_state_dict({"w_gate_up": torch.randn(4, 16, 8), "w_down": torch.randn(4, 8, 8)})
    check(out(), expected(), torch.float32)
    layer.to(torch.bfloat16)  # new storage and dtype
    x = x.bfloat16()
    check(out(), expected(), torch.bfloat16)
    decode.clear_cache()
    check(out(), expected(), torch.bfloat16)


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),  # what `dsmoe train` uses on CPU
    lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.1),
])
def test_cache_follows_optimizer_steps(make_optimizer):
    """torch's fused optimizers write the weights without bumping their version counters: the
    packed copies must not outlive a step (they did: `dsmoe train`'s validation loss was
    computed with the expert weights of its first validation)."""
    layer = torch.nn.Module()
    layer.w_gate_up = torch.nn.Parameter(torch.randn(4, 16, 8))
    layer.w_down = torch.nn.Parameter(torch.randn(4, 8, 8))
    opt = make_optimizer(list(layer.parameters()))
    x, w, ids = torch.randn(2, 8), torch.rand(2, 2), torch.tensor([[0, 1], [2, 3]])
    for _ in range(2):
        with torch.no_grad():
            got = decode.decode_routed_experts(x, w, ids, layer.w_gate_up, layer.w_down)
        check(got, reference_moe(x, w, ids, layer.w_gate_up.detach(), layer.w_down.detach()), torch.float32)
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        opt.step()


# ---------------------------------------------------------------- the model


def moe_config(num_hidden_layers=2):
    return get_preset("tiny", num_hidden_layers=num_hidden_layers).replace(initializer_range=0.2)


def count_decode_calls(monkeypatch):
    calls = []
    real = ops.moe_decode

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "moe_decode", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_takes_decode_path_and_matches(dtype, monkeypatch):
    cfg = moe_config()
    layer = DeepSeekMoELayer(cfg).to(dtype).eval()
    calls = count_decode_calls(monkeypatch)
    for L in (1, 3):
        x = torch.randn(2, L, cfg.hidden_size).to(dtype)
        with torch.no_grad():
            fast = layer(x).hidden_states
            with dsmoe.use_backend(cpu_decode=False):
                plain = layer(x).hidden_states
        rtol, atol = TOL[dtype]
        scale = plain.abs().max().item()
        # the plain path rounds the intermediate and each expert's output to the dtype
        torch.testing.assert_close(fast.float(), plain.float(), rtol=2 * rtol, atol=4 * atol * scale)
    assert calls == [2, 6]


def test_layer_keeps_plain_path_for_training_grad_and_many_tokens(monkeypatch):
    cfg = moe_config()
    layer = DeepSeekMoELayer(cfg)
    calls = count_decode_calls(monkeypatch)
    x = torch.randn(1, 2, cfg.hidden_size)
    layer.train()
    layer(x)
    layer.eval()
    layer(x)  # grad enabled and the weights require grad
    with torch.no_grad():
        layer(torch.randn(1, decode.DECODE_MAX_TOKENS + 1, cfg.hidden_size))
        layer.double()(x.double())  # no fp64 kernel
    assert calls == []
    with torch.no_grad():
        layer.float()(x)
    assert calls == [2]


def test_generate_greedy_same_tokens(monkeypatch):
    model = DeepSeekMoEForCausalLM(moe_config(num_hidden_layers=3)).float().eval()
    ids = torch.randint(0, 64, (2, 5))
    calls = count_decode_calls(monkeypatch)
    fast = model.generate(ids, max_new_tokens=10)
    assert calls, "generate did not take the decode path"
    with dsmoe.use_backend(cpu_decode=False):
        plain = model.generate(ids, max_new_tokens=10)
    assert torch.equal(fast, plain)


def test_bf16_cached_decode_logits_match(monkeypatch):
    # In bf16 the plain path rounds each expert's intermediate and output to bf16 and the decode
    # path does not, so greedy runs may part at a near-tie: compare the logits of a teacher-forced
    # cached decode step by step instead.
    model = DeepSeekMoEForCausalLM(moe_config(num_hidden_layers=3)).bfloat16().eval()
    ids = torch.randint(0, 64, (2, 9))

    def logits_by_step():
        cache = KVCache.dynamic(model.config)
        with torch.no_grad():
            out = [model(ids[:, :5], past_key_values=cache, use_cache=True)["logits"][:, -1]]
            out += [model(ids[:, t : t + 1], past_key_values=cache)["logits"][:, -1] for t in range(5, 9)]
        return torch.stack(out).float()

    calls = count_decode_calls(monkeypatch)
    fast = logits_by_step()
    assert calls == [10] * 2 + [2] * 8  # 2 MoE layers (the first is dense), prompt then 4 steps
    with dsmoe.use_backend(cpu_decode=False):
        plain = logits_by_step()
    torch.testing.assert_close(fast, plain, rtol=0.05, atol=0.05 * plain.abs().max().item())


# ---------------------------------------------------------------- ops: opcheck, compile, errors


def test_opcheck():
    x, w, ids, wgu, wd, shared = make_problem(3, 24, 16, 5, 2, torch.float32, shared_i=8)
    opcheck(torch.ops.dsmoe.pack_decode_weights.default, (wgu, wd))
    packed = ops.pack_decode_weights(wgu, wd)
    sp = ops.pack_decode_weights(torch.cat(shared[:2]).unsqueeze(0), shared[2].unsqueeze(0))
    opcheck(torch.ops.dsmoe.moe_decode.default, (x, w, ids, packed.gate_up, packed.down, sp.gate_up, sp.down))
    opcheck(torch.ops.dsmoe.moe_decode.default, (x.bfloat16(), w, ids.long(), packed.gate_up.bfloat16(), packed.down.bfloat16()))


def test_torch_compile():
    x, w, ids, wgu, wd, shared = make_problem(4, 32, 16, 6, 2, torch.float32, shared_i=16)
    packed = ops.pack_decode_weights(wgu, wd)
    sp = ops.pack_decode_weights(torch.cat(shared[:2]).unsqueeze(0), shared[2].unsqueeze(0))

    def f(x, w, ids, gu, dn, sgu, sdn):
        return ops.moe_decode(x * 2, w, ids, ops.PackedDecodeWeights(gu, dn), ops.PackedDecodeWeights(sgu, sdn)) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (x, w, ids, packed.gate_up, packed.down, sp.gate_up, sp.down)
    torch.testing.assert_close(compiled(*args), f(*args))


def test_inference_only():
    x, w, ids, wgu, wd, _ = make_problem(2, 16, 8, 4, 2, torch.float32)
    packed = ops.pack_decode_weights(wgu, wd)
    for op, call in (("moe_decode", lambda: ops.moe_decode(x.requires_grad_(), w, ids, packed)),
                     ("pack_decode_weights", lambda: ops.pack_decode_weights(wgu.requires_grad_(), wd))):
        with pytest.raises(RuntimeError) as e:
            call()
        assert str(e.value) == (
            f"dsmoe.{op} is inference-only (no gradient); run it under torch.no_grad() or with inputs that do "
            "not require grad, or use the differentiable ops (permute, grouped_gemm, swiglu, unpermute)")
    with torch.no_grad():  # the way it is meant to run
        assert ops.moe_decode(x, w, ids, ops.pack_decode_weights(wgu, wd)).shape == x.shape


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs(device):
    x, w, ids, wgu, wd, _ = make_problem(2, 16, 8, 4, 2, torch.float32)
    gu, dn = ops.pack_decode_weights(wgu, wd)
    x, w, ids, wgu, wd, gu, dn = (t.to(device) for t in (x, w, ids, wgu, wd, gu, dn))
    P = ops.PackedDecodeWeights
    cases = [
        (lambda: ops.pack_decode_weights(wgu[:, :7], wd), "w_gate_up.size\\(1\\) must be 2 \\* intermediate"),
        (lambda: ops.pack_decode_weights(wgu, wd[:, :, :5]), "w_down.size\\(2\\) must be 8"),
        (lambda: ops.pack_decode_weights(wgu.double(), wd.double()), "w_gate_up must have dtype"),
        (lambda: ops.pack_decode_weights(wgu, wd.bfloat16()), "w_down must have the dtype of w_gate_up"),
        (lambda: ops.moe_decode(x.bfloat16(), w, ids, P(gu, dn)), "packed_gate_up must have the dtype of x"),
        (lambda: ops.moe_decode(x[:, :8], w, ids, P(gu, dn)), "packed_gate_up.size\\(2\\) must be 8"),
        (lambda: ops.moe_decode(x, w[:1], ids, P(gu, dn)), "weights.size\\(0\\) must be 2"),
        (lambda: ops.moe_decode(x, w, ids.float(), P(gu, dn)), "expert_ids must have dtype"),
        (lambda: ops.moe_decode(x, w, ids, P(gu, dn[:, :, :4])), "packed_down.size\\(2\\) must be 8"),
        (lambda: ops.moe_decode(x, w, ids, P(gu, dn[:3])), "packed_down.size\\(0\\) must be 4"),
        (lambda: ops.moe_decode(x, w, ids, P(gu, dn), P(gu, dn)), "shared_gate_up.size\\(0\\) must be 1"),
        (lambda: torch.ops.dsmoe.moe_decode(x, w, ids, gu, dn, gu[:1], None), "must be given together"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()
    if device == "cpu":
        ids[0, 0] = -1
        with pytest.raises(RuntimeError, match="expert_ids\\[0, 0\\]=-1 is negative"):
            ops.moe_decode(x, w, ids, P(gu, dn))


def test_cli_generate_random_reports_speed(capsys):
    import json

    from dsmoe.cli import main

    argv = ["generate", "--random", "tiny", "--bf16", "--max-new-tokens", "4", "--batch", "2", "--prompt-tokens", "5", "--device", "cpu"]
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["batch"] == 2 and stats["new_tokens"] == 4 and stats["weights"] == "random"
    assert stats["decode_path"] is True and stats["decode_tokens_per_s"] > 0 and stats["time_to_first_token_s"] > 0
    cfg = get_preset("tiny")
    assert stats["kv_cache_bytes_per_token"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    assert main(["generate", "--random", "nope", "--device", "cpu"]) != 0
    assert "unknown preset" in capsys.readouterr().err


# ---------------------------------------------------------------- when the layer takes the path
# (the survivors of the mutation pass over dsmoe/decode.py, docs/mutation_testing.md)


def test_pack_refuses_bad_weights_naming_the_public_op():
    cases = [
        ((torch.randn(4, 8), torch.randn(2, 4, 4)), "dsmoe.pack_decode_weights: w_gate_up must be 3-D"),
        ((torch.randn(2, 8, 4), torch.randn(4, 4)), "dsmoe.pack_decode_weights: w_down must be 3-D"),
        ((torch.randn(2, 7, 4), torch.randn(2, 4, 3)), "dsmoe.pack_decode_weights: w_gate_up.size\\(1\\) must be 2"),
    ]
    for (wgu, wd), msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            decode._pack(wgu, wd)


def test_pack_of_odd_hidden_is_on_huge_pages():
    E, I, h = 2, 256, 1025  # odd hidden, > 2 MiB of fp32 gate|up
    wgu, wd = torch.randn(E, 2 * I, h), torch.randn(E, h, I)
    with dsmoe.use_backend(huge_pages=True):
        packed = decode._pack(wgu, wd)
    assert packed.gate_up.data_ptr() % (2 << 20) == 0 and packed.down.data_ptr() % (2 << 20) == 0
    torch.testing.assert_close(packed.gate_up, ops.pack_decode_weights(wgu, wd).gate_up, rtol=0, atol=0)


def test_packed_mlp_of_separate_weights():
    h, i = 24, 16
    wg, wu, wdn = torch.randn(i, h) * 0.2, torch.randn(i, h) * 0.2, torch.randn(h, i) * 0.2
    x = torch.randn(3, h)
    packed = decode.packed_mlp(wg, wu, wdn)  # three storages: concatenated
    y = ops.moe_decode(x, torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.int32),
                       ops.pack_decode_weights(torch.zeros(1, 2, h), torch.zeros(1, h, 1)), packed)
    check(y, (F.silu(x.double() @ wg.double().t()) * (x.double() @ wu.double().t())) @ wdn.double().t(), torch.float32)


def test_packed_mlp_of_stacked_weights_makes_no_concatenated_copy(monkeypatch):
    layer = DeepSeekMoELayer(moe_config())
    mlp = layer.shared_experts
    ws = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    expected = ops.pack_decode_weights(torch.cat(ws[:2]).detach().unsqueeze(0), ws[2].detach().unsqueeze(0))

    def no_cat(*args, **kwargs):
        raise AssertionError("the stacked gate|up weights were concatenated (copied)")

    monkeypatch.setattr(torch, "cat", no_cat)
    packed = decode.packed_mlp(*ws)
    monkeypatch.undo()
    assert torch.equal(packed.gate_up, expected.gate_up) and torch.equal(packed.down, expected.down)


def _no_packing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("packed during a decode step: prepack missed it")

    monkeypatch.setattr(decode, "_pack", refuse)


@pytest.mark.parametrize("shared", [1, 0])
def test_prepack_packs_every_moe_layer_and_its_shared_experts(shared, monkeypatch):
    cfg = get_preset("tiny", num_hidden_layers=4, n_shared_experts=shared)  # layers 1..3 are MoE
    model = DeepSeekMoEForCausalLM(cfg).eval()
    decode.clear_cache()
    assert decode.prepack(model) == 3
    assert decode.prepack(model) == 3  # cached: counted again, packed once
    calls = count_decode_calls(monkeypatch)
    _no_packing(monkeypatch)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 1)))
    assert calls == [2, 2, 2]


def test_prepack_skips_layers_the_kernel_cannot_read():
    model = DeepSeekMoEForCausalLM(get_preset("tiny", num_hidden_layers=4)).eval()
    assert decode.prepack(model.double()) == 0  # no fp64 kernel: skipped, not refused
    model.float()
    model.model.layers[1].double()  # the first MoE layer only
    assert decode.prepack(model) == 2


def test_applies_rules():
    w = torch.nn.Parameter(torch.randn(4, 8, 8), requires_grad=False)
    x = torch.randn(3, 8)
    assert decode.applies(x, [w], training=False)  # grad mode on, nothing requires grad
    with torch.no_grad():
        assert not decode.applies(x, [w], training=True)
        assert decode.applies(torch.randn(decode.DECODE_MAX_TOKENS, 8), [w], training=False)
        assert not decode.applies(torch.randn(decode.DECODE_MAX_TOKENS + 1, 8), [w], training=False)
        assert not decode.applies(x.to("meta"), [w], training=False)
        assert not decode.applies(x, [w.double()], training=False)  # dtypes differ
        assert not decode.applies(x, [w, w.to("meta")], training=False)
        assert not decode.applies(x, [w.detach().as_subclass(_TaggedTensor)], training=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not decode.applies(x, [w], training=False)
    w.requires_grad_(True)
    assert not decode.applies(x, [w], training=False)
    assert not decode.applies(x.requires_grad_(), [w.detach()], training=False)


class _TaggedTensor(torch.Tensor):
    """A tensor subclass (as a sharded or quantised weight would be): not read as plain memory."""


def test_layer_without_shared_experts_takes_decode_path(monkeypatch):
    cfg = moe_config().replace(n_shared_experts=0)
    layer = DeepSeekMoELayer(cfg).eval()
    calls = count_decode_calls(monkeypatch)
    x = torch.randn(2, 1, cfg.hidden_size)
    with torch.no_grad():
        fast = layer(x).hidden_states
        with dsmoe.use_backend(cpu_decode=False):
            plain = layer(x).hidden_states
    assert calls == [2]
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_layer_honours_hooks_on_shared_experts(monkeypatch):
    layer = DeepSeekMoELayer(moe_config()).eval()
    layer.shared_experts.gate_proj.register_forward_hook(lambda m, args, out: out * 3)
    calls = count_decode_calls(monkeypatch)
    x = torch.randn(2, 1, layer.config.hidden_size)
    with torch.no_grad():
        y = layer(x).hidden_states
        with dsmoe.use_backend(cpu_decode=False):
            plain = layer(x).hidden_states
    assert calls == []  # the hook's module runs as a module
    torch.testing.assert_close(y, plain)


def test_layer_checks_routed_weights_and_training(monkeypatch):
    layer = DeepSeekMoELayer(moe_config()).eval()
    for p in layer.shared_experts.parameters():
        p.requires_grad_(False)
    calls = count_decode_calls(monkeypatch)
    x = torch.randn(2, 1, layer.config.hidden_size)
    y = layer(x).hidden_states  # the routed experts still require grad
    assert calls == [] and y.requires_grad
    layer.train()
    with torch.no_grad():
        layer(x)
    assert calls == []
