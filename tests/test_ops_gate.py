"""dsmoe.ops.gate (and gate_backward) against dsmoe.reference.gate."""
from __future__ import annotations

import pytest
import torch

from dsmoe import ops, reference
from conftest import assert_close, noncontig, redispatch

# (T, E, k, num_seqs)
SHAPES = [
    (1, 1, 1, 1),
    (1, 8, 8, 1),
    (7, 5, 2, 1),
    (12, 6, 6, 3),
    (64, 64, 6, 4),
    (33, 63, 7, 3),
    (130, 16, 2, 2),
    (0, 4, 2, 1),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _logits(T, E, dtype, device, scale=2.0):
    return (torch.randn(T, E, dtype=torch.float64) * scale).to(dtype).to(device)


def _check_gate(out, ref):
    w, ids, counts, sums = out
    rw, rids, rcounts, rsums = ref
    assert ids.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(ids.cpu(), rids.cpu())
    assert torch.equal(counts.cpu(), rcounts.cpu())
    acc = rw.dtype
    assert w.dtype == acc and sums.dtype == acc
    assert_close(w, rw, acc)
    assert_close(sums, rsums, acc, scale=max(1.0, float(rsums.abs().max()) if rsums.numel() else 1.0))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}E{}k{}S{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_gate_forward(device, shape, dtype, normalize):
    T, E, k, S = shape
    logits = _logits(T, E, dtype, device)
    out = ops.gate(logits, k, normalize=normalize, num_seqs=S)
    _check_gate(out, reference.gate(logits, k, normalize=normalize, num_seqs=S))
    w, ids, counts, _ = out
    if T:
        assert int(ids.min()) >= 0 and int(ids.max()) < E
        # distinct experts per token, descending weights, k picks per token in the counts
        assert all(len(set(r)) == k for r in ids.cpu().tolist())
        assert bool((w[:, :-1] >= w[:, 1:]).all())
    assert counts.sum(dim=1).tolist() == [T // S * k] * S
    if normalize and T:
        assert_close(w.sum(-1), torch.ones(T, dtype=w.dtype, device=device), w.dtype)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
def test_gate_selection_bias(device, bias_dtype, normalize):
    T, E, k, S = 48, 16, 4, 2
    logits = _logits(T, E, torch.float32, device)
    bias = (torch.rand(E, dtype=torch.float64) * 0.2 - 0.1).to(bias_dtype).to(device)
    out = ops.gate(logits, k, normalize=normalize, selection_bias=bias, num_seqs=S)
    _check_gate(out, reference.gate(logits, k, normalize=normalize, selection_bias=bias, num_seqs=S))
    # A large bias forces selection but never enters the weights: they stay the plain probs.
    big = torch.zeros(E, dtype=bias_dtype, device=device)
    big[[3, 11, 5, 0]] = torch.tensor([40.0, 30.0, 20.0, 10.0], dtype=bias_dtype, device=device)
    w, ids, counts, sums = ops.gate(logits, k, selection_bias=big, num_seqs=S)
    assert ids.cpu().tolist() == [[3, 11, 5, 0]] * T
    probs = torch.softmax(logits.float(), -1)
    assert_close(w, probs[:, [3, 11, 5, 0]], torch.float32)
    assert_close(sums, probs.view(S, -1, E).sum(1), torch.float32, scale=float(T))


def test_gate_ties_go_to_lower_id(device):
    # Equal logits: the first k ids, weights 1/E.
    T, E, k = 5, 8, 3
    w, ids, _, _ = ops.gate(torch.zeros(T, E, device=device), k)
    assert ids.cpu().tolist() == [[0, 1, 2]] * T
    assert_close(w, torch.full((T, k), 1.0 / E, device=device), torch.float32)
    # Many ties at once (small integer logits in bf16): same as the reference's stable sort.
    logits = torch.randint(-2, 3, (200, 12)).to(torch.bfloat16).to(device)
    for kk in (1, 4, 12):
        _check_gate(ops.gate(logits, kk), reference.gate(logits, kk))


def test_gate_nan_rows_stay_in_range(device):
    logits = torch.randn(4, 6, device=device)
    logits[1] = float("nan")
    logits[2, 3] = float("nan")
    w, ids, counts, _ = ops.gate(logits, 3)
    assert int(ids.min()) >= 0 and int(ids.max()) < 6
    assert counts.sum().item() == 12
    assert all(len(set(r)) == 3 for r in ids.cpu().tolist())
    assert torch.isnan(w[1]).all()
    ref_w, ref_ids, _, _ = reference.gate(logits[[0, 3]], 3)
    assert torch.equal(ids[[0, 3]].cpu(), ref_ids.cpu())


def test_gate_noncontiguous(device):
    T, E, k = 40, 24, 5
    logits = noncontig(_logits(T, E, torch.float32, device))
    _check_gate(ops.gate(logits, k, True, None, 4), reference.gate(logits, k, True, None, 4))
    t = _logits(E, T, torch.float32, device).t()  # transposed view
    _check_gate(ops.gate(t, k), reference.gate(t.contiguous(), k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (24, 10, 3, 2), (64, 63, 7, 4), (6, 6, 6, 1)])
def test_gate_backward_matches_reference(device, dtype, normalize, shape):
    T, E, k, S = shape
    logits = _logits(T, E, dtype, device).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    gw = torch.randn(T, k, device=device)
    gs = torch.randn(S, E, device=device)
    bias = torch.randn(E, device=device) * 0.05
    w, _, _, sums = ops.gate(logits, k, normalize, bias, S)
    ((w * gw).sum() + (sums * gs).sum()).backward()
    rw, _, _, rsums = reference.gate(ref_logits, k, normalize, bias, S)
    ((rw * gw).sum() + (rsums * gs).sum()).backward()
    assert logits.grad.dtype == dtype
    assert_close(logits.grad, ref_logits.grad, dtype, scale=max(1.0, float(ref_logits.grad.abs().max())))


def test_gate_backward_one_output_only(device):
    # Only weights, or only score_sums, feed the loss: the other gradient is absent (None).
    logits = _logits(16, 8, torch.float32, device).requires_grad_()
    ops.gate(logits, 2).weights.sum().backward()
    g1 = logits.grad.clone()
    ref = logits.detach().clone().requires_grad_()
    reference.gate(ref, 2)[0].sum().backward()
    assert_close(g1, ref.grad, torch.float32)
    logits.grad = None
    ops.gate(logits, 2, num_seqs=4).score_sums.pow(2).sum().backward()
    ref.grad = None
    reference.gate(ref, 2, num_seqs=4)[3].pow(2).sum().backward()
    assert_close(logits.grad, ref.grad, torch.float32)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(6, 5, 2, 2), (4, 3, 3, 1), (3, 1, 1, 3)])
