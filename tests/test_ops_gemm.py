"""dsmoe.ops.grouped_gemm, grouped_gemm_wgrad and swiglu against dsmoe.reference."""
from __future__ import annotations

import pytest
import torch

from dsmoe import ops, reference
from conftest import assert_close, noncontig, offsets_from_counts, redispatch

# (group sizes, K, N): empty groups, E = 1, one row, K and N not multiples of 8, a large group
GROUPS = [
    ([1], 1, 1),
    ([5], 13, 7),
    ([0, 3, 0, 0, 9, 1], 16, 24),
    ([4, 4, 4, 4], 33, 17),
    ([0, 0, 0], 8, 8),
    ([2, 0, 7, 1, 0, 3, 5, 0, 1, 6, 2, 2], 40, 12),
    ([150, 3, 0, 40], 64, 56),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _gid(g):
    return "E{}M{}K{}N{}".format(len(g[0]), sum(g[0]), g[1], g[2])


def _operands(counts, K, N, trans_b, dtype, device):
    E, M = len(counts), sum(counts)
    a = torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(E, N, K, dtype=dtype, device=device) if trans_b else torch.randn(E, K, N, dtype=dtype, device=device)
    b = b / K**0.5
    return a, b, offsets_from_counts(counts, device)


@pytest.mark.parametrize("groups", GROUPS, ids=_gid)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_forward(device, groups, dtype, trans_b):
    counts, K, N = groups
    a, b, off = _operands(counts, K, N, trans_b, dtype, device)
    c = ops.grouped_gemm(a, b, off, trans_b)
    assert c.dtype == dtype and c.shape == (sum(counts), N)
    assert_close(c, reference.grouped_gemm(a, b, off, trans_b), dtype, scale=2.0)


@pytest.mark.parametrize("groups", GROUPS, ids=_gid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_backward(device, groups, dtype, trans_b):
    counts, K, N = groups
    a, b, off = _operands(counts, K, N, trans_b, dtype, device)
    a.requires_grad_()
    b.requires_grad_()
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    g = torch.randn(sum(counts), N, dtype=dtype, device=device)
    ops.grouped_gemm(a, b, off, trans_b).backward(g)
    reference.grouped_gemm(ra, rb, off, trans_b).backward(g)
    assert_close(a.grad, ra.grad, dtype, scale=2.0)
    scale = max(1.0, max(counts, default=0) ** 0.5)
    assert_close(b.grad, rb.grad, dtype, scale=scale)
    for e, cnt in enumerate(counts):
        if cnt == 0:  # experts with no rows get an exact zero gradient
            assert not b.grad[e].any()


@pytest.mark.parametrize("groups", GROUPS, ids=_gid)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_wgrad(device, groups, dtype, trans_b):
    counts, K, N = groups
    M = sum(counts)
    a = torch.randn(M, K, dtype=dtype, device=device)
    grad_c = torch.randn(M, N, dtype=dtype, device=device)
    off = offsets_from_counts(counts, device)
    out = ops.grouped_gemm_wgrad(a, grad_c, off, trans_b)
    assert out.shape == ((len(counts), N, K) if trans_b else (len(counts), K, N)) and out.dtype == dtype
    scale = max(1.0, max(counts) ** 0.5)
    assert_close(out, reference.grouped_gemm_wgrad(a, grad_c, off, trans_b), dtype, scale=scale)


def test_grouped_gemm_trans_b_defaults_to_false(device):
    """Without trans_b both ops take and give the [E, K, N] layout (written out per expert)."""
    counts, K, N = [3, 0, 2], 4, 5
    a = torch.randn(5, K, dtype=torch.float64, device=device)
    b = torch.randn(3, K, N, dtype=torch.float64, device=device)
    g = torch.randn(5, N, dtype=torch.float64, device=device)
    off = offsets_from_counts(counts, device)
    rows = [slice(0, 3), slice(3, 3), slice(3, 5)]
    want_c = torch.cat([a[r] @ b[e] for e, r in enumerate(rows)])
    want_w = torch.stack([a[r].T @ g[r] for r in rows])
    torch.testing.assert_close(ops.grouped_gemm(a, b, off), want_c)
    torch.testing.assert_close(ops.grouped_gemm_wgrad(a, g, off), want_w)


def test_grouped_gemm_many_groups_threads(device):
    # Many small groups take the CPU's split-groups-over-threads path; compare it too.
    counts = [int(c) for c in torch.randint(0, 9, (63,))]
    K, N = 20, 24
    a, b, off = _operands(counts, K, N, True, torch.float32, device)
    assert_close(ops.grouped_gemm(a, b, off, True), reference.grouped_gemm(a, b, off, True), torch.float32)
    g = torch.randn(sum(counts), N, device=device)
    assert_close(
        ops.grouped_gemm_wgrad(a, g, off, True), reference.grouped_gemm_wgrad(a, g, off, True), torch.float32, scale=3.0
    )


def test_grouped_gemm_noncontiguous(device):
    counts, K, N = [3, 0, 6, 2], 12, 10
    a, b, off = _operands(counts, K, N, True, torch.float32, device)
    an = noncontig(a)
    expected = reference.grouped_gemm(a, b, off, True)
    assert_close(ops.grouped_gemm(an, b, off, True), expected, torch.float32)
    # b as a transposed view: [E,K,N] view of an [E,N,K] tensor, with trans_b=False
    assert_close(ops.grouped_gemm(a, b.transpose(1, 2), off, False), expected, torch.float32)
    assert_close(ops.grouped_gemm(an, noncontig(b), off, True), expected, torch.float32)
    # non-contiguous offsets
    off_nc = torch.stack([off, off], 1)[:, 0]
    assert not off_nc.is_contiguous()
    assert_close(ops.grouped_gemm(a, b, off_nc, True), expected, torch.float32)
    g = noncontig(torch.randn(sum(counts), N, device=device))
    assert_close(
        ops.grouped_gemm_wgrad(an, g, off, True), reference.grouped_gemm_wgrad(a, g, off, True), torch.float32
    )
    # gradients through non-contiguous leaves
    an.requires_grad_()
    bt = b.transpose(1, 2).detach().requires_grad_()
    ops.grouped_gemm(an, bt, off, False).backward(g)
    ra, rb = a.clone().requires_grad_(), b.transpose(1, 2).clone().requires_grad_()
    reference.grouped_gemm(ra, rb, off, False).backward(g)
    assert_close(an.grad, ra.grad, torch.float32)
    assert_close(bt.grad, rb.grad, torch.float32)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("counts", [[2, 0, 3], [0, 4]])
def test_grouped_gemm_gradcheck(trans_b, counts):
    K, N = 3, 4
    a, b, off = _operands(counts, K, N, trans_b, torch.float64, "cpu")
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: ops.grouped_gemm(x, w, off, trans_b), (a, b))


# ---------------------------------------------------------------- swiglu


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48), (0, 4), (300, 352)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_forward_backward(device, shape, dtype):
    M, inter = shape
    x = (torch.randn(M, 2 * inter, dtype=dtype, device=device) * 3).requires_grad_()
    rx = x.detach().clone().requires_grad_()
    y = ops.swiglu(x)
    ref = reference.swiglu(rx)
    assert y.dtype == dtype and y.shape == (M, inter)
    assert_close(y, ref, dtype, scale=3.0)
    g = torch.randn(M, inter, dtype=dtype, device=device)
    y.backward(g)
    ref.backward(g)
    assert_close(x.grad, rx.grad, dtype, scale=3.0)


