"""dsmoe as the experts backend of transformers' MoE models (dsmoe.hf), on tiny models built from
transformers' own config classes (no downloads): every family with SiLU-GLU experts against
transformers' "eager" experts on the same weights and inputs, bf16 against an fp64 oracle,
torch.compile, PEFT LoRA, and the refusals of families dsmoe's math does not fit."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import dsmoe.hf  # noqa: E402  (registers "dsmoe")
from dsmoe.hf import dsmoe_experts_forward  # noqa: E402

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    initializer_range=0.08,
)
# 8 experts, top-2, SiLU-GLU; families with a dense first layer get a third layer (2 MoE layers)
_DEEPSEEK_ATTN = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
FAMILIES = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96, head_dim=16, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, eos_token_id=None, pad_token_id=0),
    "deepseek_v2": dict(
        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", **_DEEPSEEK_ATTN,
    ),
    "deepseek_v3": dict(
        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, n_group=4, topk_group=2, **_DEEPSEEK_ATTN,
    ),
    "glm4_moe": dict(
        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16,
    ),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
}
GPT_OSS = dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16, layer_types=["full_attention"] * 2)


def config_of(family: str, **overrides):
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES.get(family, {}), **overrides})


def build(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_of(family, **overrides))
    return model.float()


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "is_concatenated") and hasattr(m, "gate_up_proj")]


class OpLog(TorchDispatchMode):
    """Names of the ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def run(model, impl, ids, labels=True):
    """(logits, {name: grad}) of one forward + backward with experts implementation ``impl``."""
    model.set_experts_implementation(impl)
    assert model.config._experts_implementation == impl
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same draws for routers that sample in training (PhiMoE's sparsemixer)
    with OpLog() as log:
        out = model(ids, labels=ids if labels else None)
    assert ("dsmoe.permute" in log.names) == (impl == "dsmoe"), log.names  # it ran what was set
    if not labels:
        return out.logits.detach(), {}
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_grads_match(grads, expected, tol=1e-5):
    assert grads.keys() == expected.keys()
    for name, g in expected.items():
        err = (grads[name] - g).norm().item()
        ref = g.norm().item()
        assert err <= tol * ref or err == 0.0, f"{name}: |d - eager| = {err:.3g}, |eager| = {ref:.3g}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_eager(family):
    model = build(family).train()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    logits_e, grads_e = run(model, "eager", ids)
    logits_d, grads_d = run(model, "dsmoe", ids)
    assert (logits_d - logits_e).abs().max().item() <= 1e-5
    assert any("gate_up_proj" in n for n in grads_e)  # the experts' weights got gradients
    assert_grads_match(grads_d, grads_e)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_greedy_generate(family):
    model = build(family, seed=2).eval()
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    tokens = {}
    for impl in ("eager", "dsmoe"):
        model.set_experts_implementation(impl)
        tokens[impl] = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert tokens["dsmoe"].shape == (2, 13)
    assert torch.equal(tokens["dsmoe"], tokens["eager"])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_router_ties_and_empty_experts(family):
    """A router with tied scores (two identical expert rows, the rest equal): the model's own
    router breaks the ties, both implementations follow it; most experts get no token."""
    model = build(family, seed=4).train()
    routers = [p for n, p in model.named_parameters() if n.endswith((".gate.weight", ".router.weight")) and p.shape[0] == 8]
    assert len(routers) == 2
    with torch.no_grad():
        for p in routers:
            p.zero_()
            p[3] = p[5] = torch.linspace(-1, 1, p.shape[1])  # experts 3 and 5 tie on every token
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    logits_e, grads_e = run(model, "eager", ids)
    logits_d, grads_d = run(model, "dsmoe", ids)
    assert (logits_d - logits_e).abs().max().item() <= 1e-5
    assert_grads_match(grads_d, grads_e)


def _oracle(module, x, ids, weights):
    """The experts' output in fp64 from the module's weights, one token and expert at a time."""
    w_gu, w_d = module.gate_up_proj.detach().double(), module.down_proj.detach().double()
    if module.is_transposed:
        w_gu, w_d = w_gu.transpose(1, 2), w_d.transpose(1, 2)
    x, weights = x.double(), weights.double()
    out = torch.zeros_like(x)
    inter = w_gu.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= w_gu.shape[0]:
                continue
            gu = w_gu[e] @ x[t]
            out[t] += weights[t, j] * (w_d[e] @ (F.silu(gu[:inter]) * gu[inter:]))
    return out


def _routing(T, k, E, mode, dtype, gen):
    scores = torch.randn(T, E, generator=gen)
    if mode == "sparse":  # experts 2..E-1 get no token
        scores[:, 2:] -= 100.0
    ids = scores.topk(k, dim=1).indices  # int64, as transformers' routers give
    weights = torch.softmax(torch.randn(T, k, generator=gen), dim=1)
    if mode == "ties":
        weights = torch.full((T, k), 1.0 / k)
    return ids, weights.to(dtype)


@pytest.mark.parametrize("mode", ["uniform", "ties", "sparse"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_block_error_against_fp64(family, mode):
    """Per MoE layer, routing held equal: dsmoe's bf16 error against an fp64 oracle is at most
    1.2x that of transformers' eager experts (bf16 weights, inputs and routing weights)."""
    model = build(family, seed=6).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    for module in experts_modules(model):
        T, E, k = 64, module.gate_up_proj.shape[0], 2
        x = torch.randn(T, model.config.hidden_size, generator=gen).to(torch.bfloat16)
        ids, weights = _routing(T, k, E, mode, torch.bfloat16, gen)
        oracle = _oracle(module, x, ids, weights)
        with torch.no_grad():
            eager = type(module).forward.__wrapped__(module, x, ids, weights)  # transformers' eager loop
            ours = dsmoe_experts_forward(module, x, ids, weights)
        assert ours.dtype == torch.bfloat16
        err_e = (eager.double() - oracle).norm().item()
        err_d = (ours.double() - oracle).norm().item()
        assert err_d <= 1.2 * err_e, f"dsmoe {err_d:.3g} vs eager {err_e:.3g}"


def test_expert_parallel_sentinels():
    """Ids >= E (transformers' expert parallelism: rows another rank owns) add zero and get zero
    routing-weight gradient, as transformers' grouped_mm path masks them."""
    model = build("qwen3_moe", seed=8)
    module = experts_modules(model)[0]
    module._is_expert_parallel = True
    gen = torch.Generator().manual_seed(9)
    T, E, k = 24, 8, 2
    x = torch.randn(T, 64, generator=gen, requires_grad=True)
    ids, weights = _routing(T, k, E, "uniform", torch.float32, gen)
    ids[::3, 1] = E  # sentinels
    ids[::5, 0] = E
    weights.requires_grad_()
    y = dsmoe_experts_forward(module, x, ids, weights)
    torch.testing.assert_close(y.double(), _oracle(module, x.detach(), ids, weights.detach()), rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    assert torch.equal(weights.grad[ids >= E], torch.zeros(int((ids >= E).sum())))
    assert torch.isfinite(x.grad).all() and torch.isfinite(module.gate_up_proj.grad).all()


def test_transposed_layout():
    """is_transposed experts (gate_up_proj [E, h, 2I], down_proj [E, I, h]) run the GEMMs on the
    stored layout and give the same output and gradients as the [E, 2I, h] layout."""
    model = build("qwen3_moe", seed=10)
    plain = experts_modules(model)[0]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(32, 64, generator=gen)
    ids, weights = _routing(32, 2, 8, "uniform", torch.float32, gen)
    y_plain = dsmoe_experts_forward(plain, x, ids, weights)
    y_plain.square().sum().backward()
    trans = experts_modules(build("qwen3_moe", seed=10))[0]
    with torch.no_grad():
        trans.gate_up_proj = torch.nn.Parameter(plain.gate_up_proj.detach().transpose(1, 2).contiguous())
        trans.down_proj = torch.nn.Parameter(plain.down_proj.detach().transpose(1, 2).contiguous())
    trans.is_transposed = True
    y_trans = dsmoe_experts_forward(trans, x, ids, weights)
    torch.testing.assert_close(y_trans, y_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_trans.double(), _oracle(trans, x, ids, weights), rtol=1e-5, atol=1e-6)
    y_trans.square().sum().backward()
    torch.testing.assert_close(trans.gate_up_proj.grad.transpose(1, 2), plain.gate_up_proj.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trans.down_proj.grad.transpose(1, 2), plain.down_proj.grad, rtol=1e-5, atol=1e-6)


def test_no_weight_copy():
    """The GEMMs read the module's own parameters: gradients land on them, nothing else is held."""
    model = build("mixtral", seed=12)
    module = experts_modules(model)[0]
    seen = []

    class Ptrs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) == "dsmoe.grouped_gemm":
                seen.append(args[1].data_ptr())
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(13)
    ids, weights = _routing(16, 2, 8, "uniform", torch.float32, gen)
    with Ptrs():
        dsmoe_experts_forward(module, torch.randn(16, 64, generator=gen), ids, weights)
    assert seen == [module.gate_up_proj.data_ptr(), module.down_proj.data_ptr()]


def test_compile_fullgraph_training_step():
    """A Qwen3-MoE training step under torch.compile(fullgraph=True) with dsmoe experts: the same
    loss and gradients as without the compiler."""
    model = build("qwen3_moe", seed=14, num_hidden_layers=1).train()
    model.set_experts_implementation("dsmoe")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(15))

    def step(m):
        out = m(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach()

    loss_ref = step(model)
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss = step(compiled)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_grads_match(grads, grads_ref, tol=1e-4)
    torch._dynamo.reset()


def _train(model, ids, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        with OpLog() as log:
            loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, log.names


def test_peft_lora_trains_and_skips_frozen_expert_gradients():
    peft = pytest.importorskip("peft")
    model = build("qwen3_moe", seed=16)
    model.set_experts_implementation("dsmoe")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(17))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    losses, backward_ops = _train(lora, ids, steps=15, lr=2e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    # gradients flow through the experts to the first layer's adapters, but the frozen experts'
    # weight gradients are never computed
    assert "dsmoe.grouped_gemm" in backward_ops and "dsmoe.permute_backward" in backward_ops
    assert "dsmoe.grouped_gemm_wgrad" not in backward_ops
    assert all(m.gate_up_proj.grad is None and m.down_proj.grad is None for m in experts_modules(model))
    # control: full fine-tuning does compute them
    full = build("qwen3_moe", seed=16)
    full.set_experts_implementation("dsmoe")
    _, backward_ops = _train(full, ids, steps=1, lr=1e-3)
    assert "dsmoe.grouped_gemm_wgrad" in backward_ops


def test_from_pretrained_with_dsmoe(tmp_path):
    model = build("olmoe", seed=18)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="dsmoe")
    assert loaded.config._experts_implementation == "dsmoe"
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(19))
    with OpLog() as log:
        got = loaded(ids).logits
    assert "dsmoe.permute" in log.names
    model.set_experts_implementation("eager")
    assert (got - model(ids).logits).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- refusals


def test_gpt_oss_refused_at_set_time(tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt_oss", **{**COMMON, **GPT_OSS})
    model = AutoModelForCausalLM.from_config(config)
    before = model.config._experts_implementation
    msg = r"does not support GPT-OSS \(model_type 'gpt_oss', GptOssExperts\).*expert biases.*interleaved gate/up.*clamped SwiGLU"
    with pytest.raises(ValueError, match=msg):
        model.set_experts_implementation("dsmoe")
    assert model.config._experts_implementation == before  # left as it was
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=msg):
        AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="dsmoe")
    config._experts_implementation = "dsmoe"
    with pytest.raises(ValueError, match=msg):
        AutoModelForCausalLM.from_config(config)


def test_non_silu_activation_refused():
    model = build("qwen3_moe", hidden_act="gelu")
    with pytest.raises(ValueError, match=r"qwen3_moe.*the activation GELUActivation"):
        model.set_experts_implementation("dsmoe")


def test_non_gated_and_other_layouts_refused():
    model = build("mixtral")
    module = experts_modules(model)[0]
    module.has_gate = False
    with pytest.raises(ValueError, match=r"mixtral \(model_type 'mixtral', MixtralExperts\).*non-gated experts"):
        model.set_experts_implementation("dsmoe")
    module.has_gate, module.has_post_expert_norm = True, True
    with pytest.raises(ValueError, match="a norm after each expert"):
        model.set_experts_implementation("dsmoe")
    module.has_post_expert_norm, module.num_experts = False, 7
    with pytest.raises(ValueError, match=r"num_experts=7 equal to the experts in gate_up_proj \(8\)"):
        model.set_experts_implementation("dsmoe")
    module.num_experts = 8
    model.set_experts_implementation("dsmoe")  # every feature back: accepted
    module.has_bias = True
    with pytest.raises(ValueError, match="expert biases"):  # also refused at call time
        model(torch.zeros(1, 3, dtype=torch.long))


_USE_ANOTHER = '. Use another experts_implementation (e.g. "grouped_mm") for this model.'


def _refusal(module):
    with pytest.raises(ValueError) as e:
        dsmoe.hf.check_experts_module(module)
    return str(e.value)


def test_refusal_names_every_missing_feature_in_full():
    """One module with every feature dsmoe does not compute: the message names the family and
    each feature, in order, in full."""
    module = experts_modules(build("mixtral"))[0]
    module.has_bias, module.has_gate, module.is_concatenated, module.has_post_expert_norm = True, False, False, True
    module.__class__ = type("ClampedExperts", (type(module),), {"_apply_gate": lambda self, gate_up: gate_up})
    assert _refusal(module) == (
        'experts_implementation="dsmoe" does not support mixtral (model_type \'mixtral\', ClampedExperts): it needs '
        "expert biases (has_bias=True; dsmoe's grouped_gemm has no bias input); "
        "non-gated experts (has_gate=False; dsmoe computes SwiGLU experts); "
        "interleaved gate/up columns (is_concatenated=False; dsmoe's swiglu takes [gate | up]); "
        "a norm after each expert (has_post_expert_norm=True); "
        "a custom gate activation (ClampedExperts._apply_gate, e.g. GPT-OSS's clamped SwiGLU with alpha and up + 1; "
        "dsmoe computes silu(gate) * up)" + _USE_ANOTHER
    )


def test_refusal_of_weights_and_activation_in_full():
    """A module without a config (an unknown family), activation or stacked weights; then
    weights of a dtype the GEMMs do not take, and an expert count the weights disagree with."""
    module = experts_modules(build("qwen3_moe"))[0]
    del module.config, module.act_fn, module.gate_up_proj
    module.down_proj = torch.nn.Parameter(torch.zeros(8, 64))  # 2-D
    assert _refusal(module) == (
        'experts_implementation="dsmoe" does not support unknown (model_type \'unknown\', Qwen3MoeExperts): it needs '
        "the activation NoneType (dsmoe computes silu(gate) * up); "
        "gate_up_proj as a stacked [num_experts, ., .] tensor (got NoneType); "
        "down_proj as a stacked [num_experts, ., .] tensor (got Parameter)" + _USE_ANOTHER
    )
    module = experts_modules(build("qwen3_moe"))[0]
    module.gate_up_proj = torch.nn.Parameter(torch.zeros(8, 64, 64, dtype=torch.int8), requires_grad=False)
    module.num_experts = 6
    assert _refusal(module) == (
        'experts_implementation="dsmoe" does not support qwen3_moe (model_type \'qwen3_moe\', Qwen3MoeExperts): it '
        "needs gate_up_proj of dtype torch.int8 (dsmoe's GEMMs take fp32/bf16/fp16/fp64 weights); "
        "num_experts=6 equal to the experts in gate_up_proj (8)" + _USE_ANOTHER
    )


def test_a_flag_transformers_does_not_set_takes_its_default():
    """An experts module missing the layout flags (a transformers version that does not set one)
    is read with use_experts_implementation's defaults: concatenated, gated, no bias, no post
    norm; without num_experts nothing is compared."""
    module = experts_modules(build("mixtral"))[0]
    for flag in ("has_bias", "has_gate", "is_concatenated", "has_post_expert_norm", "num_experts"):
        delattr(module, flag)
        assert dsmoe.hf.experts.unsupported_features(module) == [], flag


def test_check_model_looks_only_at_registry_experts_modules():
    """Modules that merely share one of the experts modules' attribute names are not experts
    modules: check_model skips them (they would all be refused: no weights)."""
    model = build("qwen3_moe")

    class GateOnly(torch.nn.Module):
        _apply_gate = staticmethod(lambda x: x)

    class ConcatenatedOnly(torch.nn.Module):
        is_concatenated = True

    class NoGate(torch.nn.Module):
        is_concatenated, _is_expert_parallel = True, False

    model.extra = torch.nn.ModuleList([GateOnly(), ConcatenatedOnly(), NoGate()])
    dsmoe.hf.experts.check_model(model)
    experts_modules(model)[0].has_bias = True  # the real experts modules are still checked
    with pytest.raises(ValueError, match="expert biases"):
        dsmoe.hf.experts.check_model(model)


def test_hidden_states_in_another_dtype_run_in_the_weights_dtype():
    """As transformers' grouped_mm: without autocast, bf16 hidden states into fp32 experts run
    the GEMMs in fp32, and the output comes back in bf16."""
    module = experts_modules(build("qwen3_moe", seed=14))[0]
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(16, 64, generator=gen).to(torch.bfloat16)
    ids, weights = _routing(16, 2, 8, "uniform", torch.float32, gen)
    with torch.no_grad():
        y = dsmoe_experts_forward(module, x, ids, weights)
    assert y.dtype == torch.bfloat16
    want = _oracle(module, x, ids, weights)  # fp64 from the same bf16 inputs
    torch.testing.assert_close(y, want.to(torch.bfloat16), rtol=1.6e-2, atol=1e-3)


def test_import_dsmoe_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import dsmoe, dsmoe.layers, dsmoe.model\n"
        "try:\n"
        "    import dsmoe.hf\n"
        "except ImportError as e:\n"
        "    assert 'pip install' in str(e) and 'dsmoe[hf]' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('dsmoe.hf imported without transformers')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
