"""dsmoe.analysis: the accounting against hand counts, the seed statistics on constructed numbers,
and the specialisation measures on hand-built tiny models whose answer is known."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsmoe import analysis
from dsmoe.config import DeepSeekMoEConfig
from dsmoe.model import DeepSeekMoEForCausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = dict(vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=None)


# ------------------------------------------------------------------------------ accounting


def test_model_size_matches_hand_counts():
    # h 8, 2 layers, vocab 10; MoE: 1 shared + 4 routed experts of 6, top-2
    cfg = DeepSeekMoEConfig(**BASE, intermediate_size=24, moe_intermediate_size=6, n_routed_experts=4,
                            n_shared_experts=1, num_experts_per_tok=2)
    z = analysis.model_size(cfg, seq_len=16)
    attn = 4 * 8 * 8            # q, k, v, o: 8 x 8 each
    norms = 2 * 8               # two RMSNorm weights per layer
    expert = 3 * 8 * 6          # gate, up, down of one expert: 144
    router = 4 * 8
    embed = head = 10 * 8
    assert z["expert_total"] == 2 * (1 + 4) * expert == 1440
    assert z["expert_activated"] == 2 * (1 + 2) * expert == 864
    assert z["router"] == 2 * router
    assert z["total"] == 2 * (attn + norms + router + 5 * expert) + embed + head + 8 == 2216
    assert z["activated"] == 2 * (attn + norms + router + 3 * expert) + embed + head + 8 == 1640
    # forward FLOPs: 2 x (activated matrices: no lookup table, no norms) + attention 4 L n_ctx d_attn
    assert z["flops_per_token"] == 2 * (2 * (attn + router + 3 * expert) + head) + 4 * 2 * 16 * 8
    # the real model has exactly the counted total
    assert sum(p.numel() for p in DeepSeekMoEForCausalLM(cfg).parameters()) == z["total"]
    with pytest.raises(ValueError, match="seq_len"):
        analysis.model_size(cfg, seq_len=0)


def test_compare_variants_are_iso_flops_and_iso_parameters():
    from dsmoe.cli.models import compare_configs

    sizes = {n: analysis.model_size(DeepSeekMoEConfig(**c), seq_len=128) for n, c in compare_configs().items()}
    h, L, ffn = 128, 4, 256
    # iso-FLOPs: every variant activates 2 standard FFNs of expert parameters per token and layer
    assert {z["expert_activated"] for z in sizes.values()} == {L * 2 * 3 * h * ffn}
    # iso-parameters: both MoEs hold 16 standard FFNs of expert parameters (the paper's 2B layout)
    assert sizes["gshard"]["expert_total"] == sizes["deepseekmoe"]["expert_total"] == L * 16 * 3 * h * ffn
    # the FLOPs differ only by the routers: 16 vs 63 logits of h per layer
    assert sizes["gshard"]["flops_per_token"] - sizes["dense"]["flops_per_token"] == 2 * L * 16 * h
    assert sizes["deepseekmoe"]["flops_per_token"] - sizes["dense"]["flops_per_token"] == 2 * L * 63 * h


# ------------------------------------------------------------------------------ seeds


def test_seed_summary_and_t_table():
    s = analysis.seed_summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3 and (s["min"], s["max"]) == (1.0, 3.0)
    assert analysis.seed_summary([4.0])["std"] == 0.0
    assert analysis.t_critical(2) == 4.303 and analysis.t_critical(100) == 1.96
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            analysis.seed_summary(bad)


def test_compare_seeds_verdicts_on_constructed_numbers():
    # a constant shift under seed noise: the paired gap has no spread -> separated
    a = [2.00, 2.10, 1.90]
    g = analysis.compare_seeds(a, [x + 0.05 for x in a])
    assert g["gap"] == pytest.approx(-0.05) and g["gap_std"] == pytest.approx(0.0, abs=1e-12)
    assert g["seed_spread"] == pytest.approx(0.1) and g["verdict"] == "separated"
    # per-seed gaps -0.5, +1.0, 0.0: mean 1/6, std sqrt(7/12), 95% half-width 4.303 * std / sqrt(3)
    g = analysis.compare_seeds([1.0, 2.0, 3.0], [1.5, 1.0, 3.0])
    assert g["gap"] == pytest.approx(1 / 6) and g["gap_std"] == pytest.approx(math.sqrt(7 / 12))
    assert g["ci95"] == pytest.approx(4.303 * math.sqrt(7 / 12) / math.sqrt(3))
    assert g["verdict"] == "within noise"
    # a gap just outside / inside its interval
    base = [0.0, 0.0, 0.0]
    half = 4.303 * 0.1 / math.sqrt(3)  # gaps x-0.1, x, x+0.1 have std 0.1
    assert analysis.compare_seeds([half * 1.01 - 0.1, half * 1.01, half * 1.01 + 0.1], base)["verdict"] == "separated"
    assert analysis.compare_seeds([half * 0.99 - 0.1, half * 0.99, half * 0.99 + 0.1], base)["verdict"] == "within noise"
    # one seed: no interval, never "separated"
    one = analysis.compare_seeds([1.0], [2.0])
    assert one["ci95"] is None and one["verdict"] == "within noise" and one["gap"] == -1.0
    with pytest.raises(ValueError, match="one value per seed"):
        analysis.compare_seeds([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------ specialisation


def _one_layer_moe(num_experts=4, top_k=1, norm=False, seed=0) -> DeepSeekMoEForCausalLM:
    """One MoE layer, no shared expert, a router of zeros: every token scores 1/E for every
    expert, so ties pick the lowest ids (expert 0, then 1, ...)."""
    torch.manual_seed(seed)
    cfg = DeepSeekMoEConfig(**{**BASE, "num_hidden_layers": 1}, intermediate_size=12, moe_intermediate_size=6,
                            n_routed_experts=num_experts, n_shared_experts=None, num_experts_per_tok=top_k,
                            norm_topk_prob=norm, aux_loss_alpha=0.0)
    model = DeepSeekMoEForCausalLM(cfg).eval()
    with torch.no_grad():
        layer = model.moe_layers()[0]
        layer.gate.weight.zero_()
        layer.experts.w_gate_up.mul_(30)  # outputs of order 1, not 1e-5
        layer.experts.w_down.mul_(30)
    return model


def _expert(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert e of ``layer`` in plain PyTorch: down(silu(gate x) * up x)."""
    w_gu, w_d = layer.experts.w_gate_up[e], layer.experts.w_down[e]
    inter = w_d.shape[1]
    return (F.silu(x @ w_gu[:inter].T) * (x @ w_gu[inter:].T)) @ w_d.T


