"""Tests written for the mutants of tools/mutate_kernels.py and tools/mutation_python.sh that the
rest of the suite let through (docs/mutation_testing.md names each). Every expectation here is
independent of the code under test: plain PyTorch, or a value worked out by hand."""
from __future__ import annotations

import re

import pytest
import torch

from dsmoe import ops
from kernel_backends import kernels_params, make_kernels


def test_permute_dropped_rows_are_zero_in_reused_memory():
    """Rows of dropped ids (>= num_experts) are zeros even when the output's memory comes back from
    the CPU caching allocator holding NaNs (fresh pages are zero anyway, so a test on fresh memory
    cannot tell a zero-fill from none). 2 MiB outputs: large enough to be cached."""
    T, k, h, E = 1024, 2, 256, 4
    ids = torch.arange(T * k, dtype=torch.int32).view(T, k) % E
    poison = ops.permute(torch.full((T, h), float("nan")), ids, E)[0]
    assert bool(poison.isnan().all())
    del poison
    ids[::3, 1] = E + 1  # every third token's second slot belongs to another rank
    x = torch.randn(T, h)
    x_perm, row_map, offsets = ops.permute(x, ids, E)
    kept = int(offsets[-1])
    assert kept == int((ids < E).sum())
    assert torch.equal(x_perm[kept:], torch.zeros(T * k - kept, h))
    token = torch.arange(T).repeat_interleave(k)
    assert torch.equal(x_perm[row_map.long()[ids.flatten() < E]], x[token[ids.flatten() < E]])


# ---------------------------------------------------------------- dsmoe/config.py (mutmut survivors)
def _tiny_config(**changes):
    from dsmoe.config import DeepSeekMoEConfig

    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1)
    fields.update(changes)
    return DeepSeekMoEConfig(**fields)


def test_config_to_dict_is_the_hf_layout_and_a_deep_copy():
    config = _tiny_config(rope_scaling={"type": "linear", "factor": 2.0})
    config.extra["auto_map"] = {"AutoConfig": "x.Y"}
    d = config.to_dict()
    assert d["model_type"] == "deepseek" and d["architectures"] == ["DeepseekForCausalLM"]
    # changing what to_dict returned never changes the config (nested values included)
    d["rope_scaling"]["factor"] = 8.0
    d["auto_map"]["AutoConfig"] = "changed"
    assert config.rope_scaling == {"type": "linear", "factor": 2.0}
    assert config.extra["auto_map"] == {"AutoConfig": "x.Y"}


def test_config_from_dict_drops_only_model_type_and_architectures():
    from dsmoe.config import DeepSeekMoEConfig

    data = {**_tiny_config().to_dict(), "torch_dtype": "bfloat16"}
    back = DeepSeekMoEConfig.from_dict(data)
    assert back == _tiny_config() and back.extra == {"torch_dtype": "bfloat16"}
    with pytest.raises(TypeError, match=r"^DeepSeekMoEConfig.from_dict: data must be a dict, got list$"):
        DeepSeekMoEConfig.from_dict([("hidden_size", 32)])


def test_config_json_text_is_indented_sorted_and_ends_with_a_newline():
    text = _tiny_config().to_json_string()
    lines = text.split("\n")
    assert text.endswith("}\n") and lines[0] == "{"
    top = [line for line in lines[1:-2] if line.startswith('  "')]  # 2-space indent: the top level
    assert all(line.startswith(("  ", "    ")) and line[2] in '"] ' for line in lines[1:-2])
    assert '    "DeepseekForCausalLM"' in lines  # nested values one level further
    keys = [line.split('"')[1] for line in top]
    assert keys == sorted(keys) and len(keys) == len(_tiny_config().to_dict())


def test_config_file_overrides_and_missing_file(tmp_path):
    from dsmoe.config import DeepSeekMoEConfig

    _tiny_config().save_pretrained(tmp_path)
    assert DeepSeekMoEConfig.from_json_file(tmp_path / "config.json", num_hidden_layers=3).num_hidden_layers == 3
    assert DeepSeekMoEConfig.from_pretrained(tmp_path, num_hidden_layers=5).num_hidden_layers == 5
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"^DeepSeekMoEConfig: no config file at {re.escape(str(missing))}$"):
        DeepSeekMoEConfig.from_pretrained(missing)


def test_config_replace_keeps_unknown_keys_equality_and_repr():
    config = _tiny_config()
    config.extra["torch_dtype"] = "bfloat16"
    assert config.replace(num_hidden_layers=3).extra == {"torch_dtype": "bfloat16"}
    assert config != config.replace(num_hidden_layers=3)
    assert config == config.replace() and config != "not a config"
    assert repr(config) == (
        "DeepSeekMoEConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, "
        "num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, "
        "n_routed_experts=8, num_experts_per_tok=2)"
    )


@pytest.mark.parametrize("name", ["deepseek_moe_2b", "deepseek_moe_16b", "deepseek_moe_145b"])
def test_paper_preset_functions_take_overrides(name):
    import dsmoe.config as cfg

    config = getattr(cfg, name)(num_hidden_layers=2, vocab_size=100)
    assert (config.num_hidden_layers, config.vocab_size) == (2, 100)
    assert config.n_routed_experts == {"deepseek_moe_2b": 63, "deepseek_moe_16b": 64, "deepseek_moe_145b": 128}[name]


