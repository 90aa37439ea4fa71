"""dsmoe's CUDA kernels against its CPU kernels (and fp64 truth) on random inputs: integers
exactly, floats within per-dtype tolerances. Plus what only the CUDA kernels have: every output
element written (new memory is poisoned before each call), CUDA-graph capture, run-to-run
determinism, the CUDA-only behaviour for out-of-range ids, and the CUDA limits.

Every test runs on each backend of kernel_backends.py: "cuda" on a GPU (skipped when none is
visible), and "simt", the same .cu sources executed on the CPU by the SIMT emulator (always: this
is how CI, which has no GPU, executes the CUDA kernels; each call runs in two thread orders).
"""
from __future__ import annotations

import pytest
import torch

from dsmoe import ops
from conftest import assert_close, routing
from kernel_backends import kernels_params, make_kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(params=kernels_params(), scope="module")
def kern(request):
    return make_kernels(request.param)


# ---------------------------------------------------------------- gate


def _gate_truth(logits, bias):
    """fp64 probs and selection keys of the logits as given (after their dtype's rounding)."""
    p = torch.softmax(logits.double().cpu(), -1)
    keys = p + bias.double().cpu() if bias is not None else p
    return p, keys


def _ambiguous_rows(keys, k, tol=1e-5):
    """Rows whose top-(k+1) keys hold a near tie that is not an exact tie: rounding may order
    those differently on two devices. Exact ties (equal inputs) must resolve the same way."""
    top = keys.sort(dim=-1, descending=True, stable=True).values[:, : k + 1]
    gaps = top[:, :-1] - top[:, 1:]
    return ((gaps > 0) & (gaps < tol * top[:, :-1].abs().clamp_min(1.0))).any(-1)


def check_gate(out, cpu_out, logits, k, normalize, bias, S, tol=1e-5):
    w, ids, counts, sums = out
    cw, cids, ccounts, csums = cpu_out
    T, E = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert w.dtype == acc and sums.dtype == acc and ids.dtype == torch.int32 and counts.dtype == torch.int32
    assert w.shape == (T, k) and ids.shape == (T, k) and counts.shape == (S, E) and sums.shape == (S, E)
    p, keys = _gate_truth(logits, bias)
    amb = _ambiguous_rows(keys, k, tol)
    ok = ~amb
    assert torch.equal(ids[ok], cids[ok]), "expert ids differ from the CPU on rows without near ties"
    if T:
        assert int(ids.min()) >= 0 and int(ids.max()) < E
        assert all(len(set(r)) == k for r in ids.tolist())
    for t in amb.nonzero().flatten().tolist():  # a valid top-k, within rounding
        chosen = keys[t, ids[t].long()]
        rest = keys[t].clone()
        rest[ids[t].long()] = -float("inf")
        assert bool((chosen[:-1] >= chosen[1:] - tol).all())
        assert float(chosen.min()) >= float(rest.max()) - tol
    # weights: the fp64 probs of the chosen experts (renormalised as the kernels do)
    ref_w = p.gather(1, ids.long())
    if normalize:
        ref_w = ref_w / (ref_w.sum(-1, keepdim=True) + 1e-20)
    assert_close(w, ref_w.to(acc), acc)
    assert_close(cw[ok], ref_w[ok].to(acc), acc)
    # counts from the kernel's own ids (exact); equal to the CPU's where the ids are
    L = T // S if S else 0
    own = torch.zeros(S, E, dtype=torch.int32)
    if T:
        own.scatter_add_(1, ids.view(S, L * k).long(), torch.ones(S, L * k, dtype=torch.int32))
    assert torch.equal(counts, own)
    if not bool(amb.any()):
        assert torch.equal(counts, ccounts)
    ref_sums = p.view(S, L, E).sum(1) if T else torch.zeros(S, E, dtype=torch.float64)
    scale = max(1.0, float(L) / E)
    assert_close(sums, ref_sums.to(acc), acc, scale=scale)
    assert_close(csums, ref_sums.to(acc), acc, scale=scale)


