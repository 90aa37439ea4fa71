"""dsmoe.ops.permute / unpermute (and their backward ops) against dsmoe.reference."""
from __future__ import annotations

import pytest
import torch

from dsmoe import ops, reference
from conftest import assert_close, noncontig, redispatch, routing

# (T, h, E, k, routing mode)
SHAPES = [
    (1, 1, 1, 1, "uniform"),
    (1, 16, 4, 4, "uniform"),
    (5, 7, 3, 2, "uniform"),
    (64, 33, 16, 4, "skewed"),
    (100, 24, 64, 6, "sparse"),
    (37, 130, 8, 8, "uniform"),
    (0, 8, 4, 2, "uniform"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _sid(s):
    return "T{}h{}E{}k{}-{}".format(*s)


@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_forward(device, shape, dtype):
    T, h, E, k, mode = shape
    x = torch.randn(T, h, dtype=dtype, device=device)
    ids = routing(T, k, E, device, mode)
    x_perm, row_map, offsets = ops.permute(x, ids, E)
    rx, rmap, roff = reference.permute(x, ids, E)
    assert row_map.dtype == torch.int32 and offsets.dtype == torch.int32
    assert torch.equal(row_map.cpu(), rmap.cpu())
    assert torch.equal(offsets.cpu(), roff.cpu())
    assert torch.equal(x_perm.cpu(), rx.cpu())  # a copy: bit-exact
    if mode == "sparse":
        counts = offsets[1:] - offsets[:-1]
        assert int((counts == 0).sum()) > 0  # experts with no token are covered


@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_permute_backward(device, shape, dtype):
    T, h, E, k, mode = shape
    x = torch.randn(T, h, dtype=dtype, device=device, requires_grad=True)
    rx = x.detach().clone().requires_grad_()
    ids = routing(T, k, E, device, mode)
    g = torch.randn(T * k, h, dtype=dtype, device=device)
    ops.permute(x, ids, E).x_perm.backward(g)
    reference.permute(rx, ids, E)[0].backward(g)
    assert_close(x.grad, rx.grad, dtype, scale=float(k) ** 0.5)
    # permute_backward directly (rows of one token summed in fp32, rounded once)
    row_map = ops.permute(x.detach(), ids, E).row_map
    direct = torch.ops.dsmoe.permute_backward(g, row_map, k)
    exact = g.double()[row_map.long()].view(T, k, h).sum(1).to(dtype)
    assert_close(direct, exact, dtype, scale=float(k) ** 0.5)


@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize(
    "dtype,wdtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
     (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16)],
    ids=str,
)
def test_unpermute_forward_backward(device, shape, dtype, wdtype):
    T, h, E, k, mode = shape
    ids = routing(T, k, E, device, mode)
    row_map = reference.permute(torch.zeros(T, 1, device=device), ids, E)[1]
    y_perm = torch.randn(T * k, h, dtype=dtype, device=device, requires_grad=True)
    weights = torch.rand(T, k, dtype=wdtype, device=device, requires_grad=True)
    ry, rw = y_perm.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    y = ops.unpermute(y_perm, row_map, weights)
    ref = reference.unpermute(ry, row_map, rw)
    assert y.dtype == dtype and y.shape == (T, h)
    assert_close(y, ref, dtype, scale=float(k) ** 0.5)
    g = torch.randn(T, h, dtype=dtype, device=device)
    y.backward(g)
    ref.backward(g)
    assert y_perm.grad.dtype == dtype and weights.grad.dtype == wdtype
    assert_close(y_perm.grad, ry.grad, dtype)
    # d weights is a dot product over h (fp32 accumulation inside; the reference too)
    assert_close(weights.grad, rw.grad, wdtype, scale=max(1.0, float(h) ** 0.5))


def test_unpermute_backward_op(device):
    T, h, E, k = 20, 12, 6, 3
    ids = routing(T, k, E, device)
    row_map = reference.permute(torch.zeros(T, 1, device=device), ids, E)[1]
    y_perm = torch.randn(T * k, h, device=device)
    weights = torch.rand(T, k, device=device)
    grad_y = torch.randn(T, h, device=device)
    gyp, gw = torch.ops.dsmoe.unpermute_backward(grad_y, y_perm, row_map, weights)
    rows = row_map.long()
    exp_gyp = torch.empty_like(y_perm)
    exp_gyp[rows] = (grad_y.unsqueeze(1) * weights.unsqueeze(-1)).reshape(T * k, h)
    exp_gw = (grad_y.unsqueeze(1) * y_perm[rows].view(T, k, h)).sum(-1)
    assert_close(gyp, exp_gyp, torch.float32)
    assert_close(gw, exp_gw, torch.float32, scale=4.0)


def test_permute_unpermute_roundtrip(device):
    # unpermute(permute(x)) with weights 1 gives k * x (every copy comes back to its token).
    T, h, E, k = 50, 20, 10, 3
    x = torch.randn(T, h, device=device)
    ids = routing(T, k, E, device, "skewed")
    x_perm, row_map, _ = ops.permute(x, ids, E)
    y = ops.unpermute(x_perm, row_map, torch.ones(T, k, device=device))
    assert_close(y, k * x, torch.float32)


def test_permute_noncontiguous(device):
    T, h, E, k = 40, 17, 12, 3
    x = noncontig(torch.randn(T, h, device=device))
    wide_ids = routing(T, 2 * k, E, device)
    ids = wide_ids[:, ::2]  # non-contiguous, still distinct per row
    assert not ids.is_contiguous()
    out = ops.permute(x, ids, E)
    ref = reference.permute(x.contiguous(), ids.contiguous(), E)
    for a, b in zip(out, ref):
        assert torch.equal(a.cpu(), b.cpu())
    xt = torch.randn(h, T, device=device).t()  # transposed view
    assert torch.equal(ops.permute(xt, ids, E).x_perm.cpu(), reference.permute(xt, ids, E)[0].cpu())
    # unpermute with non-contiguous y_perm, row_map and weights
    y_perm = noncontig(torch.randn(T * k, h, device=device))
    row_map_nc = torch.stack([out.row_map, out.row_map], 1)[:, 0]
    assert not row_map_nc.is_contiguous()
    w = noncontig(torch.rand(T, k, device=device))
    expected = reference.unpermute(y_perm, out.row_map, w)
    assert_close(ops.unpermute(y_perm, row_map_nc, w), expected, torch.float32)


def test_permute_gradcheck():
    T, h, E, k = 6, 5, 4, 2
    ids = routing(T, k, E)
    x = torch.randn(T, h, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.permute(t, ids, E).x_perm, (x,))


@pytest.mark.parametrize("k", [1, 3])
def test_unpermute_gradcheck(k):
    T, h, E = 5, 4, 6
    ids = routing(T, k, E)
    row_map = ops.permute(torch.zeros(T, 1), ids, E).row_map
    y_perm = torch.randn(T * k, h, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.unpermute(a, row_map, b), (y_perm, w))


# ---------------------------------------------------------------- bad input


def test_permute_bad_args(check_device):
    dev = check_device
    x = torch.randn(6, 4, device=dev)
    ids = torch.zeros(6, 2, dtype=torch.int32, device=dev)
    with pytest.raises(RuntimeError, match="x must have dtype"):
        ops.permute(x.to(torch.int32), ids, 3)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.permute(x[0], ids, 3)
    with pytest.raises(RuntimeError, match=r"expert_ids must have dtype Int\|Long, got Short"):
        ops.permute(x, ids.short(), 3)
    with pytest.raises(RuntimeError, match="expert_ids must be 2-D"):
        ops.permute(x, ids[:, 0], 3)
    with pytest.raises(RuntimeError, match=r"expert_ids.size\(0\) must be 6 \(num_tokens of x\)"):
        ops.permute(x, ids[:5], 3)
    with pytest.raises(RuntimeError, match="expert_ids must have k >= 1 columns"):
        ops.permute(x, ids[:, :0], 3)
    with pytest.raises(RuntimeError, match="num_experts must be >= 1"):
        ops.permute(x, ids, 0)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_permute_bad_values(id_dtype):
    x = torch.randn(6, 4)
    ids = torch.zeros(6, 2, dtype=id_dtype)
    ids[3, 1] = -1
    with pytest.raises(RuntimeError, match=r"expert_ids\[3,1\]=-1 is negative"):
        ops.permute(x, ids, 3)


@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_permute_int64_ids(device, shape, dtype):
    """int64 ids (transformers' routers) give exactly what their int32 copy gives, forward and
    backward."""
    T, h, E, k, mode = shape
    x = torch.randn(T, h, dtype=dtype, device=device, requires_grad=True)
    ids = routing(T, k, E, device, mode)
    out32 = ops.permute(x, ids, E)
    out64 = ops.permute(x, ids.long(), E)
    for a, b in zip(out32, out64):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    g = torch.randn(T * k, h, dtype=dtype, device=device)
    (g32,) = torch.autograd.grad(out32.x_perm, x, g)
    (g64,) = torch.autograd.grad(out64.x_perm, x, g)
    assert torch.equal(g32, g64)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_permute_drops_sentinel_ids(device, id_dtype):
    """Ids >= num_experts (expert-parallel sentinels): zero rows after expert_offsets[E], which the
    grouped GEMMs skip, so they add zero to unpermute's sum and its gradients; the kept rows are
    permute of the kept ids."""
    T, h, E, k = 40, 12, 5, 3
    x = torch.randn(T, h, device=device, requires_grad=True)
    ids = routing(T, k, E + 3, device, "uniform").to(id_dtype)  # ids 5..7 are sentinels
    sentinel = ids >= E
    kept = int((~sentinel).sum())
    assert 0 < kept < T * k
    x_perm, row_map, offsets = ops.permute(x, ids, E)
    assert int(offsets[-1]) == kept
    rows = row_map.long().cpu()
    assert torch.equal(torch.sort(rows).values, torch.arange(T * k))  # still a permutation
    assert bool((rows[sentinel.flatten().cpu()] >= kept).all())
    assert torch.equal(x_perm[kept:].cpu(), torch.zeros(T * k - kept, h))
    # kept rows: as the reference permute of the kept ids (ranks by expert, token order kept)
    token = torch.arange(T).repeat_interleave(k)
    flat = ids.flatten().long().cpu()
    order = sorted(range(T * k), key=lambda f: (int(flat[f]), f))
    kept_order = [f for f in order if flat[f] < E]
    assert torch.equal(x_perm[:kept].detach().cpu(), x.detach().cpu()[token[kept_order]])
    assert torch.equal(rows[kept_order], torch.arange(kept))
    # the experts pipeline: sentinels contribute nothing, to the output or to any gradient
    w_up = torch.randn(E, 8, h, device=device, requires_grad=True)
    w_down = torch.randn(E, h, 4, device=device, requires_grad=True)
    weights = torch.rand(T, k, device=device, requires_grad=True)
    hidden = ops.swiglu(ops.grouped_gemm(x_perm, w_up, offsets, trans_b=True))
    y = ops.unpermute(ops.grouped_gemm(hidden, w_down, offsets, trans_b=True), row_map, weights)
    xs, ws = x.detach().double(), weights.detach().double()
    expected = torch.zeros(T, h, dtype=torch.float64, device=device)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if e < E:
                gu = w_up[e].detach().double() @ xs[t]
                act = torch.nn.functional.silu(gu[:4]) * gu[4:]
                expected[t] += ws[t, j] * (w_down[e].detach().double() @ act)
    assert_close(y, expected.float(), torch.float32, scale=4.0)
    y.sum().backward()
    assert torch.equal(weights.grad[sentinel], torch.zeros(int(sentinel.sum()), device=device))
    assert bool(torch.isfinite(x.grad).all() and torch.isfinite(w_up.grad).all())


def test_permute_device_mismatch(device):
    x = torch.randn(6, 4, device=device)
    ids = torch.zeros(6, 2, dtype=torch.int32, device="meta")
    msg = f"expert_ids is on meta but x is on {device}"
    with pytest.raises(RuntimeError, match=msg):
        ops.permute(x, ids, 3)
    with pytest.raises(RuntimeError, match=msg):
        redispatch(torch.ops.dsmoe.permute.default, device, x, ids, 3)


def test_permute_backward_bad_args(check_device):
    dev = check_device
    g = torch.randn(6, 4, device=dev)
    row_map = torch.arange(6, dtype=torch.int32, device=dev)
    pb = torch.ops.dsmoe.permute_backward
    with pytest.raises(RuntimeError, match=r"grad_x_perm.size\(0\)=6 must be a multiple of k=4"):
        pb(g, row_map, 4)
    with pytest.raises(RuntimeError, match="k must be >= 1"):
        pb(g, row_map, 0)
    with pytest.raises(RuntimeError, match=r"row_map.size\(0\) must be 6"):
        pb(g, row_map[:4], 2)
    with pytest.raises(RuntimeError, match="row_map must have dtype Int"):
        pb(g, row_map.long(), 2)
    with pytest.raises(RuntimeError, match="grad_x_perm must have dtype"):
        pb(g.to(torch.int64), row_map, 2)


def test_unpermute_bad_args(check_device):
    dev = check_device
    T, k, h = 4, 2, 3
    y_perm = torch.randn(T * k, h, device=dev)
    row_map = torch.arange(T * k, dtype=torch.int32, device=dev)
    w = torch.rand(T, k, device=dev)
    with pytest.raises(RuntimeError, match=r"y_perm.size\(0\) must be 8 \(num_tokens \* k of weights\)"):
        ops.unpermute(y_perm[:6], row_map[:6], w)
    with pytest.raises(RuntimeError, match="weights must be 2-D"):
        ops.unpermute(y_perm, row_map, w.view(-1))
    with pytest.raises(RuntimeError, match="weights must have dtype"):
        ops.unpermute(y_perm, row_map, w.to(torch.int32))
    with pytest.raises(RuntimeError, match="y_perm must have dtype"):
        ops.unpermute(y_perm.to(torch.int32), row_map, w)
    with pytest.raises(RuntimeError, match="y_perm must be 2-D"):
        ops.unpermute(y_perm.view(-1), row_map, w)
    with pytest.raises(RuntimeError, match="row_map must have dtype Int"):
        ops.unpermute(y_perm, row_map.long(), w)
    with pytest.raises(RuntimeError, match=r"row_map.size\(0\) must be 8"):
        ops.unpermute(y_perm, row_map[:7], w)
    ub = torch.ops.dsmoe.unpermute_backward
    with pytest.raises(RuntimeError, match=r"grad_y.size\(1\) must be 3"):
        ub(torch.randn(T, h + 1, device=dev), y_perm, row_map, w)
    with pytest.raises(RuntimeError, match=r"grad_y.size\(0\) must be 4"):
        ub(torch.randn(T + 1, h, device=dev), y_perm, row_map, w)


def test_unpermute_bad_values():
    T, k, h = 4, 2, 3
    row_map = torch.arange(T * k, dtype=torch.int32)
    row_map[5] = 8
    with pytest.raises(RuntimeError, match=r"row_map\[5\]=8 is outside \[0, 8\)"):
        ops.unpermute(torch.randn(T * k, h), row_map, torch.rand(T, k))
    with pytest.raises(RuntimeError, match=r"row_map\[5\]=8 is outside"):
        torch.ops.dsmoe.permute_backward(torch.randn(T * k, h), row_map, k)
    with pytest.raises(RuntimeError, match=r"row_map\[5\]=8 is outside"):
        torch.ops.dsmoe.unpermute_backward(torch.randn(T, h), torch.randn(T * k, h), row_map, torch.rand(T, k))
    row_map[5] = 2  # in range, but row 2 twice: unpermute_backward would write it twice
    with pytest.raises(RuntimeError, match=r"row_map must be a permutation, but row 2 appears twice \(again at row_map\[5\]\)"):
        torch.ops.dsmoe.unpermute_backward(torch.randn(T, h), torch.randn(T * k, h), row_map, torch.rand(T, k))


def test_unpermute_device_mismatch(device):
    T, k, h = 4, 2, 3
    y_perm = torch.randn(T * k, h, device=device)
    row_map = torch.arange(T * k, dtype=torch.int32, device=device)
    w = torch.rand(T, k, device="meta")
    with pytest.raises(RuntimeError, match=f"weights is on meta but y_perm is on {device}"):
        ops.unpermute(y_perm, row_map, w)
    with pytest.raises(RuntimeError, match=f"weights is on meta but y_perm is on {device}"):
        redispatch(torch.ops.dsmoe.unpermute.default, device, y_perm, row_map, w)
    with pytest.raises(RuntimeError, match=f"row_map is on meta but y_perm is on {device}"):
        meta_map = torch.empty(T * k, dtype=torch.int32, device="meta")
        redispatch(torch.ops.dsmoe.unpermute.default, device, y_perm, meta_map, torch.rand(T, k, device=device))


def test_routing_ops_are_deterministic(device):
    # gate statistics, permute and the unpermute gather (forward and backward) are bit-identical
    # from run to run and, on CPU, for any thread count.
    T, h, E, k, S = 700, 40, 32, 4, 2
    logits = torch.randn(T, E, device=device)
    x = torch.randn(T, h, device=device)
    y_perm = torch.randn(T * k, h, device=device)
    grad_y = torch.randn(T, h, device=device)

    def run():
        w, ids, counts, sums = ops.gate(logits, k, True, None, S)
        x_perm, row_map, off = ops.permute(x, ids, E)
        y = ops.unpermute(y_perm, row_map, w)
        gyp, gw = torch.ops.dsmoe.unpermute_backward(grad_y, y_perm, row_map, w)
        gx = torch.ops.dsmoe.permute_backward(y_perm, row_map, k)
        return w, ids, counts, sums, x_perm, row_map, off, y, gyp, gw, gx

    first = run()
    runs = [run()]
    if device == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runs.append(run())
        finally:
            torch.set_num_threads(threads)
    for other in runs:
        for a, b in zip(first, other):
            assert torch.equal(a, b)