@pytest.mark.parametrize("scaling, limit", [
    (None, 128),
    ({"type": "linear", "factor": 2.0}, 256),
    ({"rope_type": "linear", "factor": 2.5}, 320),  # transformers' newer key
    ({"type": "dynamic", "factor": 2.0}, None),  # NTK scaling exists to go past the limit
    ({"rope_type": "dynamic", "factor": 4.0}, None),
])
def test_position_limit_and_check_positions(scaling, limit):
    from dsmoe.config import check_positions, position_limit

    config = _tiny_config(max_position_embeddings=128, rope_scaling=scaling)
    assert position_limit(config) == limit
    check_positions(config, limit or 10_000, "generate")  # exactly the limit is allowed
    if limit is not None:
        with pytest.raises(ValueError, match=(
            rf"^generate needs {limit + 1} positions but the model's max_position_embeddings is {limit}; "
            r"shorten the input \(or the number of new tokens\)$")):
            check_positions(config, limit + 1, "generate")


# ---------------------------------------------------------------- CUDA kernels (SIMT emulator)
@pytest.fixture(params=kernels_params(), scope="module")
def kern(request):
    return make_kernels(request.param)


def test_grouped_gemm_wgrad_clamps_offsets_past_the_rows(kern):
    """The CUDA kernels cannot read the offsets on the host, so index_math.h's group_rows clamps
    each group to the tensor's rows: offsets past the end (malformed) never make a kernel read
    past it. Here a and grad_c are the first rows of larger buffers whose other rows hold 1e4, so
    a read past the end shows in the gradient. (The CPU op refuses such offsets outright.)"""
    rows, K, N = 5, 16, 8
    big_a = torch.full((rows + 8, K), 1e4)
    big_g = torch.full((rows + 8, N), 1e4)
    big_a[:rows] = torch.randn(rows, K)
    big_g[:rows] = torch.randn(rows, N)
    a, grad_c = big_a[:rows], big_g[:rows]
    assert a.is_contiguous() and a.data_ptr() == big_a.data_ptr()
    offsets = torch.tensor([0, 3, rows + 6], dtype=torch.int32)
    dw = kern.run("grouped_gemm_wgrad", a, grad_c, offsets, False)
    a64, g64 = a.double(), grad_c.double()
    expected = torch.stack([a64[:3].T @ g64[:3], a64[3:].T @ g64[3:]])
    torch.testing.assert_close(dw.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"expert_offsets\[-1\]=11 must not exceed the number of rows \(5\)"):
        ops.grouped_gemm_wgrad(a, grad_c, offsets, False)


@pytest.mark.parametrize("changes", [
    dict(moe_intermediate_size=1), dict(n_shared_experts=0), dict(n_routed_experts=1, num_experts_per_tok=1),
    dict(num_experts_per_tok=8), dict(rope_theta=1e-3), dict(rms_norm_eps=1e-12), dict(aux_loss_alpha=0.0),
])
def test_config_accepts_the_boundaries(changes):
    config = _tiny_config(**changes)
    assert all(getattr(config, k) == v for k, v in changes.items())