def test_gate_gradcheck(normalize, with_bias, shape):
    T, E, k, S = shape
    logits = (torch.randn(T, E, dtype=torch.float64) * 3).requires_grad_()
    bias = torch.randn(E, dtype=torch.float64) * 0.1 if with_bias else None

    def fn(x):
        w, _, _, sums = ops.gate(x, k, normalize, bias, S)
        return w, sums

    assert torch.autograd.gradcheck(fn, (logits,))


# ---------------------------------------------------------------- bad input


def test_gate_bad_args(check_device):
    dev = check_device
    logits = torch.randn(8, 4, device=dev)
    with pytest.raises(RuntimeError, match="logits must have dtype"):
        ops.gate(torch.zeros(8, 4, dtype=torch.int64, device=dev), 2)
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        ops.gate(torch.randn(2, 4, 4, device=dev), 2)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, num_experts=4\], got 5"):
        ops.gate(logits, 5)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.gate(logits, 0)
    with pytest.raises(RuntimeError, match="num_seqs=3 must divide num_tokens=8"):
        ops.gate(logits, 2, num_seqs=3)
    with pytest.raises(RuntimeError, match="num_seqs must be >= 1"):
        ops.gate(logits, 2, num_seqs=0)
    with pytest.raises(RuntimeError, match=r"selection_bias.size\(0\) must be 4"):
        ops.gate(logits, 2, selection_bias=torch.zeros(5, device=dev))
    with pytest.raises(RuntimeError, match="selection_bias must be 1-D"):
        ops.gate(logits, 2, selection_bias=torch.zeros(1, 4, device=dev))
    with pytest.raises(RuntimeError, match="selection_bias must have dtype"):
        ops.gate(logits, 2, selection_bias=torch.zeros(4, dtype=torch.bfloat16, device=dev))


