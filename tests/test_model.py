"""The DeepSeekMoE layer and the whole model against the plain-PyTorch transcription of the seeds'
code (tests/seeds_reference.py): outputs, balance loss and the gradient of every parameter, in
training and inference mode, with the dsmoe ops and with the reference path."""
from __future__ import annotations

import copy

import pytest
import torch

import seeds_reference as seeds
from dsmoe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, DeepSeekMoELayer, get_preset
from dsmoe.checkpoint import hf_layout, to_hf_state_dict

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}
# The seeds count expert loads in an fp32 tensor (torch.zeros default) whatever the model dtype,
# so their balance loss carries fp32 rounding even in an fp64 model.
AUX_TOL = dict(rtol=1e-6, atol=1e-9)
# The seeds' attention takes its softmax "upcast" to fp32, which rounds an fp64 model's
# attention probabilities to fp32: whole-model comparisons in fp64 hold to about fp32 precision.
MODEL_TOL = {torch.float64: dict(rtol=1e-6, atol=1e-7), torch.float32: TOL[torch.float32]}


def hf_grads(module) -> dict:
    """Gradients of ``module``'s parameters under the Hugging Face (per-expert) names."""
    params = dict(module.named_parameters())
    out = {}
    for name, target in hf_layout(module).items():
        if target.param_name not in params:
            continue  # a buffer
        grad = params[target.param_name].grad
        assert grad is not None, f"no gradient for {target.param_name}"
        if target.expert is not None:
            grad = grad[target.expert]
            if target.rows is not None:
                grad = grad[target.rows[0] : target.rows[1]]
        out[name] = grad
    return out


def load_into_seeds(ref, ours) -> None:
    """Copies dsmoe weights into the seeds' model through the checkpoint name mapping."""
    state = to_hf_state_dict(ours)
    if ours.config.tie_word_embeddings:  # a tied head is saved once, as the embedding
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    ref.load_state_dict(state, strict=True)


def seeds_grads(module) -> dict:
    return {name: p.grad for name, p in module.named_parameters()}


def compare_grads(ours: dict, theirs: dict, tol: dict) -> None:
    assert set(ours) == set(theirs)
    for name in theirs:
        assert theirs[name] is not None, name
        torch.testing.assert_close(ours[name], theirs[name], msg=lambda m: f"gradient of {name}: {m}", **tol)


def layer_config(**changes) -> DeepSeekMoEConfig:
    base = dict(
        vocab_size=32, hidden_size=24, intermediate_size=40, moe_intermediate_size=12,
        num_hidden_layers=1, num_attention_heads=4, n_shared_experts=2, n_routed_experts=7,
        num_experts_per_tok=3, aux_loss_alpha=0.01,
    )
    base.update(changes)
    return DeepSeekMoEConfig(**base)


LAYER_CASES = [
    dict(),
    dict(seq_aux=False),
    dict(norm_topk_prob=True),
    dict(n_shared_experts=None, num_experts_per_tok=1),
    dict(n_routed_experts=4, num_experts_per_tok=4, aux_loss_alpha=0.1),  # k = E
]


@pytest.mark.parametrize("impl", ["dsmoe", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(LAYER_CASES)))
def test_moe_layer_matches_seeds(impl, dtype, case):
    config = layer_config(**LAYER_CASES[case])
    ref = seeds.DeepseekMoE(config).to(dtype)
    ours = DeepSeekMoELayer(config, impl=impl).to(dtype)
    hf = to_hf_state_dict(ours)
    ref.load_state_dict(hf, strict=True)
    x = torch.randn(3, 5, config.hidden_size, dtype=dtype)

    # training: output, balance loss, gradients of input and every parameter
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref.train()(x_ref)
    y_ours, aux, load = ours.train()(x_ours)
    torch.testing.assert_close(y_ours, y_ref, **TOL[dtype])
    torch.testing.assert_close(aux, ref.last_aux_loss.to(dtype), **AUX_TOL)
    assert load.dtype == torch.int32 and int(load.sum()) == x.shape[0] * x.shape[1] * config.num_experts_per_tok
    grad_out = torch.randn_like(y_ref)
    # the seeds add the aux loss gradient inside backward; here it is a term of the loss
    (y_ref * grad_out).sum().backward()
    ((y_ours * grad_out).sum() + aux).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL[dtype])
    compare_grads(hf_grads(ours), seeds_grads(ref), TOL[dtype])

    # inference: the seeds' moe_infer path, no balance loss
    with torch.no_grad():
        y_ref = ref.eval()(x)
        y_ours, aux, load = ours.eval()(x)
    assert aux is None
    torch.testing.assert_close(y_ours, y_ref, **TOL[dtype])