@pytest.mark.parametrize("changes, message", [
    (dict(rope_theta=0.0), "rope_theta must be > 0.0, got 0.0"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be > 0.0, got 0.0"),
    (dict(aux_loss_alpha=-0.5), "aux_loss_alpha must be >= 0.0, got -0.5"),
    (dict(aux_loss_alpha=float("nan")), "aux_loss_alpha must be a finite number, got nan"),
    (dict(aux_loss_alpha=True), "aux_loss_alpha must be a finite number, got True"),
    (dict(vocab_size=None), "vocab_size must be an integer >= 1, got None"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size must be an integer >= 1, got 0"),
    (dict(n_shared_experts=-1), "n_shared_experts must be an integer >= 0, got -1"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9 must be <= n_routed_experts=8"),
    (dict(num_experts_per_tok=None), "num_experts_per_tok must be set when n_routed_experts is"),
    (dict(rope_scaling="linear"), "rope_scaling must be a dict or null, got 'linear'"),
    (dict(hidden_size=36, num_attention_heads=4, num_key_value_heads=4),
     "hidden_size / num_attention_heads = 9 must be even (rotary embeddings rotate pairs)"),
])
def test_config_refusals_name_the_field(changes, message):
    with pytest.raises(ValueError, match="^DeepSeekMoEConfig: " + re.escape(message) + "$"):
        _tiny_config(**changes)


def test_config_unknown_fields_and_presets_messages():
    from dsmoe.config import get_preset

    with pytest.raises(TypeError, match=re.escape(
            "DeepSeekMoEConfig: unknown field(s) a_field, b_field; use DeepSeekMoEConfig.from_dict to keep "
            "unknown keys of a config.json")):
        _tiny_config(b_field=1, a_field=2)
    with pytest.raises(ValueError, match=re.escape(
            "unknown preset 'nope'; choose one of deepseek-moe-2b, deepseek-moe-16b, deepseek-moe-145b, small, tiny "
            "(or 2b/16b/145b)")):
        get_preset("nope")


# ---------------------------------------------------------------- dsmoe/layers.py (mutmut survivors)
def test_rmsnorm_default_eps_is_the_seeds():
    """DeepseekRMSNorm's default eps is 1e-6: visible where the mean square is of its order."""
    from dsmoe.layers import RMSNorm

    x = torch.full((2, 8), 1e-3, dtype=torch.float64)  # mean square 1e-6: eps counts half
    want = x / torch.sqrt(torch.tensor(1e-6 + 1e-6, dtype=torch.float64))
    torch.testing.assert_close(RMSNorm(8).double()(x), want, rtol=1e-6, atol=0)  # (fp32 inside)


def test_block_norms_take_the_configured_eps_and_keep_their_index():
    from dsmoe.layers import DeepSeekMoEBlock

    config = _tiny_config(rms_norm_eps=0.25)
    block = DeepSeekMoEBlock(config, 1)
    assert block.layer_idx == 1
    x = torch.full((1, 3, 32), 0.5)  # mean square 0.25: normalised by sqrt(0.25 + 0.25)
    for norm in (block.input_layernorm, block.post_attention_layernorm):
        torch.testing.assert_close(norm(x), torch.full_like(x, 0.5 / 0.5 ** 0.5))


@pytest.mark.parametrize("impl", [None, "dsmoe", "reference"])
def test_block_builds_its_moe_layer_with_the_backend_it_is_given(impl):
    from dsmoe.layers import DeepSeekMoEBlock

    config = _tiny_config(first_k_dense_replace=0)
    block = DeepSeekMoEBlock(config, 0) if impl is None else DeepSeekMoEBlock(config, 0, moe_impl=impl)
    assert block.is_moe and block.mlp.impl == (impl or "dsmoe")


def test_noisy_router_noise_has_the_learned_std():
    """In training the logits get N(0, 1) * softplus(x W_noise^T): with W_noise = 0 the noise's
    std is softplus(0) = ln 2 around the plain logits (the seeds' README NoisyTopKRouter)."""
    import math

    from dsmoe.layers import NoisyTopKRouter

    router = NoisyTopKRouter(_tiny_config())
    x = torch.randn(20000, 32)
    plain = torch.nn.functional.linear(x, router.weight)
    torch.manual_seed(0)
    noise = (router.train().logits(x) - plain).detach()
    assert abs(noise.std().item() - math.log(2.0)) < 0.01 and abs(noise.mean().item()) < 0.01
    assert torch.equal(router.eval().logits(x), plain)


def test_router_defaults_to_one_sequence_and_the_dsmoe_backend(monkeypatch):
    """TopKRouter(x) with no arguments: statistics over all tokens as one sequence ([1, E]), the
    fused gate (the dsmoe backend), and the seeds' routing: softmax(x W^T), its top k."""
    from dsmoe.backend import BACKENDS
    from dsmoe.layers import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(_tiny_config())
    x = torch.randn(6, 32)
    called = []
    for name in ("dsmoe", "reference"):
        route = BACKENDS[name].route
        monkeypatch.setattr(BACKENDS[name], "route", lambda *a, _n=name, _r=route: (called.append(_n), _r(*a))[1])
    out = router(x)
    assert called == ["dsmoe"]
    assert out.tokens_per_expert.shape == (1, 8) and int(out.tokens_per_expert.sum()) == 6 * 2
    scores = torch.softmax(x.double() @ router.weight.double().T, dim=-1)
    top = scores.topk(2, dim=-1)
    assert torch.equal(out.expert_ids.long(), top.indices)
    torch.testing.assert_close(out.weights.double(), top.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.score_sums.double(), scores.sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


def test_routed_experts_default_to_the_dsmoe_backend(monkeypatch):
    """RoutedExperts(x, weights, ids) with no impl runs the dsmoe backend and computes
    y[t] = sum_j w[t, j] * down(silu(gate x) * up x) of expert ids[t, j] (written out here)."""
    from dsmoe.backend import BACKENDS
    from dsmoe.layers import RoutedExperts

    torch.manual_seed(0)
    experts = RoutedExperts(4, 16, 8).double()
    x, w = torch.randn(5, 16, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    ids = torch.tensor([[0, 3], [1, 1], [2, 0], [3, 2], [0, 1]], dtype=torch.int32)
    called = []
    for name in ("dsmoe", "reference"):
        run = BACKENDS[name].routed_experts
        monkeypatch.setattr(BACKENDS[name], "routed_experts",
                            lambda *a, _n=name, _r=run: (called.append(_n), _r(*a))[1])
    y = experts(x, w, ids)
    assert called == ["dsmoe"]
    want = torch.zeros_like(x)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            g, u = (experts.w_gate_up[e] @ x[t]).split(8)
            want[t] += w[t, j] * (experts.w_down[e] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(y, want.detach())


def test_moe_layer_refuses_a_2d_input_naming_its_shape():
    from dsmoe.layers import DeepSeekMoELayer

    layer = DeepSeekMoELayer(_tiny_config())
    with pytest.raises(ValueError, match="^" + re.escape(
            "DeepSeekMoELayer: hidden_states must be [batch, seq, hidden], got (4, 32)") + "$"):
        layer(torch.randn(4, 32))


def test_reference_layer_routes_with_the_reference_backend(monkeypatch):
    """A layer built with impl="reference" routes in plain PyTorch: the dsmoe gate is never called."""
    from dsmoe.backend import BACKENDS
    from dsmoe.layers import DeepSeekMoELayer

    def refuse(*args, **kwargs):
        raise AssertionError("the reference layer called the dsmoe backend's gate")

    monkeypatch.setattr(BACKENDS["dsmoe"], "route", refuse)
    layer = DeepSeekMoELayer(_tiny_config(), impl="reference").eval()
    out = layer(torch.randn(2, 3, 32))
    assert out.hidden_states.shape == (2, 3, 32) and int(out.tokens_per_expert.sum()) == 2 * 3 * 2


def test_routed_experts_default_init_std_is_the_seeds():
    """RoutedExperts(E, h, I) alone (the seeds' ExpertGroup): weights ~ N(0, 0.02), as the seeds
    initialise each expert's nn.Linear (initializer_range)."""
    from dsmoe.layers import RoutedExperts

    torch.manual_seed(0)
    experts = RoutedExperts(8, 64, 32)
    for w in (experts.w_gate_up, experts.w_down):
        assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001


def test_router_init_is_the_seeds_kaiming_uniform():
    """The seeds' MoEGate: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(h), 1/sqrt(h))."""
    from dsmoe.layers import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(_tiny_config(hidden_size=256, n_routed_experts=64, intermediate_size=512))
    bound = 1 / 256 ** 0.5
    top = router.weight.abs().max().item()
    assert 0.99 * bound < top <= bound
    assert abs(router.weight.std().item() - bound / 3 ** 0.5) < 0.02 * bound


def test_router_top1_is_never_renormalised():
    """norm_topk_prob with k = 1 leaves the gate value at the softmax score (the seeds renormalise
    only when top_k > 1): a renormalised top-1 would always be 1."""
    from dsmoe.layers import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(_tiny_config(num_experts_per_tok=1, norm_topk_prob=True))
    x = torch.randn(5, 32)
    want = torch.softmax(x.double() @ router.weight.double().T, dim=-1).max(dim=-1).values
    out = router(x)
    torch.testing.assert_close(out.weights.double().squeeze(1), want, rtol=1e-5, atol=1e-6)
    assert bool((out.weights < 0.99).all())


def test_selection_bias_buffer_is_fp32_whatever_the_default_dtype():
    """DeepSeek-V3's e_score_correction_bias is kept in fp32 (checkpoints store it so), also when
    the model is built under another default dtype."""
    from dsmoe.layers import TopKRouter

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        router = TopKRouter(_tiny_config(use_selection_bias=True))
    finally:
        torch.set_default_dtype(previous)
    assert router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, torch.zeros(8))


# ---- the rest of layers.py (second pass, 2026-12-03)
def test_moe_layer_needs_routed_experts_and_keeps_its_config():
    from dsmoe.layers import DeepSeekMoELayer

    config = _tiny_config()
    assert DeepSeekMoELayer(config).config is config
    with pytest.raises(ValueError, match="^" + re.escape("DeepSeekMoELayer: config.n_routed_experts must be set") + "$"):
        DeepSeekMoELayer(_tiny_config(n_routed_experts=None, num_experts_per_tok=None))


def test_moe_layer_experts_take_the_configured_init_std():
    from dsmoe.layers import DeepSeekMoELayer

    torch.manual_seed(0)
    layer = DeepSeekMoELayer(_tiny_config(initializer_range=0.5))
    assert abs(layer.experts.w_gate_up.std().item() - 0.5) < 0.02


@pytest.mark.parametrize("alpha_1, alpha_2, devices", [(0.0, 0.0, 2), (0.0, 0.05, 1), (0.01, 0.0, 2), (0.01, 0.05, 1)])
def test_moe_layer_builds_only_the_losses_that_are_on(alpha_1, alpha_2, devices):
    """A loss with alpha 0, or the device-level loss on one device, is not built and adds
    nothing: no aux loss at all when none is on, else exactly the expert-level loss."""
    from dsmoe.layers import DeepSeekMoELayer

    torch.manual_seed(0)
    config = _tiny_config(aux_loss_alpha=alpha_1, device_aux_loss_alpha=alpha_2, num_expert_devices=devices,
                          seq_aux=False)
    layer = DeepSeekMoELayer(config).double().train()
    assert (layer.balance_loss is None) == (alpha_1 == 0) and layer.device_balance_loss is None
    captured = {}
    layer.gate.register_forward_hook(lambda m, a, out: captured.setdefault("route", out))
    out = layer(torch.randn(2, 5, 32, dtype=torch.float64))
    if alpha_1 == 0:
        assert out.aux_loss is None
        return
    counts, sums = captured["route"].tokens_per_expert[0].double(), captured["route"].score_sums[0]
    T, E, k = 10, 8, 2
    want = alpha_1 * sum(E / (k * T) * counts[e] * sums[e] / T for e in range(E))  # Eq. 12-14
    assert out.aux_loss.item() == pytest.approx(want.item(), rel=1e-10)


def test_rmsnorm_computes_in_fp32_and_rounds_once():
    from dsmoe.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64)
    x = torch.randn(16, 64).bfloat16() * 3
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(norm(x), want)


def _rotary(**changes):
    from dsmoe.layers import RotaryEmbedding

    return RotaryEmbedding(_tiny_config(**changes))


def _seeds_tables(positions, dim, base, dtype):
    """The seeds' rotary tables: fp32 inverse frequencies, angles in ``dtype``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions.to(dtype).unsqueeze(-1) * inv_freq.to(dtype)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def test_rotary_tables_in_fp32_and_fp64():
    """fp32 models get the seeds' fp32 tables; fp64 models tables computed in fp64 (far
    positions make the difference: fp32 angles near 4000 are off by ~1e-4)."""
    rot = _rotary(max_position_embeddings=8192)
    pos = torch.arange(3900, 4100).unsqueeze(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        cos, sin = rot(pos, dtype)
        want_cos, want_sin = _seeds_tables(pos, rot.dim, rot.base, dtype)
        assert cos.dtype == dtype
        torch.testing.assert_close(cos, want_cos, rtol=0, atol=tol)
        torch.testing.assert_close(sin, want_sin, rtol=0, atol=tol)


def test_rotary_scaling_reads_the_new_key_name():
    """transformers' newer configs name the scaling "rope_type"; it means what "type" means."""
    pos = torch.arange(0, 64).unsqueeze(0)
    old = _rotary(rope_scaling={"type": "linear", "factor": 2.0})(pos, torch.float64)
    new = _rotary(rope_scaling={"rope_type": "linear", "factor": 2.0})(pos, torch.float64)
    plain = _rotary()(pos, torch.float64)
    torch.testing.assert_close(new, old, rtol=0, atol=0)
    torch.testing.assert_close(new[0], _seeds_tables(pos / 2.0, 8, 10000.0, torch.float64)[0], rtol=0, atol=1e-12)
    assert not torch.allclose(new[0], plain[0])
    # a factor that does not divide exactly: the positions are scaled in fp64 for an fp64 model
    far = torch.arange(100000, 100064).unsqueeze(0)
    cos = _rotary(rope_scaling={"type": "linear", "factor": 3.0}, max_position_embeddings=4096)(far, torch.float64)[0]
    torch.testing.assert_close(cos, _seeds_tables(far.double() / 3.0, 8, 10000.0, torch.float64)[0], rtol=0, atol=1e-9)


def test_rotary_dynamic_ntk_base_past_the_trained_length():
    """Dynamic NTK: past max_position_embeddings the base becomes
    base * (factor * L / max - (factor - 1)) ** (dim / (dim - 2)); up to it, the plain base."""
    rot = _rotary(max_position_embeddings=32, rope_scaling={"type": "dynamic", "factor": 4.0})
    dim, base = rot.dim, rot.base
    for L in (20, 32, 33, 50):
        pos = torch.arange(L).unsqueeze(0)
        b = base if L <= 32 else base * (4.0 * L / 32 - 3.0) ** (dim / (dim - 2))
        cos, sin = rot(pos, torch.float64)
        want_cos, want_sin = _seeds_tables(pos, dim, b, torch.float64)
        # (the seeds' inverse frequencies are fp32; the dynamic branch recomputes them in fp64)
        inv = 1.0 / (b ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        emb = torch.cat((pos.double().unsqueeze(-1) * inv,) * 2, dim=-1)
        ref_cos = emb.cos() if L > 32 else want_cos
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)


def _block_and_tables(L, **changes):
    from dsmoe.layers import DeepSeekMoEBlock, RotaryEmbedding

    torch.manual_seed(0)
    config = _tiny_config(first_k_dense_replace=0, **changes)
    block = DeepSeekMoEBlock(config, 0).double().eval()
    rot = RotaryEmbedding(config)
    return block, rot


@pytest.mark.parametrize("L", [2, 5])
def test_block_attention_is_causal_and_takes_the_mask(L):
    """Causal attention without a mask (token 0 of a 2-token sequence sees only itself), and an
    explicit mask is used: with a diagonal mask every token sees only itself, so each position's
    output equals that token run alone at its position."""
    block, rot = _block_and_tables(L)
    x = torch.randn(1, L, 32, dtype=torch.float64)
    pos = torch.arange(L).unsqueeze(0)
    cos, sin = rot(pos, torch.float64)
    alone = [block(x[:, t:t + 1], *rot(pos[:, t:t + 1], torch.float64))[0][0, 0] for t in range(L)]
    causal = block(x, cos, sin)[0]
    torch.testing.assert_close(causal[0, 0], alone[0])
    diagonal = torch.eye(L, dtype=torch.bool).view(1, 1, L, L)
    masked = block(x, cos, sin, diagonal)[0]
    for t in range(L):
        torch.testing.assert_close(masked[0, t], alone[t])
    assert not torch.allclose(causal[0, L - 1], alone[L - 1])


def test_attention_dropout_only_in_training():
    from dsmoe.layers import Attention, RotaryEmbedding

    torch.manual_seed(0)
    config = _tiny_config(attention_dropout=0.5)
    attn = Attention(config, 0)
    x = torch.randn(1, 6, 32)
    cos, sin = RotaryEmbedding(config)(torch.arange(6).unsqueeze(0), torch.float32)
    attn.eval()
    torch.testing.assert_close(attn(x, cos, sin), attn(x, cos, sin), rtol=0, atol=0)
    no_dropout = Attention(_tiny_config(attention_dropout=0.0), 0)
    no_dropout.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(x, cos, sin), no_dropout.eval()(x, cos, sin), rtol=0, atol=0)
    attn.train()
    torch.manual_seed(1)
    a = attn(x, cos, sin)
    b = attn(x, cos, sin)
    assert not torch.allclose(a, b)


def test_moe_layer_loss_modules_print_their_sizes():
    from dsmoe.layers import DeepSeekMoELayer

    layer = DeepSeekMoELayer(_tiny_config(aux_loss_alpha=0.01, device_aux_loss_alpha=0.05, num_expert_devices=2))
    assert repr(layer.balance_loss) == "LoadBalanceLoss(num_experts=8, k=2, alpha=0.01)"
    assert repr(layer.device_balance_loss) == "DeviceBalanceLoss(num_experts=8, k=2, num_devices=2, alpha=0.05)"


def test_chunked_prefill_over_a_cache_equals_one_prefill():
    # queries that follow cached keys (a prompt fed in chunks, or speculative tokens): the mask
    # the model builds is bottom-right aligned; SDPA's is_causal would be top-left aligned
    from dsmoe import DeepSeekMoEForCausalLM, KVCache, get_preset

    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(get_preset("tiny", num_hidden_layers=2)).double().eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(ids)["logits"]
        cache = KVCache.dynamic(model.config)
        first = model(ids[:, :4], past_key_values=cache, use_cache=True)["logits"]
        rest = model(ids[:, 4:], past_key_values=cache, use_cache=True)["logits"]
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- dsmoe/model.py (mutmut survivors)
def _tiny_model(dtype=torch.float64, **changes):
    from dsmoe import DeepSeekMoEForCausalLM, get_preset

    torch.manual_seed(0)
    return DeepSeekMoEForCausalLM(get_preset("tiny", **changes)).to(dtype)


def test_model_output_reads_like_a_mapping_of_its_fields():
    model = _tiny_model().eval()
    with torch.no_grad():
        out = model(torch.randint(0, 64, (1, 3)))
    fields = ["logits", "loss", "aux_loss", "past_key_values", "hidden_states", "tokens_per_expert"]
    assert list(out) == fields and out.keys() == fields
    assert out["logits"] is out.logits and out.get("logits") is out.logits
    assert "logits" in out and "nope" not in out and "keys" not in out
    assert out.get("nope", 5) == 5 and out.get("keys") is None  # a method is not a field
    for key in ("nope", "keys", 0):
        with pytest.raises(KeyError) as error:
            out[key]
        assert error.value.args == (key,)


def test_model_refuses_a_config_of_another_type_naming_it():
    from dsmoe import DeepSeekMoEForCausalLM

    with pytest.raises(TypeError, match=r"^config must be a DeepSeekMoEConfig, got dict$"):
        DeepSeekMoEForCausalLM({"hidden_size": 32})


def test_backbone_builds_the_configured_layers():
    from dsmoe import get_preset
    from dsmoe.model import DeepSeekMoEBackbone

    config = get_preset("tiny", pad_token_id=3, rms_norm_eps=0.5)
    for impl, expected in ((None, "dsmoe"), ("reference", "reference")):
        backbone = DeepSeekMoEBackbone(config) if impl is None else DeepSeekMoEBackbone(config, moe_impl=impl)
        assert [block.mlp.impl for block in backbone.layers if block.is_moe] == [expected]
    assert backbone.padding_idx == 3 and backbone.embed_tokens.padding_idx == 3
    # the final norm uses the configured eps: x / sqrt(mean(x^2) + 0.5) * w (computed in fp32, as
    # the seeds' RMSNorm)
    backbone.double().eval()
    seen = []
    backbone.norm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = backbone(torch.randint(0, 64, (2, 5)))
    x = seen[0]
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 0.5) * backbone.norm.weight
    torch.testing.assert_close(out.hidden_states, expected, rtol=1e-6, atol=1e-6)
    assert out.all_hidden_states is None and out.router_logits is None  # only on request


def test_native_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(monkeypatch):
    import warnings

    from dsmoe.layers import DeepSeekMoEBlock

    calls = []
    block_forward = DeepSeekMoEBlock.forward

    def counted(self, *args):
        calls.append(self.layer_idx)
        return block_forward(self, *args)

    monkeypatch.setattr(DeepSeekMoEBlock, "forward", counted)
    model = _tiny_model().train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a padded row: the blocks get an attention mask
    params = [p for p in model.parameters() if p.requires_grad]
    assert model.model.gradient_checkpointing is False  # off unless asked for
    model(ids, labels=ids).loss.backward()
    assert calls == [0, 1]
    grads = {}
    for enable in (False, True, False):
        model.set_gradient_checkpointing(enable)
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch's "pass use_reentrant explicitly"
            # torch.autograd.grad: reentrant checkpointing supports only .backward()
            grads[enable] = torch.autograd.grad(model(ids, attention_mask=mask, labels=ids).loss, params)
        assert calls == ([0, 1, 1, 0] if enable else [0, 1])  # each block again in backward (last first)
        assert model.model.gradient_checkpointing is enable
    for with_, without in zip(grads[True], grads[False]):
        torch.testing.assert_close(with_, without, rtol=1e-12, atol=1e-12)
    calls.clear()
    model.set_gradient_checkpointing()
    with torch.no_grad():
        model(ids)  # nothing to recompute without grad
    assert calls == [0, 1] and model.model.gradient_checkpointing is True


def test_gradient_checkpointing_refuses_a_kv_cache_in_training():
    # backward would run each block again and write the KV cache twice: refused, not corrupted
    model = _tiny_model().train()
    model.set_gradient_checkpointing(True)
    ids = torch.randint(0, 64, (2, 7))
    message = (
        "a KV cache (use_cache / past_key_values) cannot be combined with gradient checkpointing in "
        "training: pass use_cache=False, or run under torch.no_grad() or eval()"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model(ids, labels=ids, use_cache=True)
    with torch.no_grad():
        assert model(ids, use_cache=True).past_key_values.get_seq_length() == 7


def test_attention_mask_longer_than_the_keys_is_refused():
    model = _tiny_model().eval()
    with pytest.raises(ValueError, match=r"^attention_mask has 7 columns but the keys span 5 positions$"):
        model(torch.randint(0, 64, (2, 5)), attention_mask=torch.ones(2, 7, dtype=torch.long))


def test_static_cache_with_a_mask_of_the_tokens_so_far_equals_the_dynamic_cache():
    # the mask covers the tokens seen so far (shorter than the static buffer): the later columns
    # are future slots, filled in as allowed (causality hides them), left padding kept
    from dsmoe import KVCache

    model = _tiny_model().eval()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    static = KVCache.static(model.config, 2, 12, dtype=torch.float64)
    dynamic = KVCache.dynamic(model.config)
    with torch.no_grad():
        a = model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=static)["logits"]
        b = model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=dynamic, use_cache=True)["logits"]
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for t in range(5, 8):
            a = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=static)["logits"]
            b = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=dynamic)["logits"]
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # the padded row equals that row alone, without padding
        alone = model(ids[1:, 3:])["logits"]
    torch.testing.assert_close(a[1], alone[0, -1:], rtol=1e-9, atol=1e-9)