# (T, E, k, num_seqs): one-token and tiny rows, E not a power of two, k = E, every layout of the
# kernel (E <= 16, 32, 64, 128, 256, 512, 1024), sequences split over several blocks.
GATE_SHAPES = [
    (1, 1, 1, 1),
    (1, 8, 8, 1),
    (7, 5, 2, 1),
    (24, 17, 17, 3),
    (33, 63, 7, 3),
    (100, 64, 6, 4),
    (683, 64, 6, 1),
    (4096, 64, 6, 1),
    (4096, 64, 6, 16),
    (3000, 160, 6, 3),
    (1000, 256, 16, 2),
    (257, 256, 8, 1),
    (130, 300, 10, 2),
    (64, 512, 12, 1),
    (40, 1024, 16, 2),
    (40, 1000, 1, 1),
    (0, 64, 6, 1),
]


@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: "T{}E{}k{}S{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gate_matches_cpu(kern, shape, dtype):
    T, E, k, S = shape
    logits = (torch.randn(T, E, dtype=torch.float64) * 2).to(dtype)
    for normalize in (False, True):
        out = kern.run("gate", logits, k, normalize, None, S)
        check_gate(out, ops.gate(logits, k, normalize, None, S), logits, k, normalize, None, S)


@pytest.mark.parametrize("E,k", [(16, 4), (64, 6), (256, 8), (1024, 16)])
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64])
def test_gate_selection_bias_matches_cpu(kern, E, k, bias_dtype):
    T, S = 512, 2
    logits = torch.randn(T, E) * 2
    bias = (torch.rand(E, dtype=torch.float64) * 0.2 - 0.1).to(bias_dtype)
    for normalize in (False, True):
        out = kern.run("gate", logits, k, normalize, bias, S)
        check_gate(out, ops.gate(logits, k, normalize, bias, S), logits, k, normalize, bias, S)


@pytest.mark.parametrize("E", [12, 64, 256, 1024])
def test_gate_ties_match_cpu_exactly(kern, E):
    # Small integer logits tie everywhere: the order must be the CPU's (lower id first).
    # (fewer tokens on the emulator for the widest rows: k = E = 1024 is 1024 rounds of shuffles)
    logits = torch.randint(-2, 3, (300 if not kern.is_simt or E < 256 else 60, E)).to(torch.bfloat16)
    # bias 0 or 4 (> any prob): it reorders whole groups without making new near ties
    bias = torch.randint(0, 2, (E,)).float() * 4.0
    for k in sorted({1, 4, min(E, 12), E}):
        for b in (None, bias):
            cw, cids, ccounts, csums = ops.gate(logits, k, True, b, 3)
            w, ids, counts, sums = kern.run("gate", logits, k, True, b, 3)
            assert torch.equal(ids, cids)
            assert torch.equal(counts, ccounts)
            assert_close(w, cw, torch.float32)
            assert_close(sums, csums, torch.float32, scale=100.0)


def test_gate_nan_rows_match_cpu(kern):
    for E, k in [(6, 3), (64, 6), (300, 7)]:
        logits = torch.randn(8, E)
        logits[1] = float("nan")
        logits[2, 3] = float("nan")
        logits[4] = -float("inf")
        bias = torch.zeros(E)
        bias[E // 2] = float("nan")
        for b in (None, bias):
            cw, cids, ccounts, _ = ops.gate(logits, k, False, b, 1)
            w, ids, counts, _ = kern.run("gate", logits, k, False, b, 1)
            assert torch.equal(ids, cids)
            assert torch.equal(counts, ccounts)
            torch.testing.assert_close(w, cw, equal_nan=True, rtol=2e-5, atol=2e-5)


def test_gate_sequences_of_any_length(kern):
    # One token per sequence up to one sequence: every tiling of the statistics.
    T, E, k = 4096, 64, 6
    logits = torch.randn(T, E)
    for S in (1, 2, 4, 64, 4096):
        out = kern.run("gate", logits, k, False, None, S)
        check_gate(out, ops.gate(logits, k, False, None, S), logits, k, False, None, S)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (24, 10, 3, 2), (64, 63, 7, 4), (6, 6, 6, 1),
                                   (1000, 256, 16, 4), (300, 1024, 8, 3), (2000, 64, 6, 1)],
                         ids=lambda s: "T{}E{}k{}S{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gate_backward_matches_cpu(kern, shape, dtype):
    T, E, k, S = shape
    logits = (torch.randn(T, E, dtype=torch.float64) * 2).to(dtype)
    ids = ops.gate(logits, k, False, None, S).expert_ids
    gw = torch.randn(T, k)
    gs = torch.randn(S, E)
    for normalize in (False, True):
        ref = torch.ops.dsmoe.gate_backward(gw, gs, logits, ids, normalize, S)
        got = kern.run("gate_backward", gw, gs, logits, ids, normalize, S)
        assert got.dtype == dtype
        assert_close(got, ref, dtype, scale=max(1.0, float(ref.abs().max()) if ref.numel() else 1.0))