def test_gate_device_mismatch(device):
    logits = torch.randn(8, 4, device=device)
    bias = torch.zeros(4, device="meta")
    msg = f"selection_bias is on meta but logits is on {device}"
    with pytest.raises(RuntimeError, match=msg):  # dispatches to the fake kernel
        ops.gate(logits, 2, selection_bias=bias)
    with pytest.raises(RuntimeError, match=msg):  # the device's own kernel
        redispatch(torch.ops.dsmoe.gate.default, device, logits, 2, False, bias, 1)


def test_gate_backward_bad_args(check_device):
    dev = check_device
    T, E, k = 6, 5, 2
    logits = torch.randn(T, E, device=dev)
    ids = torch.zeros(T, k, dtype=torch.int32, device=dev)
    gw = torch.zeros(T, k, device=dev)
    gs = torch.zeros(1, E, device=dev)
    gb = torch.ops.dsmoe.gate_backward
    with pytest.raises(RuntimeError, match="expert_ids must have dtype Int"):
        gb(gw, gs, logits, ids.long(), False, 1)
    with pytest.raises(RuntimeError, match=r"expert_ids.size\(0\) must be 6"):
        gb(gw, gs, logits, ids[:4], False, 1)
    with pytest.raises(RuntimeError, match=r"grad_weights.size\(1\) must be 2"):
        gb(torch.zeros(T, 3, device=dev), gs, logits, ids, False, 1)
    with pytest.raises(RuntimeError, match=r"grad_score_sums.size\(0\) must be 2"):
        gb(gw, gs, logits, ids, False, 2)
    with pytest.raises(RuntimeError, match="grad_score_sums must be 2-D"):
        gb(gw, gs[0], logits, ids, False, 1)
    with pytest.raises(RuntimeError, match="logits must have dtype"):
        gb(gw, gs, logits.to(torch.int32), ids, False, 1)
    with pytest.raises(RuntimeError, match=r"expert_ids.size\(1\)=k must be in"):
        gb(torch.zeros(T, 6, device=dev), gs, logits, torch.zeros(T, 6, dtype=torch.int32, device=dev), False, 1)


def test_gate_backward_bad_values():
    T, E, k = 6, 5, 2
    ids = torch.zeros(T, k, dtype=torch.int32)
    ids[4, 1] = 7
    with pytest.raises(RuntimeError, match=r"expert_ids\[4,1\]=7 is outside \[0, 5\)"):
        torch.ops.dsmoe.gate_backward(torch.zeros(T, k), torch.zeros(1, E), torch.randn(T, E), ids, False, 1)


def test_gate_backward_device_mismatch(device):
    T, E, k = 6, 5, 2
    logits = torch.randn(T, E, device=device)
    ids = torch.zeros(T, k, dtype=torch.int32, device="meta")
    args = (torch.zeros(T, k, device=device), torch.zeros(1, E, device=device), logits, ids, False, 1)
    with pytest.raises(RuntimeError, match=f"expert_ids is on meta but logits is on {device}"):
        torch.ops.dsmoe.gate_backward(*args)
    with pytest.raises(RuntimeError, match=f"expert_ids is on meta but logits is on {device}"):
        redispatch(torch.ops.dsmoe.gate_backward.default, device, *args)