def test_forward_checks_positions_unless_a_static_cache_gets_them_from_the_caller():
    from dsmoe import KVCache

    model = _tiny_model(max_position_embeddings=8).eval()
    ids = torch.randint(0, 64, (1, 9))
    message = r"^forward needs 9 positions but the model's max_position_embeddings is 8;"
    with torch.no_grad():
        with pytest.raises(ValueError, match=message):
            model(ids)
        # a dynamic cache with the caller's cache_position: still checked
        cache = KVCache.dynamic(model.config)
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match=message):
            model(ids[:, 6:], past_key_values=cache, cache_position=torch.arange(6, 9))
        # a static cache larger than the limit, positions chosen by the model: checked
        static = KVCache.static(model.config, 1, 12, dtype=torch.float64)
        with pytest.raises(ValueError, match=message):
            model(ids, past_key_values=static)
        # the caller owns the positions of a static cache (generate checks its whole length)
        static = KVCache.static(model.config, 1, 12, dtype=torch.float64)
        model(ids, past_key_values=static, cache_position=torch.arange(9))


def test_generate_defaults_to_twenty_new_tokens():
    model = _tiny_model().eval()
    ids = torch.randint(0, 64, (1, 3))
    assert model.generate(ids, eos_token_id=None).shape == (1, 23)