def _batches(n=2, b=2, seq=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 10, (b, seq), generator=g), torch.randint(0, 10, (b, seq), generator=g)) for _ in range(n)]


def test_evaluate_counts_the_expert_that_carries_every_token():
    model = _one_layer_moe()
    batches = _batches()
    loss, loads = analysis.evaluate(model, batches)
    assert [t.tolist() for t in loads] == [[32, 0, 0, 0]]  # all 2 x 2 x 8 tokens on expert 0 (ties)
    expected = sum(F.cross_entropy(model(x).logits.reshape(-1, 10), y.reshape(-1)).item() for x, y in batches) / 2
    assert loss == pytest.approx(expected, rel=1e-6)
    with analysis.disable_top_experts(model, 1):
        _, loads = analysis.evaluate(model, batches)
    assert [t.tolist() for t in loads] == [[0, 32, 0, 0]]  # the busy expert is off: its tokens go to the next
    with analysis.disable_top_experts(model, 3):
        _, loads = analysis.evaluate(model, batches)
    assert [t.tolist() for t in loads] == [[0, 0, 0, 32]]
    _, loads = analysis.evaluate(model, batches)
    assert [t.tolist() for t in loads] == [[32, 0, 0, 0]]  # restored


@pytest.mark.parametrize("renormalize", [False, True])
def test_disabled_expert_output_is_the_next_expert_with_the_papers_gate(renormalize):
    model = _one_layer_moe(num_experts=4, top_k=1)
    layer = model.moe_layers()[0]
    x = torch.randn(5, 8)
    assert torch.allclose(layer(x[None])[0], 0.25 * _expert(layer, 0, x)[None], rtol=1e-4, atol=1e-5)  # tie: expert 0
    with analysis.disable_top_experts(model, 1, renormalize=renormalize):
        y = layer(x[None])[0]
    # expert 1 takes over; its gate is its probability in the softmax over all 4 (1/4), or over the 3 left (1/3)
    gate = 1 / 3 if renormalize else 1 / 4
    assert torch.allclose(y, gate * _expert(layer, 1, x)[None], rtol=1e-4, atol=1e-5)


