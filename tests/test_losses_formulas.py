"""dsmoe.losses against the paper's formulas written out by hand (Eqs. 12-17 of DeepSeekMoE),
never against dsmoe.losses itself. Written for the mutation pass (docs/mutation_testing.md):
each test here kills mutants the rest of the suite let through.

    L_ExpBal = alpha_1 sum_i f_i P_i,   f_i = N'/(K'T) sum_t 1(token t chose i),  P_i = 1/T sum_t s_{i,t}
    L_DevBal = alpha_2 sum_d f'_d P'_d, f'_d = 1/|E_d| sum_{j in E_d} f_j,       P'_d = sum_{j in E_d} P_j
"""
import math

import pytest
import torch

from dsmoe.layers import DeepSeekMoELayer
from dsmoe.losses import DeviceBalanceLoss, LoadBalanceLoss, device_balance_loss, expert_balance_loss, lm_loss


def _paper_expert_loss(counts, sums, k, L, alpha):
    """Eq. 12-14 per sequence with plain Python floats, averaged over sequences."""
    S, E = len(counts), len(counts[0])
    per_seq = []
    for s in range(S):
        f = [E / (k * L) * counts[s][e] for e in range(E)]
        P = [sums[s][e] / L for e in range(E)]
        per_seq.append(sum(fi * pi for fi, pi in zip(f, P)))
    return alpha * sum(per_seq) / S


def _paper_device_loss(counts, sums, k, L, D, alpha):
    """Eq. 15-17: f'_d is the MEAN of f over the device's experts, P'_d the SUM of P."""
    S, E = len(counts), len(counts[0])
    g = E // D
    per_seq = []
    for s in range(S):
        f = [E / (k * L) * counts[s][e] for e in range(E)]
        P = [sums[s][e] / L for e in range(E)]
        total = 0.0
        for d in range(D):
            group = range(d * g, (d + 1) * g)
            f_dev = sum(f[j] for j in group) / g
            P_dev = sum(P[j] for j in group)
            total += f_dev * P_dev
        per_seq.append(total)
    return alpha * sum(per_seq) / S


# Two sequences of L=3 tokens, E=4 experts, k=2 (each row of counts sums to L*k = 6, each row of
# score sums to L = 3: every token's softmax sums to 1).
COUNTS = [[3, 1, 2, 0], [0, 2, 2, 2]]
SUMS = [[1.2, 0.4, 0.9, 0.5], [0.3, 0.8, 0.7, 1.2]]


def _tensors(dtype=torch.float64):
    return torch.tensor(COUNTS, dtype=torch.int32), torch.tensor(SUMS, dtype=dtype)


def test_expert_balance_loss_hand_computed():
    counts, sums = _tensors()
    # by hand, sequence 0: f = 4/6 * [3,1,2,0] = [2, 2/3, 4/3, 0], P = [.4, 2/15, .3, 1/6]
    #   sum f P = .8 + 4/45 + .4 = 1.28889; sequence 1: f = [0, 4/3, 4/3, 4/3], P = [.1, 4/15, 7/30, .4]
    #   sum f P = 4/3 * (8/30 + 7/30 + 12/30) = 1.2; mean = 1.244444, times alpha 0.1
    by_hand = 0.1 * ((0.8 + 4 / 45 + 0.4) + 1.2) / 2
    assert _paper_expert_loss(COUNTS, SUMS, 2, 3, 0.1) == pytest.approx(by_hand, rel=1e-12)
    got = expert_balance_loss(counts, sums, k=2, seq_len=3, alpha=0.1)
    assert got.item() == pytest.approx(by_hand, rel=1e-12)
    assert got.dtype == torch.float64 and got.dim() == 0


@pytest.mark.parametrize("D", [1, 2, 4])
def test_device_balance_loss_is_the_papers_eq16(D):
    counts, sums = _tensors()
    want = _paper_device_loss(COUNTS, SUMS, 2, 3, D, 0.05)
    got = device_balance_loss(counts, sums, k=2, seq_len=3, num_devices=D, alpha=0.05)
    assert got.item() == pytest.approx(want, rel=1e-12)
    module = DeviceBalanceLoss(num_experts=4, k=2, num_devices=D, alpha=0.05)
    assert module(counts, sums, 3).item() == pytest.approx(want, rel=1e-12)