def _rotary_positions(model):
    """The position ids the model hands its rotary tables, call by call."""
    seen = []
    model.model.rotary_emb.register_forward_hook(lambda module, args, out: seen.append(args[0].tolist()))
    return seen


def test_left_padded_rows_count_positions_from_their_first_token():
    from dsmoe import KVCache

    model = _tiny_model().eval()
    seen = _rotary_positions(model)
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        model(ids, attention_mask=mask)
        # a static cache given only the prompt's mask: later tokens continue each row's count
        cache = KVCache.static(model.config, 2, 8, dtype=torch.float64)
        model(ids, attention_mask=mask, past_key_values=cache)
        model(ids[:, :1], attention_mask=mask, past_key_values=cache)
        model(ids[:, :2], attention_mask=mask, past_key_values=cache)
    assert seen == [
        [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]],
        [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]],
        [[3], [5]],
        [[4, 5], [6, 7]],
    ]


def test_model_forward_messages():
    model = _tiny_model().eval()
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match=r"^forward: pass input_ids or inputs_embeds$"):
        model()
    with pytest.raises(TypeError, match=r"KVCache.static\), got tuple$"):
        model(ids, past_key_values=())
    with pytest.raises(ValueError, match=r"^logits_to_keep must be >= 0, got -1$"):
        model(ids, logits_to_keep=-1)
    with pytest.raises(ValueError, match=r"^logits_to_keep cannot be combined with labels \(the loss needs every position\)$"):
        model(ids, labels=ids, logits_to_keep=1)