def test_redundant_experts_lose_nothing_distinct_ones_do():
    batches = _batches()
    # all experts identical: disabling the top one changes nothing (full redundancy)
    same = _one_layer_moe()
    with torch.no_grad():
        for p in (same.moe_layers()[0].experts.w_gate_up, same.moe_layers()[0].experts.w_down):
            p[:] = p[0]
    rows = analysis.top_expert_ablation(same, batches, ratios=(0, 0.25, 0.5))
    assert [(r["ratio"], r["disabled"]) for r in rows] == [(0, 0), (0.25, 1), (0.5, 2)]
    assert all(r["increase"] == pytest.approx(0.0, abs=1e-6) for r in rows)
    # expert 0 distinct: disabling it changes the loss; the rows are the loss of the masked model
    distinct = _one_layer_moe(seed=3)
    rows = analysis.top_expert_ablation(distinct, batches, ratios=(0, 0.25))
    with analysis.disable_top_experts(distinct, 1):
        masked, _ = analysis.evaluate(distinct, batches)
    assert rows[1]["loss"] == pytest.approx(masked) and abs(rows[1]["increase"]) > 1e-4
    assert rows[0]["increase"] == 0.0


def test_limit_activated_experts():
    model = _one_layer_moe(num_experts=4, top_k=3, norm=True)
    gate = model.moe_layers()[0].gate
    batches = _batches()
    _, loads = analysis.evaluate(model, batches)
    assert loads[0].tolist() == [32, 32, 32, 0]
    rows = analysis.activated_expert_sweep(model, batches, [1, 3])
    with analysis.limit_activated_experts(model, 1):
        loss1, loads = analysis.evaluate(model, batches)
        assert loads[0].tolist() == [32, 0, 0, 0] and gate.normalize is False
    assert rows[0] == {"top_k": 1, "loss": pytest.approx(loss1)}
    assert gate.top_k == 3 and gate.normalize is True  # restored
    assert rows[1]["loss"] == pytest.approx(analysis.evaluate(model, batches)[0])


def test_bad_arguments_name_themselves():
    model = _one_layer_moe(num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="cannot disable 3 of 4"):
        with analysis.disable_top_experts(model, 3):
            pass
    with pytest.raises(ValueError, match="num_disabled"):
        with analysis.disable_top_experts(model, -1):
            pass
    with pytest.raises(ValueError, match="top_k 5 exceeds"):
        with analysis.limit_activated_experts(model, 5):
            pass
    with pytest.raises(ValueError, match="ratio"):
        analysis.disabled_counts(4, 2, [1.0])
    assert analysis.disabled_counts(16, 2, [0, 1 / 16, 4 / 16]) == [(0, 0), (1 / 16, 1), (4 / 16, 4)]
    assert analysis.disabled_counts(63, 7, [1 / 16, 2 / 16]) == [(1 / 16, 4), (2 / 16, 8)]
    dense = DeepSeekMoEForCausalLM(DeepSeekMoEConfig(**BASE, intermediate_size=12))
    with pytest.raises(ValueError, match="no MoE layers"):
        analysis.top_expert_ablation(dense, _batches())