def model_config(**changes) -> DeepSeekMoEConfig:
    return get_preset("tiny", num_hidden_layers=3, **changes)


MODEL_CASES = [
    dict(),  # dense first layer, GQA, seq_aux
    dict(seq_aux=False, norm_topk_prob=True, attention_bias=True),
    dict(first_k_dense_replace=0, moe_layer_freq=2, tie_word_embeddings=True, pad_token_id=0),
    dict(n_routed_experts=None, num_experts_per_tok=None),  # dense model
    dict(rope_scaling={"type": "linear", "factor": 2.0}, num_key_value_heads=4),
]


@pytest.mark.parametrize("impl", ["dsmoe", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(MODEL_CASES)))
def test_causal_lm_matches_seeds(impl, dtype, case):
    config = model_config(**MODEL_CASES[case])
    ours = DeepSeekMoEForCausalLM(config, moe_impl=impl).to(dtype)
    ref = seeds.DeepseekForCausalLM(config).to(dtype)
    load_into_seeds(ref, ours)
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    labels = input_ids.clone()
    labels[0, :3] = -100

    out = ours.train()(input_ids, labels=labels)
    ref_out = ref.train()(input_ids, labels=labels)
    ref_aux = ref.aux_losses()
    torch.testing.assert_close(out["logits"], ref_out["logits"], **MODEL_TOL[dtype])
    if config.n_routed_experts is None:
        assert out.aux_loss is None and ref_aux == []
        lm = out.loss
    else:
        expected_aux = sum(ref_aux)
        torch.testing.assert_close(out.aux_loss, expected_aux.to(out.aux_loss.dtype), **AUX_TOL)
        lm = out.loss - out.aux_loss
    torch.testing.assert_close(lm.float(), ref_out["loss"], **MODEL_TOL[dtype])
    out.loss.backward()
    ref_out["loss"].backward()
    compare_grads(hf_grads(ours), seeds_grads(ref), MODEL_TOL[dtype])

    with torch.no_grad():
        out = ours.eval()(input_ids)
        ref_out = ref.eval()(input_ids)
    assert out.aux_loss is None and out.loss is None
    torch.testing.assert_close(out["logits"], ref_out["logits"], **MODEL_TOL[dtype])


def test_padded_batch_matches_seeds_on_real_tokens():
    """Right padding with a mask: the real tokens' logits equal the seeds' (padding rows may
    differ: dsmoe lets a padding query see itself instead of nothing)."""
    config = model_config()
    ours = DeepSeekMoEForCausalLM(config).double().eval()
    ref = seeds.DeepseekForCausalLM(config).double().eval()
    load_into_seeds(ref, ours)
    input_ids = torch.randint(0, config.vocab_size, (2, 7))
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        logits = ours(input_ids, attention_mask=mask)["logits"]
        ref_logits = ref(input_ids, attention_mask=mask)["logits"]
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], ref_logits[keep], **MODEL_TOL[torch.float64])