def test_model_forward_passes_positions_and_cache_slots_on():
    from dsmoe import KVCache

    model = _tiny_model().eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        plain = model(ids)
        # the final normed hidden states are what the head maps to logits
        torch.testing.assert_close(model.lm_head(plain.hidden_states).float(), plain.logits, rtol=0, atol=0)
        spread = torch.arange(6)[None] * 3
        out = model(ids, position_ids=spread)
        expected = model.lm_head(model.model(ids, position_ids=spread).hidden_states).float()
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
        assert not torch.allclose(out.logits, plain.logits)
        # a caller rewrites the last slot of a static cache (a rejected draft token): same logits
        cache = KVCache.static(model.config, 1, 8, dtype=torch.float64)
        model(ids, past_key_values=cache, cache_position=torch.arange(6))
        again = model(ids[:, 5:], past_key_values=cache, cache_position=torch.tensor([5]))
        torch.testing.assert_close(again.logits[:, -1], plain.logits[:, -1], rtol=1e-9, atol=1e-9)
        # use_cache=False: a cache passed along is neither read nor written
        cache = KVCache.dynamic(model.config)
        out = model(ids, past_key_values=cache, use_cache=False)
        assert out.past_key_values is None and cache.get_seq_length() == 0
        torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
        # a static cache filled to the last slot without cache_position
        cache = KVCache.static(model.config, 1, 6, dtype=torch.float64)
        torch.testing.assert_close(model(ids, past_key_values=cache).logits, plain.logits, rtol=1e-9, atol=1e-9)