# ------------------------------------------------------------------------------ mutation-pass tests


def _msg(fn) -> str:
    with pytest.raises(ValueError) as e:
        fn()
    return str(e.value)


def test_model_size_of_a_dense_layer_two_shared_experts_a_noisy_router_and_a_tied_head():
    # h 8, vocab 10; layer 0 dense (intermediate 24), layer 1 MoE: 2 shared + 4 routed experts of 6,
    # top-2, a noisy router (a gate and a noise matrix), the head tied to the embedding
    cfg = DeepSeekMoEConfig(**BASE, intermediate_size=24, moe_intermediate_size=6, n_routed_experts=4,
                            n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                            router_type="noisy_topk", tie_word_embeddings=True)
    z = analysis.model_size(cfg, seq_len=1)
    dense, expert, attn = 3 * 8 * 24, 3 * 8 * 6, 4 * 8 * 8
    assert z["expert_total"] == dense + (2 + 4) * expert == 1440
    assert z["expert_activated"] == dense + (2 + 2) * expert == 1152
    assert z["router"] == 2 * 4 * 8
    assert sum(p.numel() for p in DeepSeekMoEForCausalLM(cfg).parameters()) == z["total"]
    # the tied head still multiplies: 2 x (attention + routers + activated experts + head) + attention scores
    assert z["flops_per_token"] == 2 * (2 * attn + 64 + 1152 + 10 * 8) + 4 * 2 * 1 * 8
    # a dense layer after a MoE layer (every other layer MoE) adds to the MoE layer's count
    cfg = DeepSeekMoEConfig(**BASE, intermediate_size=24, moe_intermediate_size=6, n_routed_experts=4,
                            n_shared_experts=None, num_experts_per_tok=2, moe_layer_freq=2)
    z = analysis.model_size(cfg)
    assert (z["expert_total"], z["expert_activated"]) == (4 * expert + dense, 2 * expert + dense)
    assert "flops_per_token" not in z


def test_t_table_edges_and_messages():
    assert analysis.t_critical(1) == 12.706 and analysis.t_critical(30) == 2.042 and analysis.t_critical(31) == 1.96
    assert _msg(lambda: analysis.t_critical(0)) == "t_critical: dof must be >= 1, got 0"
    assert _msg(lambda: analysis.seed_summary([])) == "seed_summary: needs at least one value"
    assert _msg(lambda: analysis.seed_summary([1.0, float("nan")])) == "seed_summary: values must be finite, got [1.0, nan]"
    assert _msg(lambda: analysis.compare_seeds([], [1.0])) == "compare_seeds (a): needs at least one value"
    assert _msg(lambda: analysis.compare_seeds([1.0], [float("inf")])) == "compare_seeds (b): values must be finite, got [inf]"