def test_swiglu_noncontiguous(device):
    x = noncontig(torch.randn(9, 22, device=device))
    assert_close(ops.swiglu(x), reference.swiglu(x), torch.float32)
    xt = torch.randn(22, 9, device=device).t()
    assert_close(ops.swiglu(xt), reference.swiglu(xt), torch.float32)
    g = noncontig(torch.randn(9, 11, device=device))
    assert_close(torch.ops.dsmoe.swiglu_backward(g, xt), _ref_swiglu_grad(g, xt), torch.float32)


def _ref_swiglu_grad(g, x):
    x = x.detach().clone().requires_grad_()
    reference.swiglu(x).backward(g)
    return x.grad


def test_swiglu_extremes(device):
    # Large |gate|: silu saturates to 0 or to gate without overflow or NaN.
    x = torch.tensor([[-100.0, 0.0, 100.0, 2.0, 3.0, 4.0]], device=device).requires_grad_()
    y = ops.swiglu(x)
    assert torch.isfinite(y).all()
    assert_close(y, reference.swiglu(x.detach()), torch.float32)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, _ref_swiglu_grad(torch.ones(1, 3, device=device), x), torch.float32)


def test_swiglu_gradcheck():
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (x,))


# ---------------------------------------------------------------- bad input


def test_grouped_gemm_bad_args(check_device):
    dev = check_device
    a = torch.randn(6, 4, device=dev)
    b = torch.randn(3, 4, 5, device=dev)
    off = torch.tensor([0, 2, 4, 6], dtype=torch.int32).to(dev)
    gg = ops.grouped_gemm
    with pytest.raises(RuntimeError, match="a must be 2-D"):
        gg(a.view(6, 2, 2), b, off)
    with pytest.raises(RuntimeError, match="a must have dtype"):
        gg(a.to(torch.int32), b.to(torch.int32), off)
    with pytest.raises(RuntimeError, match="b must be 3-D"):
        gg(a, b[0], off)
    with pytest.raises(RuntimeError, match=r"b must have the dtype of a \(Float\), got BFloat16"):
        gg(a, b.to(torch.bfloat16), off)
    with pytest.raises(RuntimeError, match="expert_offsets must have dtype Int"):
        gg(a, b, off.long())
    with pytest.raises(RuntimeError, match="expert_offsets must be 1-D"):
        gg(a, b, off.view(2, 2))
    with pytest.raises(RuntimeError, match="expert_offsets must hold num_experts"):
        gg(a, b[:0], off[:1])
    with pytest.raises(RuntimeError, match=r"b.size\(0\) must be 2 \(num_experts"):
        gg(a, b, off[:3])
    with pytest.raises(RuntimeError, match=r"b.size\(1\) must be 4 \(K = a.size\(1\)\)"):
        gg(a, b.transpose(1, 2), off)
    with pytest.raises(RuntimeError, match=r"b.size\(2\) must be 4 \(K = a.size\(1\)\)"):
        gg(a, b, off, True)