def test_backbone_returns_hidden_states_and_router_logits_on_request():
    import torch.nn.functional as F

    model = _tiny_model().eval()
    ids = torch.randint(0, 64, (2, 5))
    moe = model.moe_layers()[0]
    moe_inputs = []
    moe.register_forward_hook(lambda module, args, out: moe_inputs.append(args[0]))
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True, output_router_logits=True)
    hidden = out.all_hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(hidden[0], model.model.embed_tokens(ids), rtol=0, atol=0)
    assert hidden[-1] is out.hidden_states
    (logits,) = out.router_logits
    torch.testing.assert_close(logits, moe_inputs[0].reshape(10, -1) @ moe.gate.weight.T, rtol=1e-12, atol=1e-12)
    assert not moe.gate._forward_hooks  # removed again


def test_model_counts_its_parameters():
    # tiny: vocab 64, hidden 32, 2 layers (the first dense, intermediate 64), 4 heads of 8 over 2
    # key/value heads, 8 routed experts of 16 and 1 shared, untied head
    attention = 32 * 32 + 2 * (32 * 16) + 32 * 32
    dense = attention + 2 * 32 + 3 * 32 * 64
    moe = attention + 2 * 32 + 8 * 32 + 8 * 3 * 32 * 16 + 3 * 32 * 16
    assert _tiny_model().num_parameters() == 2 * 64 * 32 + 32 + dense + moe
    assert _tiny_model(tie_word_embeddings=True).num_parameters() == 64 * 32 + 32 + dense + moe