def test_gate_autograd_on_cuda(kern):
    kern.require_cuda("autograd of the dsmoe ops on CUDA tensors")
    T, E, k, S = 256, 64, 6, 2
    logits = torch.randn(T, E, dtype=torch.float64)
    bias = torch.randn(E, dtype=torch.float64) * 0.05
    gw, gs = torch.randn(T, k, dtype=torch.float64), torch.randn(S, E, dtype=torch.float64)
    grads = []
    for dev in ("cpu", "cuda"):
        x = logits.to(dev).detach().requires_grad_()  # a fresh leaf on each device
        w, _, _, sums = ops.gate(x, k, True, bias.to(dev), S)
        ((w * gw.to(dev)).sum() + (sums * gs.to(dev)).sum()).backward()
        grads.append(x.grad.cpu())
    assert_close(grads[1], grads[0], torch.float64, scale=float(grads[0].abs().max()))


def test_gate_cuda_expert_limit(kern):
    with pytest.raises(RuntimeError, match=r"the CUDA kernel supports num_experts <= 1024"):
        kern.op("gate")(torch.randn(4, 1025, device=kern.device), 2, False, None, 1)
    with pytest.raises(RuntimeError, match=r"the CUDA kernel supports num_experts <= 1024"):
        dev = kern.device
        kern.op("gate_backward")(
            torch.zeros(4, 2, device=dev), torch.zeros(1, 1025, device=dev),
            torch.randn(4, 1025, device=dev), torch.zeros(4, 2, dtype=torch.int32, device=dev), False, 1)


# ---------------------------------------------------------------- permute


# (T, h, E, k, routing): the single-kernel routing (M <= 4096 with 8 warps) and the multi-tile one
# on either side of the boundary, experts without tokens, one hot expert, h not a multiple of 8,
# E = 256 with k = 16, E large enough to cut the warps per block, and to grow the segments.
PERMUTE_SHAPES = [
    (1, 1, 1, 1, "uniform"),
    (5, 7, 3, 2, "uniform"),
    (64, 33, 16, 4, "skewed"),
    (100, 24, 64, 6, "sparse"),
    (37, 130, 8, 8, "uniform"),
    (682, 16, 64, 6, "uniform"),
    (683, 16, 64, 6, "uniform"),
    (2000, 2048, 64, 6, "skewed"),
    (4096, 8, 256, 16, "uniform"),
    (1500, 40, 64, 6, "sparse"),
    (300, 4, 5000, 2, "uniform"),
    (3000, 4, 8192, 2, "uniform"),
    (5, 0, 4, 2, "uniform"),
    (0, 8, 4, 2, "uniform"),
]


def _pid(s):
    return "T{}h{}E{}k{}-{}".format(*s)