def test_grouped_gemm_wgrad_bad_args(check_device):
    dev = check_device
    a = torch.randn(6, 4, device=dev)
    g = torch.randn(6, 5, device=dev)
    off = torch.tensor([0, 2, 4, 6], dtype=torch.int32).to(dev)
    wg = ops.grouped_gemm_wgrad
    with pytest.raises(RuntimeError, match=r"grad_c.size\(0\) must be 6 \(rows of a\)"):
        wg(a, g[:5], off)
    with pytest.raises(RuntimeError, match="grad_c must have the dtype of a"):
        wg(a, g.double(), off)
    with pytest.raises(RuntimeError, match="grad_c must be 2-D"):
        wg(a, g.view(6, 5, 1), off)
    with pytest.raises(RuntimeError, match="a must be 2-D"):
        wg(a.view(-1), g, off)
    with pytest.raises(RuntimeError, match="expert_offsets must have dtype Int"):
        wg(a, g, off.float())


@pytest.mark.parametrize(
    "offsets,match",
    [
        ([1, 2, 4, 6], r"expert_offsets\[0\] must be 0, got 1"),
        ([0, 4, 2, 6], r"expert_offsets must be non-decreasing, got expert_offsets\[2\]=2 < expert_offsets\[1\]=4"),
        ([0, 2, 4, 7], r"expert_offsets\[-1\]=7 must not exceed the number of rows \(6\)"),
    ],
)
def test_grouped_gemm_bad_offsets(offsets, match):
    a = torch.randn(6, 4)
    off = torch.tensor(offsets, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="grouped_gemm: " + match):
        ops.grouped_gemm(a, torch.randn(3, 4, 5), off)
    with pytest.raises(RuntimeError, match="grouped_gemm_wgrad: " + match):
        ops.grouped_gemm_wgrad(a, torch.randn(6, 5), off)