def test_from_pretrained_builds_the_moe_impl_asked_for(tmp_path):
    from dsmoe import DeepSeekMoEForCausalLM

    _tiny_model().save_pretrained(tmp_path)
    assert DeepSeekMoEForCausalLM.from_pretrained(tmp_path).moe_impl == "dsmoe"
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path, moe_impl="reference")
    assert [layer.impl for layer in loaded.moe_layers()] == ["reference"]


def test_init_module_is_the_seeds_initialisation():
    from torch import nn

    from dsmoe.layers import RMSNorm
    from dsmoe.model import init_module

    torch.manual_seed(0)
    linear = nn.Linear(400, 500, bias=True)
    embedding = nn.Embedding(500, 400, padding_idx=3)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.fill_(5.0)
        for module in (linear, embedding, norm):
            init_module(module, 0.05)
    for weight in (linear.weight, embedding.weight[4:]):
        # normal(0, 0.05) over 200k values: mean within ~5 standard errors of 0, std within 1%
        assert abs(float(weight.mean())) < 5 * 0.05 / weight.numel() ** 0.5
        assert abs(float(weight.std()) / 0.05 - 1) < 0.01
    assert torch.equal(linear.bias, torch.zeros(500))
    assert torch.equal(embedding.weight[3], torch.zeros(400))
    assert torch.equal(norm.weight, torch.ones(64))


def test_update_selection_bias_default_rate_and_layer_count_message():
    model = _tiny_model(use_selection_bias=True).eval()
    layers = model.moe_layers()
    loads = tuple(torch.arange(layer.gate.e_score_correction_bias.numel(), dtype=torch.float32) for layer in layers)
    model.update_selection_bias(loads)
    for layer, load in zip(layers, loads):
        assert torch.equal(layer.gate.e_score_correction_bias, 1e-3 * torch.sign(load.mean() - load))
    with pytest.raises(ValueError, match=f"^tokens_per_expert has {len(layers) + 1} entries for {len(layers)} MoE layers$"):
        model.update_selection_bias(loads + loads[:1])