def test_cached_forward_matches_seeds_cache():
    """Prefill then one token at a time with a dynamic cache equals the seeds' tuple cache."""
    config = model_config()
    ours = DeepSeekMoEForCausalLM(config).double().eval()
    ref = seeds.DeepseekForCausalLM(config).double().eval()
    load_into_seeds(ref, ours)
    ids = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad():
        out = ours(ids[:, :5], use_cache=True)
        ref_out = ref(ids[:, :5], use_cache=True)
        cache, ref_cache = out.past_key_values, ref_out["past_key_values"]
        for t in range(5, 8):
            out = ours(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            ref_out = ref(ids[:, t : t + 1], past_key_values=ref_cache, use_cache=True)
            ref_cache = ref_out["past_key_values"]
            torch.testing.assert_close(out["logits"], ref_out["logits"], **MODEL_TOL[torch.float64])
        assert cache.get_seq_length() == 8
        full = ref(ids)["logits"]
    torch.testing.assert_close(out["logits"][:, -1], full[:, -1], **MODEL_TOL[torch.float64])


def _pattern_batch(n: int, length: int, seed: int) -> torch.Tensor:
    """Sequences that follow token[t+1] = (5 token[t] + 3) mod 64: learnable, so a trained model
    is confident and its top-1 tokens are far from ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, 64, (n,), generator=g)
    for t in range(1, length):
        x[:, t] = (x[:, t - 1] * 5 + 3) % 64
    return x


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny model (dense first layer, GQA, shared + routed experts) trained for a few steps in
    fp32 (the reference path: plain PyTorch), its fp64 seeds-transcription logits and the seeds'
    bf16 logits on a batch half on the pattern, half random."""
    torch.manual_seed(0)
    config = model_config()
    model = DeepSeekMoEForCausalLM(config, moe_impl="reference").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        ids = _pattern_batch(16, 32, step)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = _pattern_batch(4, 64, 1000)
    ids[:, 32:] = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = seeds.DeepseekForCausalLM(config)
    load_into_seeds(ref, model)
    with torch.no_grad():
        ref64 = ref.double().eval()(ids)["logits"].double()
        ref16 = ref.to(torch.bfloat16)(ids)["logits"].double()
    return model.eval(), ids, ref64, ref16


def assert_bf16_matches(logits: torch.Tensor, ref64: torch.Tensor, ref16: torch.Tensor) -> None:
    """bf16 logits against the seeds' transcription: the relative error to its fp64 logits at
    most twice the seeds' own bf16 error (bf16 noise), and the top-1 token of the seeds' bf16
    run at >= 99% of the positions."""
    def rel(a):
        return float((a.double() - ref64).norm() / ref64.norm())

    noise = rel(ref16)
    assert 0 < noise < 0.05, noise  # the scale of bf16 rounding through this model
    assert rel(logits) <= 2 * noise, f"relative error {rel(logits):.4f} > 2 x bf16 noise {noise:.4f}"
    agree = float((logits.argmax(-1) == ref16.argmax(-1)).double().mean())
    assert agree >= 0.99, f"top-1 tokens agree on {agree:.1%} of positions"


@pytest.mark.parametrize("impl", ["dsmoe", "reference"])
def test_bf16_matches_seeds(trained_tiny, impl):
    model, ids, ref64, ref16 = trained_tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.set_moe_impl(impl)
    with torch.no_grad():
        assert_bf16_matches(bf16(ids)["logits"], ref64, ref16)


def test_bf16_comparison_catches_a_zeroed_moe(trained_tiny, monkeypatch):
    """The mutation the bf16 check must see: every MoE layer's output replaced by zeros."""
    model, ids, ref64, ref16 = trained_tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.set_moe_impl("dsmoe")
    forward = DeepSeekMoELayer.forward

    def zeroed(self, hidden_states):
        out = forward(self, hidden_states)
        return out._replace(hidden_states=torch.zeros_like(out.hidden_states))

    monkeypatch.setattr(DeepSeekMoELayer, "forward", zeroed)
    with torch.no_grad():
        logits = bf16(ids)["logits"]
    with pytest.raises(AssertionError, match="relative error"):
        assert_bf16_matches(logits, ref64, ref16)


@pytest.mark.parametrize("broken", ["routed_experts_zero", "shared_experts_zero", "uniform_weights", "next_expert"])
def test_bf16_comparisons_catch_a_broken_moe(trained_tiny, monkeypatch, broken):
    """Subtler breakages than a zeroed layer, each must fail both bf16 checks (against the seeds
    and the impls' agreement bound of test_impls_agree_in_bf16): only the routed experts' sum
    zeroed (shared experts kept), only the shared experts zeroed, the routing weights replaced
    by 1/k, every token sent to the next expert id."""
    from dsmoe.layers import RoutedExperts, TopKRouter

    model, ids, ref64, ref16 = trained_tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.set_moe_impl("dsmoe")
    if broken == "routed_experts_zero":
        experts = RoutedExperts.forward
        monkeypatch.setattr(RoutedExperts, "forward", lambda self, x, *a, **kw: torch.zeros_like(experts(self, x, *a, **kw)))
    elif broken == "shared_experts_zero":
        for layer in bf16.moe_layers():
            assert layer.shared_experts is not None
            layer.shared_experts.down_proj.weight.data.zero_()
    else:
        router = TopKRouter.forward

        def wrong_route(self, *a, **kw):
            out = router(self, *a, **kw)
            if broken == "uniform_weights":
                return out._replace(weights=torch.full_like(out.weights, 1.0 / out.weights.shape[1]))
            return out._replace(expert_ids=(out.expert_ids + 1) % self.num_experts)

        monkeypatch.setattr(TopKRouter, "forward", wrong_route)
    with torch.no_grad():
        logits = bf16(ids)["logits"]
    with pytest.raises(AssertionError):
        assert_bf16_matches(logits, ref64, ref16)
    err = float((logits.double() - ref64).norm() / ref64.norm())
    assert err >= 0.03, f"{broken}: relative error {err:.4f} is inside test_impls_agree_in_bf16's bound"


def test_impls_agree_in_bf16(trained_tiny):
    # training mode (the seeds' training loop on the reference impl); both in bf16 noise of fp64
    model, ids, _, _ = trained_tiny
    model64 = copy.deepcopy(model).double().train()
    model64.set_moe_impl("reference")
    ref = model64(ids, labels=ids)
    for impl in ("dsmoe", "reference"):
        bf16 = copy.deepcopy(model).to(torch.bfloat16).train()
        bf16.set_moe_impl(impl)
        out = bf16(ids, labels=ids)
        assert bf16.moe_impl == impl
        err = float((out["logits"].detach().double() - ref["logits"].detach()).norm() / ref["logits"].detach().norm())
        assert err < 0.03, f"{impl}: relative error {err:.4f}"
        torch.testing.assert_close(out.aux_loss.double(), ref.aux_loss, rtol=3e-2, atol=1e-4)
        torch.testing.assert_close(out.loss.double(), ref.loss, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("variant", ["plain", "hooked", "batched"])
def test_mlp_add_to_equals_sum(variant, monkeypatch):
    """MLP(x, add_to=y) is y + MLP(x), forward and backward: through addmm for a plain down_proj
    and 2-d x, through the plain sum when down_proj has a hook or x is 3-d."""
    from dsmoe.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(24, 40).double()
    shape = (2, 5, 24) if variant == "batched" else (7, 24)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    calls, addmm = [], torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: calls.append("addmm") or addmm(*a, **kw))
    if variant == "hooked":
        mlp.down_proj.register_forward_hook(lambda *args: calls.append("hook"))
    out = mlp(x, add_to=y)
    expected = y + mlp(x)
    assert calls == {"plain": ["addmm"], "hooked": ["hook", "hook"], "batched": []}[variant]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, y, *mlp.parameters()], grad)
    want = torch.autograd.grad(expected, [x, y, *mlp.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_mlp_on_own_cpu_gemm_matches_plain(dtype, with_add, batched, monkeypatch):
    """From dense_own_gemm_min_rows rows a CPU MLP runs as one-group grouped GEMMs + swiglu
    (forced here, so that it runs on CPUs whose grouped GEMM is oneDNN's too): same output and
    gradients as the plain nn.Linear forward, up to rounding."""
    import dsmoe.layers as layers
    from dsmoe.backend import BACKENDS, backend_settings

    backend = BACKENDS["dsmoe"]
    torch.manual_seed(0)
    mlp = layers.MLP(48, 40).to(dtype)
    min_rows = backend_settings().dense_own_gemm_min_rows
    rows = min_rows + 3
    shape = (2, rows // 2 + 1, 48) if batched else (rows, 48)  # [B, L, h] as the dense layers get
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    y = torch.randn(*shape, dtype=dtype, requires_grad=True) if with_add else None
    grad = torch.randn(*shape, dtype=dtype)
    inputs = [x, *([y] if with_add else []), *mlp.parameters()]

    def run():
        out = mlp(x, add_to=y)
        return out, torch.autograd.grad(out, inputs, grad)

    monkeypatch.setattr(backend, "own_cpu_gemm", lambda dt: True)
    few_rows = torch.randn(min_rows - 1, 48, dtype=dtype)
    assert backend._on_own_cpu_gemm(mlp, x) and not backend._on_own_cpu_gemm(mlp, few_rows)
    own, own_grads = run()
    monkeypatch.setattr(backend, "own_cpu_gemm", lambda dt: False)
    assert not backend._on_own_cpu_gemm(mlp, x)
    plain, plain_grads = run()
    monkeypatch.setattr(backend, "own_cpu_gemm", lambda dt: True)
    # the reference path: the nn.Linear modules, and the seeds' sum (no addmm) with add_to
    seeds_sum = plain if y is None else y + mlp(x, dsmoe_kernels=False)
    torch.testing.assert_close(mlp(x, add_to=y, dsmoe_kernels=False), seeds_sum, rtol=0, atol=0)
    for got, want in zip((own, *own_grads), (plain, *plain_grads)):
        if dtype == torch.bfloat16:  # two bf16 roundings apart: compare as a whole
            assert (got.float() - want.float()).norm() <= 1e-2 * want.float().norm()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mlp_own_cpu_gemm_follows_the_chosen_kernel():
    """The own-GEMM path is taken exactly where dsmoe.cpu_kernels() reports its AVX512 kernel."""
    import dsmoe
    from dsmoe.backend import BACKENDS
    from dsmoe.layers import MLP

    backend = BACKENDS["dsmoe"]
    rows = dsmoe.backend_settings().dense_own_gemm_min_rows
    kernels = dsmoe.cpu_kernels()
    for dtype, key in ((torch.bfloat16, "bf16_gemm"), (torch.float32, "fp32_gemm")):
        mlp = MLP(16, 8).to(dtype)
        x = torch.randn(rows, 16, dtype=dtype)
        assert backend._on_own_cpu_gemm(mlp, x) == (kernels[key] in ("avx512", "fp32"))
    # bf16 converted to fp32 (CPUs without bf16 arithmetic) pays from BF16_IN_FP32_MIN_ROWS rows
    mlp = MLP(16, 8).bfloat16()
    with dsmoe.use_backend(cpu_bf16_gemm="fp32"):
        few = dsmoe.backend.BF16_IN_FP32_MIN_ROWS
        assert backend._on_own_cpu_gemm(mlp, torch.randn(few, 16).bfloat16())
        assert not backend._on_own_cpu_gemm(mlp, torch.randn(few - 1, 16).bfloat16())
    with dsmoe.use_backend(cpu_bf16_gemm="onednn"):
        assert not backend._on_own_cpu_gemm(mlp, torch.randn(rows, 16).bfloat16())
    mlp = MLP(16, 8).half()
    assert not backend._on_own_cpu_gemm(mlp, torch.randn(rows, 16).half())


def test_device_balance_loss_in_model():
    """alpha_2 > 0 with D devices adds the paper's device-level loss to every MoE layer."""
    from dsmoe.losses import device_balance_loss, expert_balance_loss

    config = model_config(device_aux_loss_alpha=0.05, num_expert_devices=4, seq_aux=False)
    model = DeepSeekMoEForCausalLM(config).double().train()
    layer = model.moe_layers()[0]
    captured = {}

    def grab(module, args, output):
        captured["route"] = output

    layer.gate.register_forward_hook(grab)
    x = torch.randn(2, 6, config.hidden_size, dtype=torch.float64)
    _, aux, _ = layer(x)
    route = captured["route"]
    expected = expert_balance_loss(route.tokens_per_expert, route.score_sums, config.num_experts_per_tok, 12, 0.01)
    expected = expected + device_balance_loss(
        route.tokens_per_expert, route.score_sums, config.num_experts_per_tok, 12, 4, 0.05
    )
    torch.testing.assert_close(aux, expected)


def test_noisy_router_trains_and_is_deterministic_in_eval():
    config = model_config(router_type="noisy_topk")
    model = DeepSeekMoEForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    model.eval()
    with torch.no_grad():
        a, b = model(ids)["logits"], model(ids)["logits"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    out1 = model(ids, labels=ids)
    out1.loss.backward()
    noise = model.moe_layers()[0].gate.noise_weight
    assert noise.grad is not None and noise.grad.abs().sum() > 0  # the noise scale is learned
    with torch.no_grad():
        out2 = model(ids, labels=ids)
    assert not torch.equal(out1["logits"], out2["logits"])  # noise changes routing in training


def test_selection_bias_update_rebalances():
    config = model_config(use_selection_bias=True)
    model = DeepSeekMoEForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        out = model(ids)
        model.update_selection_bias(out.tokens_per_expert, rate=10.0)
        bias = model.moe_layers()[0].gate.e_score_correction_bias
        load = out.tokens_per_expert[0].float()
        assert torch.equal(bias, 10.0 * torch.sign(load.mean() - load))
        steered = model(ids).tokens_per_expert[0]
    # the most loaded experts lost their tokens to the least loaded ones
    assert not torch.equal(steered, out.tokens_per_expert[0])
    with pytest.raises(ValueError, match="use_selection_bias"):
        DeepSeekMoEForCausalLM(model_config()).update_selection_bias(out.tokens_per_expert)


def test_readme_quick_start_api():
    """The seeds' README Quick Start, with the same names (the sizes scaled to this machine)."""
    from dsmoe import DeepSeekMoEConfig, DeepSeekMoEModel

    config = DeepSeekMoEConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_shared_experts=2,
        num_routed_experts=8,
        num_experts_per_token=3,
    )
    assert (config.n_shared_experts, config.n_routed_experts, config.num_experts_per_tok) == (2, 8, 3)
    model = DeepSeekMoEModel(config)
    batch_size, seq_len = 2, 5
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    outputs = model(input_ids)
    logits = outputs["logits"]
    assert logits.shape == (batch_size, seq_len, config.vocab_size)
    generated = model.generate(input_ids, max_new_tokens=10)
    assert generated.shape == (batch_size, seq_len + 10) and torch.equal(generated[:, :seq_len], input_ids)


def test_readme_module_names_importable():
    import dsmoe

    for name in ("TopKRouter", "NoisyTopKRouter", "LoadBalanceLoss", "DeviceBalanceLoss", "DeepSeekMoELayer",
                 "DeepSeekMoEBlock", "DeepSeekMoEModel", "DeepSeekMoEConfig", "deepseek_moe_2b",
                 "Expert", "SharedExpert", "ExpertGroup",
                 "deepseek_moe_16b", "deepseek_moe_145b"):
        assert hasattr(dsmoe, name), name


def test_forward_argument_errors():
    model = DeepSeekMoEForCausalLM(get_preset("tiny"))
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(3, 5))
    with pytest.raises(TypeError, match="KVCache"):
        model(ids, past_key_values=((torch.zeros(1), torch.zeros(1)),))
    with pytest.raises(ValueError, match="impl"):
        DeepSeekMoEForCausalLM(get_preset("tiny"), moe_impl="fast")
    with pytest.raises(TypeError, match="DeepSeekMoEConfig"):
        DeepSeekMoEForCausalLM({"hidden_size": 8})


def test_autocast_bf16_runs_experts_in_bf16():
    model = DeepSeekMoEForCausalLM(model_config())
    ids = torch.randint(0, 64, (2, 16))
    ref = model(ids, labels=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    grad = model.moe_layers()[0].experts.w_gate_up.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_inputs_embeds_and_logits_to_keep():
    model = DeepSeekMoEForCausalLM(model_config()).eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        a = model(ids)["logits"]
        b = model(inputs_embeds=model.model.embed_tokens(ids))["logits"]
        last = model(ids, logits_to_keep=2)["logits"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert last.shape == (2, 2, 64)
    torch.testing.assert_close(last, a[:, -2:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_dynamic_rope_scaling():
    """Dynamic NTK scaling: unchanged up to max_position_embeddings, then the base grows as
    base * (factor * L / max - (factor - 1)) ** (d / (d - 2)) for sequence length L."""
    from dsmoe.layers import RotaryEmbedding

    config = model_config(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0})
    plain = RotaryEmbedding(model_config(max_position_embeddings=16))
    rope = RotaryEmbedding(config)
    short = torch.arange(16)[None]
    torch.testing.assert_close(rope(short, torch.float64), plain(short, torch.float64))
    long = torch.arange(24)[None]
    d = config.head_dim
    base = 10000.0 * (2.0 * 24 / 16 - 1.0) ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = long[0, :, None].double() * inv_freq
    cos, sin = rope(long, torch.float64)
    torch.testing.assert_close(cos[0], torch.cat([freqs, freqs], -1).cos())
    torch.testing.assert_close(sin[0], torch.cat([freqs, freqs], -1).sin())


def test_autocast_bf16_training_both_impls():
    # under autocast the experts run in bf16 while the residual stream stays fp32
    cfg = get_preset("tiny")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = {}
    for impl in ("reference", "dsmoe"):
        torch.manual_seed(0)
        model = DeepSeekMoEForCausalLM(cfg, moe_impl=impl).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        losses[impl] = out.loss.item()
    assert abs(losses["reference"] - losses["dsmoe"]) < 2e-2


def test_autocast_bf16_eval_both_impls(trained_tiny):
    # eval (no grad) takes the seeds' moe_infer path on the reference impl; under autocast its
    # bf16 expert outputs go into the fp32 residual stream's cache (was a scatter dtype error).
    # Against the fp64 seeds on a trained model, where a zeroed MoE moves the logits by ~25%.
    model, ids, ref64, ref16 = trained_tiny
    for impl in ("reference", "dsmoe"):
        fp32 = copy.deepcopy(model)
        fp32.set_moe_impl(impl)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = fp32(ids).logits.double()
        assert torch.isfinite(logits).all()
        assert_bf16_matches(logits, ref64, ref16)