def test_grouped_gemm_device_mismatch(device):
    a = torch.randn(6, 4, device=device)
    b = torch.randn(3, 4, 5, device=device)
    off_meta = torch.empty(4, dtype=torch.int32, device="meta")
    msg = f"expert_offsets is on meta but a is on {device}"
    with pytest.raises(RuntimeError, match=msg):
        ops.grouped_gemm(a, b, off_meta)
    with pytest.raises(RuntimeError, match=msg):
        redispatch(torch.ops.dsmoe.grouped_gemm.default, device, a, b, off_meta, False)
    off = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=device)
    b_meta = torch.empty(3, 4, 5, device="meta")
    with pytest.raises(RuntimeError, match=f"b is on meta but a is on {device}"):
        ops.grouped_gemm(a, b_meta, off)
    with pytest.raises(RuntimeError, match=f"b is on meta but a is on {device}"):
        redispatch(torch.ops.dsmoe.grouped_gemm.default, device, a, b_meta, off, False)
    g_meta = torch.empty(6, 5, device="meta")
    with pytest.raises(RuntimeError, match=f"grad_c is on meta but a is on {device}"):
        ops.grouped_gemm_wgrad(a, g_meta, off)
    with pytest.raises(RuntimeError, match=f"grad_c is on meta but a is on {device}"):
        redispatch(torch.ops.dsmoe.grouped_gemm_wgrad.default, device, a, g_meta, off, False)


def test_swiglu_bad_args(check_device):
    dev = check_device
    x = torch.randn(4, 6, device=dev)
    with pytest.raises(RuntimeError, match=r"gate_up.size\(1\) must be even"):
        ops.swiglu(torch.randn(4, 5, device=dev))
    with pytest.raises(RuntimeError, match="gate_up must be 2-D"):
        ops.swiglu(x.view(-1))
    with pytest.raises(RuntimeError, match="gate_up must have dtype"):
        ops.swiglu(x.to(torch.int64))
    sb = torch.ops.dsmoe.swiglu_backward
    with pytest.raises(RuntimeError, match=r"grad_out.size\(1\) must be 3"):
        sb(torch.randn(4, 6, device=dev), x)
    with pytest.raises(RuntimeError, match=r"grad_out.size\(0\) must be 4"):
        sb(torch.randn(5, 3, device=dev), x)
    with pytest.raises(RuntimeError, match="grad_out must have dtype"):
        sb(torch.zeros(4, 3, dtype=torch.int32, device=dev), x)


def test_swiglu_backward_device_mismatch(device):
    x = torch.randn(4, 6, device=device)
    g = torch.empty(4, 3, device="meta")
    with pytest.raises(RuntimeError, match=f"grad_out is on meta but gate_up is on {device}"):
        torch.ops.dsmoe.swiglu_backward(g, x)
    with pytest.raises(RuntimeError, match=f"grad_out is on meta but gate_up is on {device}"):
        redispatch(torch.ops.dsmoe.swiglu_backward.default, device, g, x)


@pytest.mark.parametrize("which", ["a", "b"])
def test_grouped_gemm_backward_one_input(device, which):
    # Only one operand requires grad: the other gradient is never computed (and not needed).
    counts, K, N = [2, 0, 5], 6, 7
    a, b, off = _operands(counts, K, N, True, torch.float32, device)
    leaf = a if which == "a" else b
    leaf.requires_grad_()
    g = torch.randn(sum(counts), N, device=device)
    (got,) = torch.autograd.grad(ops.grouped_gemm(a, b, off, True), leaf, g)
    ref_leaf = leaf.detach().clone().requires_grad_()
    ra, rb = (ref_leaf, b) if which == "a" else (a, ref_leaf)
    (expected,) = torch.autograd.grad(reference.grouped_gemm(ra, rb, off, True), ref_leaf, g)
    assert_close(got, expected, torch.float32, scale=2.0)


@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_rows_past_last_offset(device, trans_b):
    """Rows after expert_offsets[-1] (permute's dropped sentinel rows) belong to no expert: zeros in
    the output, never read by the weight gradient."""
    a = torch.randn(9, 4, device=device)
    b = torch.randn(3, 5, 4, device=device) if trans_b else torch.randn(3, 4, 5, device=device)
    off = torch.tensor([0, 2, 2, 6], dtype=torch.int32, device=device)
    c = ops.grouped_gemm(a, b, off, trans_b)
    for e, (lo, hi) in enumerate([(0, 2), (2, 2), (2, 6)]):
        be = b[e].t() if trans_b else b[e]
        torch.testing.assert_close(c[lo:hi], a[lo:hi] @ be)
    assert torch.equal(c[6:].cpu(), torch.zeros(3, 5))
    g = torch.randn(9, 5, device=device)
    wg = ops.grouped_gemm_wgrad(a, g, off, trans_b)
    full = ops.grouped_gemm_wgrad(a[:6].contiguous(), g[:6].contiguous(), off, trans_b)
    torch.testing.assert_close(wg, full)
