"""The model-level references (the seeds' MoEGate, DeepseekMoE training loop and moe_infer)
against each other and against the dsmoe op chain that replaces them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsmoe import ops, reference
from conftest import assert_close, routing


def _dsmoe_gate(hidden, gate_weight, k, norm_topk_prob, alpha, seq_aux):
    B, L, h = hidden.shape
    logits = F.linear(hidden.reshape(-1, h), gate_weight)
    w, ids, counts, sums = ops.gate(logits, k, normalize=norm_topk_prob and k > 1, num_seqs=B if seq_aux else 1)
    return ids, w, reference.expert_balance_loss(counts, sums, k, alpha, seq_aux)


# (B, L, h, E, k)
GATE_SHAPES = [(2, 8, 16, 8, 2), (3, 5, 12, 6, 1), (1, 7, 8, 4, 4), (4, 16, 24, 64, 6)]


@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: "B{}L{}h{}E{}k{}".format(*s))
@pytest.mark.parametrize("seq_aux", [True, False])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_seed_gate_equals_dsmoe_gate(device, shape, seq_aux, norm_topk_prob):
    B, L, h, E, k = shape
    alpha = 0.001
    hidden = torch.randn(B, L, h, device=device)
    weight = torch.randn(E, h, device=device, requires_grad=True)
    weight2 = weight.detach().clone().requires_grad_()
    idx, w, aux = reference.moe_gate(hidden, weight, k, norm_topk_prob, alpha, seq_aux, training=True)
    ids, dw, daux = _dsmoe_gate(hidden, weight2, k, norm_topk_prob, alpha, seq_aux)
    cidx, cw = reference.canonical_topk(idx, w)
    assert torch.equal(cidx.to(torch.int32).cpu(), ids.cpu())
    assert_close(dw, cw, torch.float32)
    assert_close(daux, aux, torch.float32)
    g = torch.randn(B * L, k, device=device)
    # The seeds' weights are in sorted=False order; pair g with each slot's expert id.
    (torch.zeros(B * L, E, device=device).scatter(1, idx, w) * _scatter(g, ids, E)).sum().add(aux * 50).backward()
    ((dw * g).sum() + daux * 50).backward()
    assert_close(weight2.grad, weight.grad, torch.float32, scale=max(1.0, float(weight.grad.abs().max())))


def _scatter(g, ids, E):
    return torch.zeros(g.shape[0], E, device=g.device).scatter(1, ids.long(), g)


def test_seed_gate_eval_has_no_aux_loss():
    hidden, weight = torch.randn(2, 4, 8), torch.randn(6, 8)
    assert reference.moe_gate(hidden, weight, 2, True, 0.001, True, training=False)[2] is None
    assert reference.moe_gate(hidden, weight, 2, True, 0.0, True, training=True)[2] is None


def test_balance_loss_token_level_ignores_sequence_split():
    logits = torch.randn(24, 10)
    one = ops.gate(logits, 3, num_seqs=1)
    four = ops.gate(logits, 3, num_seqs=4)
    a = reference.expert_balance_loss(one.tokens_per_expert, one.score_sums, 3, 0.01, seq_aux=False)
    b = reference.expert_balance_loss(four.tokens_per_expert, four.score_sums, 3, 0.01, seq_aux=False)
    assert_close(a, b, torch.float32)


def test_balance_loss_formulas_by_hand():
    # Two sequences of L=2 tokens, E=3, k=1.
    counts = torch.tensor([[2, 0, 0], [1, 1, 0]], dtype=torch.int32)
    sums = torch.tensor([[1.2, 0.5, 0.3], [0.8, 0.9, 0.3]])
    L, k, E, alpha = 2, 1, 3, 0.5
    seq = alpha * sum(
        sum((counts[s, e].item() / (L * k / E)) * (sums[s, e].item() / L) for e in range(E)) for s in range(2)
    ) / 2
    T = 4
    tok = alpha * sum((sums[:, e].sum().item() / T) * (counts[:, e].sum().item() / (T * k) * E) for e in range(E))
    assert reference.expert_balance_loss(counts, sums, k, alpha, True).item() == pytest.approx(seq, rel=1e-6)
    assert reference.expert_balance_loss(counts, sums, k, alpha, False).item() == pytest.approx(tok, rel=1e-6)


def _experts(E, h, inter, device, dtype=torch.float32):
    w_gate_up = torch.randn(E, 2 * inter, h, device=device, dtype=dtype) / h**0.5
    w_down = torch.randn(E, h, inter, device=device, dtype=dtype) / inter**0.5
    return w_gate_up, w_down


def _ops_moe(x, ids, w, w_gate_up, w_down):
    x_perm, row_map, off = ops.permute(x, ids, w_gate_up.shape[0])
    hmid = ops.swiglu(ops.grouped_gemm(x_perm, w_gate_up, off, trans_b=True))
    return ops.unpermute(ops.grouped_gemm(hmid, w_down, off, trans_b=True), row_map, w)


# (T, h, I, E, k, routing mode)
MOE_SHAPES = [
    (1, 8, 4, 1, 1, "uniform"),
    (16, 12, 6, 4, 4, "uniform"),
    (40, 16, 8, 16, 3, "sparse"),
    (33, 20, 10, 8, 2, "skewed"),
]


@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "T{}h{}I{}E{}k{}-{}".format(*s))
def test_seed_moe_paths_equal_ops(device, shape):
    T, h, inter, E, k, mode = shape
    x = torch.randn(T, h, device=device, requires_grad=True)
    ids = routing(T, k, E, device, mode)
    w = torch.rand(T, k, device=device, requires_grad=True)
    w_gate_up, w_down = (t.requires_grad_() for t in _experts(E, h, inter, device))
    leaves = (x, w, w_gate_up, w_down)
    y_train = reference.moe_forward_train(x, ids, w, w_gate_up, w_down)
    y_infer = reference.moe_infer(x, ids, w, w_gate_up, w_down)
    y_ops = _ops_moe(x, ids, w, w_gate_up, w_down)
    assert_close(y_infer, y_train.detach(), torch.float32)
    assert_close(y_ops, y_train, torch.float32)
    g = torch.randn(T, h, device=device)
    g_train = torch.autograd.grad(y_train, leaves, g)
    g_ops = torch.autograd.grad(y_ops, leaves, g)
    for a, b in zip(g_ops, g_train):
        assert_close(a, b, torch.float32, scale=2.0)


def test_seed_moe_paths_keep_shape_and_dtype():
    B, L, h, inter, E, k = 2, 5, 8, 4, 6, 2
    x = torch.randn(B, L, h, dtype=torch.bfloat16)
    ids = routing(B * L, k, E)
    w = torch.rand(B * L, k)  # fp32 weights with bf16 activations: outputs stay bf16
    w_gate_up, w_down = _experts(E, h, inter, "cpu", torch.bfloat16)
    y_train = reference.moe_forward_train(x, ids, w, w_gate_up, w_down)
    y_infer = reference.moe_infer(x, ids, w, w_gate_up, w_down)
    assert y_train.shape == y_infer.shape == x.shape
    assert y_train.dtype == y_infer.dtype == torch.bfloat16
    assert_close(y_infer, y_train, torch.bfloat16, scale=2.0)


def test_add_auxiliary_loss_trains_the_gate():
    B, L, h, inter, E, k = 2, 6, 8, 4, 5, 2
    hidden = torch.randn(B, L, h)
    gate_w = torch.randn(E, h, requires_grad=True)
    w_gate_up, w_down = _experts(E, h, inter, "cpu")
    idx, w, aux = reference.moe_gate(hidden, gate_w, k, True, 0.1, True, training=True)
    y = reference.moe_forward_train(hidden, idx, w, w_gate_up, w_down, aux_loss=aux)
    (g_attached,) = torch.autograd.grad(y.sum(), gate_w)
    idx, w, aux = reference.moe_gate(hidden, gate_w, k, True, 0.1, True, training=True)
    y = reference.moe_forward_train(hidden, idx, w, w_gate_up, w_down)
    (g_added,) = torch.autograd.grad(y.sum() + aux, gate_w)
    assert_close(g_attached, g_added, torch.float32)


def test_canonical_topk_orders_like_dsmoe():
    idx = torch.tensor([[4, 1, 7], [2, 0, 3]])
    w = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.3, 0.4]])
    cidx, cw = reference.canonical_topk(idx, w)
    assert cidx.tolist() == [[1, 7, 4], [3, 0, 2]]
    assert torch.equal(cw, torch.tensor([[0.5, 0.2, 0.1], [0.4, 0.3, 0.3]]))


# ---------------------------------------------------------------- the references themselves (mutation pass)


def test_references_return_the_ops_index_dtypes():
    logits = torch.randn(5, 6)
    w, ids, counts, sums = reference.gate(logits, 2)
    assert ids.dtype == torch.int32 and counts.dtype == torch.int32
    x_perm, row_map, offsets = reference.permute(torch.randn(5, 4), ids, 6)
    assert row_map.dtype == torch.int32 and offsets.dtype == torch.int32


@pytest.mark.parametrize("trans_b", [False, True])
def test_reference_grouped_gemm_without_experts(trans_b):
    # E = 0: no groups, an empty [0, N] result in a's dtype
    a = torch.zeros(0, 4, dtype=torch.bfloat16)
    b = torch.zeros(0, 7, 4) if trans_b else torch.zeros(0, 4, 7)
    c = reference.grouped_gemm(a, b, torch.zeros(1, dtype=torch.int32), trans_b=trans_b)
    assert c.shape == (0, 7) and c.dtype == torch.bfloat16


def _within_half_ulp(result: torch.Tensor, exact: torch.Tensor) -> bool:
    # rounded once from an exact value: at most half a unit in the last place of the bf16 result
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return bool(((result.double() - exact).abs() <= 0.5 * ulp * (1 + 1e-3) + 1e-30).all())


def test_reference_unpermute_and_swiglu_accumulate_in_fp32_and_round_once():
    torch.manual_seed(0)
    T, k, h = 64, 6, 48
    ids = torch.stack([torch.randperm(8)[:k] for _ in range(T)])
    weights = torch.rand(T, k).to(torch.bfloat16)
    y_perm = torch.randn(T * k, h).to(torch.bfloat16)
    _, row_map, _ = reference.permute(torch.zeros(T, 1), ids, 8)
    exact = (y_perm.double()[row_map.long()].view(T, k, h) * weights.double().unsqueeze(-1)).sum(1)
    assert _within_half_ulp(reference.unpermute(y_perm, row_map, weights), exact)
    gate_up = (3 * torch.randn(256, 64)).to(torch.bfloat16)
    g, u = gate_up.double().chunk(2, dim=-1)
    assert _within_half_ulp(reference.swiglu(gate_up), F.silu(g) * u)


def test_reference_expert_mlp_splits_gate_up_by_rows():
    torch.manual_seed(0)
    I, h = 3, 5  # 2I != h: the split must be along the 2I rows
    x, w_gate_up, w_down = torch.randn(4, h, dtype=torch.float64), torch.randn(2 * I, h, dtype=torch.float64), torch.randn(h, I, dtype=torch.float64)
    expected = (F.silu(x @ w_gate_up[:I].T) * (x @ w_gate_up[I:].T)) @ w_down.T
    torch.testing.assert_close(reference.expert_mlp(x, w_gate_up, w_down), expected)


def test_add_auxiliary_loss_with_a_loss_that_needs_no_gradient():
    x = torch.randn(3, requires_grad=True)
    for loss in (torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64, requires_grad=True)):
        out = reference.AddAuxiliaryLoss.apply(x, loss)
        assert torch.equal(out, x)
        out.sum().backward()
        assert torch.equal(x.grad, torch.ones(3))
        x.grad = None
        if loss.requires_grad:
            assert loss.grad.dtype == torch.float64 and float(loss.grad) == 1.0


def test_reference_grouped_gemms_default_to_b_not_transposed():
    torch.manual_seed(0)
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    a, b, grad_c = torch.randn(5, 3), torch.randn(2, 3, 4), torch.randn(5, 4)
    expected = torch.cat([a[:2] @ b[0], a[2:] @ b[1]])
    torch.testing.assert_close(reference.grouped_gemm(a, b, offsets), expected)
    wgrad = reference.grouped_gemm_wgrad(a, grad_c, offsets)
    torch.testing.assert_close(wgrad, torch.stack([a[:2].T @ grad_c[:2], a[2:].T @ grad_c[2:]]))


def test_seed_gate_token_level_loss_when_the_last_expert_is_never_chosen():
    # Eq. 12-14 with an expert nobody picks: its f_i is 0, and the vectors keep all E entries
    torch.manual_seed(0)
    B, L, h, E, k, alpha = 2, 5, 8, 4, 2, 0.01
    hidden = torch.rand(B, L, h, dtype=torch.float64) + 0.1
    gate_weight = torch.randn(E, h, dtype=torch.float64)
    gate_weight[-1] = -10.0  # logits of about -40: never in the top 2
    ids, _, aux = reference.moe_gate(hidden, gate_weight, k, False, alpha, seq_aux=False, training=True)
    assert int(ids.max()) < E - 1
    scores = (hidden.view(-1, h) @ gate_weight.T).softmax(-1)
    f = torch.bincount(ids.view(-1), minlength=E).double() * E / (B * L * k)
    torch.testing.assert_close(aux, alpha * (f * scores.mean(0)).sum())