@pytest.mark.parametrize("shape", PERMUTE_SHAPES, ids=_pid)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_matches_cpu(kern, shape, dtype):
    T, h, E, k, mode = shape
    x = torch.randn(T, h).to(dtype)
    ids = routing(T, k, E, "cpu", mode)
    ref = ops.permute(x, ids, E)
    got = kern.run("permute", x, ids, E)
    for name, a, b in zip(("x_perm", "row_map", "expert_offsets"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name  # integer math and copies: bit-exact


def test_permute_one_hot_expert(kern):
    T, h, E, k = 5000, 64, 64, 6
    ids = routing(T, k, E, "cpu", "uniform")
    ids[:, 0] = 0  # every token picks expert 0 (routing keeps the rows distinct otherwise)
    ids[:, 1:] = torch.where(ids[:, 1:] == 0, torch.full_like(ids[:, 1:], E - 1), ids[:, 1:])
    x = torch.randn(T, h, dtype=torch.bfloat16)
    ref = ops.permute(x, ids, E)
    got = kern.run("permute", x, ids, E)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_permute_misaligned_rows(kern):
    # x one element off 16 bytes: the copy falls back to narrower units.
    T, h, E, k = 300, 64, 16, 4
    ids = routing(T, k, E, "cpu")
    for dtype in DTYPES:
        x = torch.randn(T, h).to(dtype)
        ref = ops.permute(x, ids, E)
        xc = kern.misaligned(x)
        kern.poison()
        got = [o.cpu() for o in kern.op("permute")(xc, kern.to(ids), E)]
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


@pytest.mark.parametrize("M_tokens", [300, 5000])
def test_permute_out_of_range_ids_go_last(kern, M_tokens):
    # CUDA cannot raise on values without a device-to-host copy: ids outside [0, E) get the rows
    # after the last expert, in entry order, filled with zeros; row_map stays a permutation.
    T, h, E, k = M_tokens, 8, 10, 3
    ids = routing(T, k, E, "cpu")
    bad = torch.rand(T, k) < 0.1
    ids[bad] = torch.where(torch.rand(int(bad.sum())) < 0.5, -1, E).to(torch.int32)
    x = torch.randn(T, h)
    x_perm, row_map, offsets = kern.run("permute", x, ids, E)
    flat = ids.flatten()
    valid = (flat >= 0) & (flat < E)
    n_valid = int(valid.sum())
    assert int(offsets[E]) == n_valid and int(offsets[0]) == 0
    assert torch.equal(row_map.sort().values, torch.arange(T * k, dtype=torch.int32))
    # valid entries: the CPU's routing of the valid entries alone (stable by expert)
    order = torch.argsort(torch.where(valid, flat, E), stable=True)
    expected = torch.empty_like(row_map)
    expected[order] = torch.arange(T * k, dtype=torch.int32)
    assert torch.equal(row_map, expected)
    counts = torch.bincount(flat[valid].long(), minlength=E)
    assert torch.equal(offsets[1:] - offsets[:-1], counts.to(torch.int32))
    copies = x.repeat_interleave(k, 0)
    copies[~valid] = 0  # the rows of dropped entries are zeros, as on the CPU
    assert torch.equal(x_perm[row_map.long()], copies)


@pytest.mark.parametrize("T", [300, 5000])  # single-kernel and multi-tile routing
def test_permute_int64_ids_as_int32(kern, T):
    # transformers' routers give int64 ids, read as given; ids >= E (expert-parallel sentinels)
    # go after the last expert, as with int32 ids; row_map and offsets stay int32.
    h, E, k = 16, 10, 3
    ids = routing(T, k, E, "cpu")
    ids[torch.rand(T, k) < 0.1] = E + 3
    x = torch.randn(T, h)
    got64 = kern.run("permute", x, ids.long(), E)
    got32 = kern.run("permute", x, ids, E)
    for name, a, b in zip(("x_perm", "row_map", "expert_offsets"), got64, got32):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert got64[1].dtype == torch.int32 and got64[2].dtype == torch.int32
    cpu = ops.permute(x, ids.long(), E)  # the CPU drops them the same way
    assert torch.equal(cpu.row_map, got64[1]) and torch.equal(cpu.expert_offsets, got64[2])
    assert torch.equal(cpu.x_perm, got64[0])  # dropped rows are zeros on both


def test_permute_cuda_expert_limit(kern):
    x = torch.randn(4, 8, device=kern.device)
    ids = torch.zeros(4, 2, dtype=torch.int32, device=kern.device)
    with pytest.raises(RuntimeError, match=r"the CUDA kernel supports num_experts <= 8192"):
        kern.op("permute")(x, ids, 8193)


# (T, h, k): h of one element, odd, a multiple of 8 or not, wide rows
GATHER_SHAPES = [(1, 1, 1), (5, 7, 2), (64, 8, 6), (37, 130, 8), (300, 2048, 6), (50, 2050, 3),
                 (20, 24, 20), (0, 8, 2), (4, 0, 2)]


def _routing_map(T, k, E=16):
    ids = routing(T, k, max(E, k), "cpu")
    return ops.permute(torch.zeros(T, 1), ids, max(E, k)).row_map


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "T{}h{}k{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpermute_and_backward_match_cpu(kern, shape, dtype):
    T, h, k = shape
    row_map = _routing_map(T, k)
    y_perm = torch.randn(T * k, h).to(dtype)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.rand(T, k, dtype=wdtype)
    grad_y = torch.randn(T, h).to(dtype)
    scale = float(k) ** 0.5
    assert_close(kern.run("unpermute", y_perm, row_map, weights), ops.unpermute(y_perm, row_map, weights),
                 dtype, scale=scale)
    assert_close(kern.run("permute_backward", y_perm, row_map, k),
                 torch.ops.dsmoe.permute_backward(y_perm, row_map, k), dtype, scale=scale)
    gyp, gw = kern.run("unpermute_backward", grad_y, y_perm, row_map, weights)
    rgyp, rgw = torch.ops.dsmoe.unpermute_backward(grad_y, y_perm, row_map, weights)
    assert gyp.dtype == dtype and gw.dtype == wdtype
    assert_close(gyp, rgyp, dtype)
    assert_close(gw, rgw, wdtype, scale=max(1.0, float(h) ** 0.5))


def test_unpermute_bf16_weights_and_misaligned(kern):
    T, h, k = 200, 64, 6
    row_map = _routing_map(T, k)
    for dtype in (torch.bfloat16, torch.float32):
        y_perm = torch.randn(T * k, h).to(dtype)
        weights = torch.rand(T, k).to(torch.bfloat16)
        grad_y = torch.randn(T, h).to(dtype)
        ref = ops.unpermute(y_perm, row_map, weights)
        rgyp, rgw = torch.ops.dsmoe.unpermute_backward(grad_y, y_perm, row_map, weights)
        yc, gc = kern.misaligned(y_perm), kern.misaligned(grad_y)
        mc, wc = kern.to(row_map), kern.to(weights)
        kern.poison()
        assert_close(kern.op("unpermute")(yc, mc, wc).cpu(), ref, dtype, scale=float(k) ** 0.5)
        kern.poison()
        gyp, gw = kern.op("unpermute_backward")(gc, yc, mc, wc)
        assert gw.dtype == torch.bfloat16
        assert_close(gyp.cpu(), rgyp, dtype)
        assert_close(gw.cpu(), rgw, torch.bfloat16, scale=float(h) ** 0.5)
        kern.poison()
        assert_close(kern.op("permute_backward")(yc, mc, k).cpu(),
                     torch.ops.dsmoe.permute_backward(y_perm, row_map, k), dtype, scale=float(k) ** 0.5)


def test_layer_routing_autograd_on_cuda(kern):
    kern.require_cuda("autograd of the dsmoe ops on CUDA tensors")
    # permute -> unpermute with autograd on both devices: the same gradients.
    T, h, E, k = 300, 40, 16, 4
    ids = routing(T, k, E, "cpu", "skewed")
    x0, w0, g = torch.randn(T, h), torch.rand(T, k), torch.randn(T, h)
    res = []
    for dev in ("cpu", "cuda"):
        x, w = x0.to(dev).detach().requires_grad_(), w0.to(dev).detach().requires_grad_()
        x_perm, row_map, _ = ops.permute(x, ids.to(dev), E)
        y = ops.unpermute(x_perm * 2.0, row_map, w)
        y.backward(g.to(dev))
        res.append((y.detach().cpu(), x.grad.cpu(), w.grad.cpu()))
    for a, b in zip(res[1], res[0]):
        assert_close(a, b, torch.float32, scale=float(h) ** 0.5)


# ---------------------------------------------------------------- swiglu

SWIGLU_SHAPES = [(1, 1), (7, 3), (64, 8), (33, 352), (100, 1408), (5, 1001), (0, 8), (4, 0)]


@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=lambda s: "M{}I{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_matches_cpu(kern, shape, dtype):
    M, I = shape
    gate_up = (torch.randn(M, 2 * I) * 3).to(dtype)
    grad = torch.randn(M, I).to(dtype)
    assert_close(kern.run("swiglu", gate_up), ops.swiglu(gate_up), dtype, scale=4.0)
    ref = torch.ops.dsmoe.swiglu_backward(grad, gate_up)
    assert_close(kern.run("swiglu_backward", grad, gate_up), ref, dtype, scale=4.0)


def test_swiglu_misaligned_and_mixed_grad_dtype(kern):
    M, I = 50, 64
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        gate_up = torch.randn(M, 2 * I).to(dtype)
        grad = torch.randn(M, I)  # fp32 grad for a bf16/fp16 activation is rounded first, as on the CPU
        gc = kern.misaligned(gate_up)
        kern.poison()
        assert_close(kern.op("swiglu")(gc).cpu(), ops.swiglu(gate_up), dtype, scale=4.0)
        kern.poison()
        got = kern.op("swiglu_backward")(kern.misaligned(grad), gc).cpu()
        assert_close(got, torch.ops.dsmoe.swiglu_backward(grad, gate_up), dtype, scale=4.0)


# ---------------------------------------------------------------- the chain: graphs, determinism


def _chain(ns, logits, x, grad_y, E, k, S):
    """gate -> permute -> (a stand-in expert: swiglu of [x_perm | flipped x_perm]) -> unpermute,
    and the backward ops, all on the current stream. Elementwise torch ops only besides dsmoe's,
    so every output is bitwise reproducible."""
    w, ids, counts, sums = ns.gate(logits, k, True, None, S)
    x_perm, row_map, offsets = ns.permute(x, ids, E)
    gate_up = torch.cat([x_perm, x_perm.flip(1)], 1)
    act = ns.swiglu(gate_up)
    y = ns.unpermute(act, row_map, w)
    d_act, d_w = ns.unpermute_backward(grad_y, act, row_map, w)
    d_gate_up = ns.swiglu_backward(d_act, gate_up)
    h = x.shape[1]
    d_x_perm = d_gate_up[:, :h] + d_gate_up[:, h:].flip(1)
    d_x = ns.permute_backward(d_x_perm, row_map, k)
    d_logits = ns.gate_backward(d_w, torch.ones_like(sums), logits, ids, True, S)
    return [w, ids, counts, sums, x_perm, row_map, offsets, y, d_act, d_w, d_gate_up, d_x, d_logits]


@pytest.mark.parametrize("T", [48, 2048])  # single-kernel routing, and multi-tile routing + stats
def test_cuda_graph_capture_and_replay(kern, T):
    kern.require_cuda("CUDA graphs")
    h, E, k, S = 64, 16, 4, 2
    dev = "cuda"
    logits, x = torch.randn(T, E, device=dev), torch.randn(T, h, device=dev)
    grad_y = torch.randn(T, h, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch requires
        for _ in range(2):
            _chain(kern.ns, logits, x, grad_y, E, k, S)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises on any host sync inside
        static_out = _chain(kern.ns, logits, x, grad_y, E, k, S)
    for _ in range(2):  # new inputs into the captured buffers
        logits.copy_(torch.randn(T, E, device=dev) * 2)
        x.copy_(torch.randn(T, h, device=dev))
        graph.replay()
        eager = _chain(kern.ns, logits, x, grad_y, E, k, S)
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(static_out, eager)):
            assert torch.equal(a, b), f"output {i} of the replayed graph differs from eager"


def test_outputs_are_deterministic(kern):
    T, h, E, k, S = 4096, 128, 64, 6, 4
    dev = kern.device
    logits, x = torch.randn(T, E, device=dev), torch.randn(T, h, device=dev)
    grad_y = torch.randn(T, h, device=dev)
    ns = kern.ns if not kern.is_simt else type("Ops", (), {n: staticmethod(kern.op(n)) for n in (
        "gate", "permute", "swiglu", "unpermute", "unpermute_backward", "swiglu_backward", "permute_backward",
        "gate_backward")})
    first = _chain(ns, logits, x, grad_y, E, k, S)
    for _ in range(3 if not kern.is_simt else 1):
        kern.poison()
        again = _chain(ns, logits, x, grad_y, E, k, S)
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"output {i} changed between identical runs"