def test_device_balance_loss_hand_computed_two_devices():
    counts, sums = _tensors()
    # sequence 0: f = [2, 2/3, 4/3, 0] -> f' = [4/3, 2/3]; P = [.4, 2/15, .3, 1/6] -> P' = [8/15, 7/15]
    #   -> 32/45 + 14/45 = 46/45; sequence 1: f' = [2/3, 4/3], P' = [11/30, 19/30] -> 22/90 + 76/90 = 98/90
    by_hand = 0.05 * (46 / 45 + 98 / 90) / 2
    got = device_balance_loss(counts, sums, k=2, seq_len=3, num_devices=2, alpha=0.05)
    assert got.item() == pytest.approx(by_hand, rel=1e-12)


def test_balance_losses_equal_alpha_at_uniform_load():
    """Uniform load (f_i = 1, f'_d = 1) and scores summing to 1 per token: both losses are exactly
    alpha whatever the number of devices (a sum instead of the mean in f'_d gives alpha * E/D)."""
    E, k, L = 8, 2, 4
    counts = torch.full((1, E), L * k // E, dtype=torch.int32)
    sums = torch.rand(1, E, dtype=torch.float64)
    sums = sums / sums.sum() * L
    assert expert_balance_loss(counts, sums, k, L, 0.3).item() == pytest.approx(0.3, rel=1e-12)
    for D in (1, 2, 4, 8):
        assert device_balance_loss(counts, sums, k, L, D, 0.3).item() == pytest.approx(0.3, rel=1e-12)


def test_expert_balance_loss_is_minimal_at_uniform_load():
    """With uniform scores (P_i = 1/E), every assignment of the L*k token copies gives the same
    loss alpha; with scores that follow the load, the more skewed the load the larger the loss."""
    E, k, L = 4, 1, 8
    sums_uniform = torch.full((1, E), L / E, dtype=torch.float64)
    uniform = torch.tensor([[2, 2, 2, 2]], dtype=torch.int32)
    skewed = torch.tensor([[5, 1, 1, 1]], dtype=torch.int32)
    collapsed = torch.tensor([[8, 0, 0, 0]], dtype=torch.int32)
    for counts in (uniform, skewed, collapsed):
        assert expert_balance_loss(counts, sums_uniform, k, L, 1.0).item() == pytest.approx(1.0)
    losses = [expert_balance_loss(c, c.double() * 1.0, k, L, 1.0).item() for c in (uniform, skewed, collapsed)]
    assert losses[0] == pytest.approx(1.0) and losses[0] < losses[1] < losses[2]
    assert losses[2] == pytest.approx(E)  # everything on one expert: f = E, P = 1


def test_balance_loss_gradient_flows_through_scores_only():
    counts, sums = _tensors()
    sums.requires_grad_(True)
    device_balance_loss(counts, sums, k=2, seq_len=3, num_devices=2, alpha=0.05).backward()
    # d/dP_j of alpha/S * f'_{d(j)} * P'_{d(j)} / L... : alpha/S * f'_{d(j)} / L
    f = [[4 / 6 * c for c in row] for row in COUNTS]
    want = [[0.05 / 2 * (sum(f[s][(j // 2) * 2:(j // 2) * 2 + 2]) / 2) / 3 for j in range(4)] for s in range(2)]
    torch.testing.assert_close(sums.grad, torch.tensor(want, dtype=torch.float64))
    sums.grad = None
    expert_balance_loss(counts, sums, k=2, seq_len=3, alpha=0.1).backward()
    torch.testing.assert_close(sums.grad, torch.tensor([[0.1 / 2 * fe / 3 for fe in row] for row in f], dtype=torch.float64))


def test_load_balance_loss_module_and_repr():
    counts, sums = _tensors()
    module = LoadBalanceLoss(num_experts=4, k=2, alpha=0.1)
    assert module(counts, sums, 3).item() == pytest.approx(_paper_expert_loss(COUNTS, SUMS, 2, 3, 0.1), rel=1e-12)
    assert repr(module) == "LoadBalanceLoss(num_experts=4, k=2, alpha=0.1)"
    assert repr(DeviceBalanceLoss(8, 2, 4, 0.5)) == "DeviceBalanceLoss(num_experts=8, k=2, num_devices=4, alpha=0.5)"


@pytest.mark.parametrize("D", [0, 3, -2])
def test_device_balance_loss_rejects_devices_not_dividing_experts(D):
    counts, sums = _tensors()
    with pytest.raises(ValueError, match=f"num_devices={D} must divide num_experts=4"):
        device_balance_loss(counts, sums, 2, 3, D, 0.1)
    with pytest.raises(ValueError, match=f"num_devices={D} must divide num_experts=4"):
        DeviceBalanceLoss(4, 2, D, 0.1)


@pytest.mark.parametrize("name, fn", [
    ("expert_balance_loss", lambda c, s: expert_balance_loss(c, s, 2, 3, 0.1)),
    ("device_balance_loss", lambda c, s: device_balance_loss(c, s, 2, 3, 2, 0.1)),
], ids=["expert", "device"])
def test_balance_losses_reject_bad_shapes(name, fn):
    """The error names the function and the argument, with the shapes it got."""
    counts, sums = _tensors()
    with pytest.raises(ValueError, match=rf"^{name}: tokens_per_expert and score_sums must be \[num_seqs, num_experts\], got \(4,\) and \(2, 4\)$"):
        fn(counts[0], sums)
    with pytest.raises(ValueError, match=rf"^{name}: .*must be \[num_seqs, num_experts\], got \(2, 4\) and \(4,\)$"):
        fn(counts, sums[0])
    with pytest.raises(ValueError, match=rf"^{name}: tokens_per_expert \(2, 2\) and score_sums \(2, 4\) must have the same shape$"):
        fn(counts[:, :2], sums)


def _lm_loss_by_hand(logits, labels, ignore_index):
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = labels[b, t + 1].item()
            if y == ignore_index:
                continue
            row = logits[b, t].double()
            terms.append(math.log(row.exp().sum().item()) - row[y].item())
    return sum(terms) / len(terms)


def test_lm_loss_by_hand():
    """Position t predicts label t+1 (the first label and the last logits are unused); ignored
    labels are skipped and the mean is over the rest; computed in fp32 from bf16 logits."""
    logits = torch.randn(2, 4, 5, dtype=torch.bfloat16)
    labels = torch.tensor([[0, 1, 2, 3], [4, -100, 0, 1]])
    got = lm_loss(logits, labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_lm_loss_by_hand(logits, labels, -100), rel=1e-5)
    labels = torch.tensor([[0, 1, 7, 3], [4, 2, 0, 1]])
    assert lm_loss(logits, labels, ignore_index=7).item() == pytest.approx(_lm_loss_by_hand(logits, labels, 7), rel=1e-5)


def test_lm_loss_rejects_mismatched_labels():
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, 4\), got \(2, 3\)"):
        lm_loss(torch.randn(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("alpha_1, alpha_2, seq_aux", [
    (0.01, 0.05, True), (0.0, 0.05, True), (0.01, 0.0, True), (0.0, 0.05, False), (0.01, 0.05, False),
])
def test_layer_adds_the_papers_losses(alpha_1, alpha_2, seq_aux):
    """The MoE layer's aux loss is alpha_1 * Eq. 12 + alpha_2 * Eq. 15, both written out here from
    the gate's statistics (a hook on the gate): per sequence (seq_aux) or over the batch, and each
    loss alone (the device-level loss must not need the expert-level one to be on)."""
    from dsmoe.config import DeepSeekMoEConfig

    torch.manual_seed(0)
    config = DeepSeekMoEConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        aux_loss_alpha=alpha_1, device_aux_loss_alpha=alpha_2, num_expert_devices=2, seq_aux=seq_aux,
    )
    layer = DeepSeekMoELayer(config).double().train()
    captured = {}
    layer.gate.register_forward_hook(lambda m, a, out: captured.setdefault("route", out))
    B, L = 2, 5  # two sequences: the load summed over both, not the first one's
    out = layer(torch.randn(B, L, 16, dtype=torch.float64))
    route = captured["route"]
    counts = route.tokens_per_expert.tolist()
    sums = route.score_sums.tolist()
    rows, per_row = (B, L) if seq_aux else (1, B * L)
    assert len(counts) == rows and sum(counts[0]) == per_row * 2  # one row per sequence for seq_aux
    want = _paper_expert_loss(counts, sums, 2, per_row, alpha_1) + _paper_device_loss(counts, sums, 2, per_row, 2, alpha_2)
    assert out.aux_loss is not None and out.aux_loss.item() == pytest.approx(want, rel=1e-10)
    assert out.tokens_per_expert.tolist() == [sum(c[e] for c in counts) for e in range(8)]