def test_seed_statistics_in_full():
    s = analysis.seed_summary([1.0, 4.0])
    assert s == {"mean": 2.5, "std": pytest.approx(3 / math.sqrt(2)), "min": 1.0, "max": 4.0, "n": 2, "values": [1.0, 4.0]}
    one = analysis.compare_seeds([1.0], [2.0])
    assert one == {"gap": -1.0, "gap_std": 0.0, "stderr": None, "ci95": None, "seed_spread": 0.0, "n": 1,
                   "verdict": "within noise", "per_seed": [-1.0]}
    # two seeds: gaps 1 and 3 -> mean 2, std sqrt(2), stderr 1, t(1) = 12.706
    two = analysis.compare_seeds([1.0, 5.0], [0.0, 2.0])
    assert two == {"gap": 2.0, "gap_std": pytest.approx(math.sqrt(2)), "stderr": pytest.approx(1.0),
                   "ci95": pytest.approx(12.706), "seed_spread": pytest.approx(math.sqrt((8 + 2) / 2)), "n": 2,
                   "verdict": "within noise", "per_seed": [1.0, 3.0]}
    # identical models: a zero gap with no spread is never "separated"
    assert analysis.compare_seeds([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["verdict"] == "within noise"


def test_evaluate_one_batch_int64_loads_and_messages():
    model = _one_layer_moe()
    model.train()
    loss, loads = analysis.evaluate(model, _batches(n=1))
    assert loads[0].dtype == torch.int64 and loads[0].tolist() == [16, 0, 0, 0] and math.isfinite(loss)
    assert model.training  # its mode is restored
    assert _msg(lambda: analysis.evaluate(model, [])) == "evaluate: batches is empty"
    dense = DeepSeekMoEForCausalLM(DeepSeekMoEConfig(**BASE, intermediate_size=12))
    assert _msg(lambda: analysis.limit_activated_experts(dense, 1).__enter__()) == "the model has no MoE layers"


def test_disabling_takes_the_highest_probability_experts_and_keeps_the_gate_values():
    """With distinct logits, the disabled experts are each token's highest; the chosen ones keep
    their probability from the softmax over all experts (the paper's g_i), per sequence stats."""
    model = _one_layer_moe(num_experts=6, top_k=2)
    gate = model.moe_layers()[0].gate
    with torch.no_grad():
        gate.weight.normal_(0, 1.0)
    x = torch.randn(8, 8)
    logits = x @ gate.weight.T
    probs = logits.softmax(-1)
    order = logits.argsort(-1, descending=True)
    assert _msg(lambda: analysis.disable_top_experts(model, 5).__enter__()) == (
        "disable_top_experts: cannot disable 5 of 6 routed experts with top-2 routing (at most 4)")
    for bad in (True, -1, 1.0):
        assert "num_disabled must be an integer >= 0" in _msg(lambda: analysis.disable_top_experts(model, bad).__enter__())
    with analysis.disable_top_experts(model, 0):
        assert gate.forward.__func__ is type(gate).forward  # nothing patched
    with analysis.disable_top_experts(model, 2):
        route = gate(x, num_seqs=2)
    chosen = route.expert_ids.long()
    assert torch.equal(chosen.sort(-1).values, order[:, 2:4].sort(-1).values)
    torch.testing.assert_close(route.weights, probs.gather(-1, chosen), rtol=1e-5, atol=1e-6)
    assert route.tokens_per_expert.shape == (2, 6)


def test_limit_activated_experts_edges():
    model = _one_layer_moe(num_experts=4, top_k=3, norm=True)
    gate = model.moe_layers()[0].gate
    for bad in (0, True):
        assert _msg(lambda: analysis.limit_activated_experts(model, bad).__enter__()) == (
            f"limit_activated_experts: top_k must be an integer >= 1, got {bad!r}")
    with analysis.limit_activated_experts(model, 2):
        assert gate.top_k == 2 and gate.normalize is True  # renormalising two weights still means something
    with analysis.limit_activated_experts(model, 4):  # every routed expert
        assert gate.top_k == 4
    assert analysis.disabled_counts(4, 2, [0.5, 0.75]) == [(0.5, 2)]  # 2 left is enough, 1 is not


def test_top_expert_ablation_passes_renormalize():
    model = _one_layer_moe(num_experts=4, top_k=1)
    batches = _batches()
    plain = analysis.top_expert_ablation(model, batches, ratios=(0.25,))
    renorm = analysis.top_expert_ablation(model, batches, ratios=(0.25,), renormalize=True)
    with analysis.disable_top_experts(model, 1, renormalize=True):
        want, _ = analysis.evaluate(model, batches)
    assert renorm[0]["loss"] == pytest.approx(want) and renorm[0]["loss"] != pytest.approx(plain[0]["loss"])
