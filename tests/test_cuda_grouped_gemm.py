"""CUDA grouped_gemm and grouped_gemm_wgrad against fp64 references and the CPU op.

Every path of the CUDA kernels is checked on the GPU at hand: the default choice (Hopper CUTLASS 3
kernels on sm_90, CUTLASS 2 on other sm_80+), the sm_80 kernels forced (they run on Hopper too),
and the CUDA-core fallback (fp32/fp64, K or N not a multiple of 8, unaligned pointers). Each case
poisons the allocator with NaN first, so an output element that no kernel writes is caught.
Skipped when no GPU is visible.
"""
from __future__ import annotations

import pytest
import torch

import dsmoe
from dsmoe import ops
from conftest import offsets_from_counts

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

_gg = torch.ops.dsmoe.grouped_gemm
_wgrad = torch.ops.dsmoe.grouped_gemm_wgrad


@pytest.fixture(autouse=True)
def _cuda_build():
    assert dsmoe.build_info()["cuda"], "a GPU is visible but dsmoe was built without CUDA kernels"


# Paths: "auto" (the default choice), "sm80" (CUTLASS 2 kernels preferred), "simt" (CUDA-core).
PATHS = ["auto", "sm80", "simt"]


@pytest.fixture(params=PATHS)
def path(request):
    with dsmoe.use_backend(cuda_gemm_path=request.param):
        yield request.param


# (group sizes, K, N): K and N multiples of 8 reach the tensor-core paths in bf16/fp16.
CASES = [
    ([0, 0, 37, 0, 0], 64, 128),  # all groups empty but one
    (list(range(1, 18)), 128, 64),  # group sizes 1..17
    ([0, 5, 0, 0, 130, 1, 0], 96, 200),
    ([300, 0, 257, 128, 129, 64, 1, 500], 352, 704),
    ([1000], 256, 352),  # one expert, N just over a multiple of 128 (narrow tile on Hopper)
    ([3, 0, 40], 37, 45),  # K, N not multiples of 8: CUDA-core kernel
    ([9, 17, 2], 100, 72),  # K % 8 == 4
    ([0, 0, 0], 64, 64),  # no rows at all
    ([4, 4], 8, 8),
]
IDS = [f"E{len(c)}_rows{sum(c)}_K{k}_N{n}" for c, k, n in CASES]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
# Relative error bound of ||out - ref|| / ||ref|| against the fp64 product of the same inputs:
# one rounding of the output to the dtype (fp32 accumulation) for 16-bit types.
REL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-12}


def _poison(shape, dtype):
    """Fills the allocator's next block of this size with NaN, so unwritten outputs show."""
    t = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    del t


def _rand(*shape, dtype, device="cuda"):
    return torch.randn(*shape, dtype=torch.float64).to(dtype).to(device)


def _ref_forward(a, b, counts, trans_b):
    a64, b64 = a.double().cpu(), b.double().cpu()
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(a.shape[0], N, dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts):
        w = b64[e].t() if trans_b else b64[e]
        out[start : start + n] = a64[start : start + n] @ w
        start += n
    return out


def _ref_wgrad(a, grad_c, counts, trans_b):
    a64, g64 = a.double().cpu(), grad_c.double().cpu()
    E, K, N = len(counts), a.shape[1], grad_c.shape[1]
    out = torch.zeros(E, N, K, dtype=torch.float64) if trans_b else torch.zeros(E, K, N, dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts):
        ag, gg = a64[start : start + n], g64[start : start + n]
        out[e] = gg.t() @ ag if trans_b else ag.t() @ gg
        start += n
    return out


def _check(out, ref, dtype, what):
    assert out.dtype == dtype and out.device.type == "cuda", what
    assert tuple(out.shape) == tuple(ref.shape), what
    got = out.double().cpu()
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (an element was never written)"
    if ref.numel() == 0:
        return
    denom = float(ref.norm())
    if denom == 0.0:
        assert float(got.abs().max()) == 0.0, f"{what}: expected exact zeros"
        return
    rel = float((got - ref).norm()) / denom
    assert rel < REL[dtype], f"{what}: relative error {rel:.3g} >= {REL[dtype]:.1g}"
    # and element-wise, at the scale of the values
    scale = float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=4 * REL[dtype], atol=4 * REL[dtype] * scale, msg=what)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_forward(path, case, dtype, trans_b):
    counts, K, N = case
    if path != "auto" and dtype in (torch.float32, torch.float64):
        pytest.skip("fp32/fp64 always take the CUDA-core path")
    E, rows = len(counts), sum(counts)
    a = _rand(rows, K, dtype=dtype)
    b = _rand(E, N, K, dtype=dtype) if trans_b else _rand(E, K, N, dtype=dtype)
    offsets = offsets_from_counts(counts, "cuda")
    _poison((rows, N), dtype)
    out = _gg(a, b, offsets, trans_b)
    _check(out, _ref_forward(a, b, counts, trans_b), dtype, f"forward {path} {dtype} trans_b={trans_b}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_wgrad(path, case, dtype, trans_b):
    counts, K, N = case
    if path != "auto" and dtype in (torch.float32, torch.float64):
        pytest.skip("fp32/fp64 always take the CUDA-core path")
    E, rows = len(counts), sum(counts)
    a = _rand(rows, K, dtype=dtype)
    grad_c = _rand(rows, N, dtype=dtype)
    offsets = offsets_from_counts(counts, "cuda")
    _poison((E, N, K) if trans_b else (E, K, N), dtype)
    out = _wgrad(a, grad_c, offsets, trans_b)
    ref = _ref_wgrad(a, grad_c, counts, trans_b)
    _check(out, ref, dtype, f"wgrad {path} {dtype} trans_b={trans_b}")
    for e, n in enumerate(counts):
        if n == 0:
            assert int((out[e] != 0).sum()) == 0, f"expert {e} has no rows: its gradient must be zeros"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_matches_cpu_op(dtype, trans_b):
    counts, K, N = [130, 0, 7, 64, 301], 128, 136
    E, rows = len(counts), sum(counts)
    a = _rand(rows, K, dtype=dtype)
    b = _rand(E, N, K, dtype=dtype) if trans_b else _rand(E, K, N, dtype=dtype)
    grad_c = _rand(rows, N, dtype=dtype)
    off = offsets_from_counts(counts)
    fwd_cpu = _gg(a.cpu(), b.cpu(), off, trans_b).double()
    wg_cpu = _wgrad(a.cpu(), grad_c.cpu(), off, trans_b).double()
    _check(_gg(a, b, off.cuda(), trans_b), fwd_cpu, dtype, "forward vs CPU op")
    _check(_wgrad(a, grad_c, off.cuda(), trans_b), wg_cpu, dtype, "wgrad vs CPU op")


@pytest.mark.parametrize("tile", ["wide", "narrow"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_hopper_tiles(tile, dtype, trans_b):
    """Both Hopper tile shapes (each is chosen only for some N by default); on other GPUs this
    runs the default path, which ignores the tile."""
    with dsmoe.use_backend(cuda_gemm_tile=tile):
        _hopper_tiles_case(tile, dtype, trans_b)


def _hopper_tiles_case(tile, dtype, trans_b):
    counts = [257, 0, 1, 128, 640, 33, 0, 300]
    K, N = 192, 384
    E, rows = len(counts), sum(counts)
    a = _rand(rows, K, dtype=dtype)
    b = _rand(E, N, K, dtype=dtype) if trans_b else _rand(E, K, N, dtype=dtype)
    grad_c = _rand(rows, N, dtype=dtype)
    off = offsets_from_counts(counts, "cuda")
    _poison((rows, N), dtype)
    _check(_gg(a, b, off, trans_b), _ref_forward(a, b, counts, trans_b), dtype, f"forward tile={tile}")
    _poison((E, N, K) if trans_b else (E, K, N), dtype)
    _check(_wgrad(a, grad_c, off, trans_b), _ref_wgrad(a, grad_c, counts, trans_b), dtype, f"wgrad tile={tile}")


def test_dispatch(capfd):
    """The path each call takes, as the kernels report it (the cuda_gemm_verbose setting)."""
    with dsmoe.use_backend(cuda_gemm_verbose=True):
        _dispatch_case(capfd)


def _dispatch_case(capfd):
    major = torch.cuda.get_device_capability()[0]
    cutlass = dsmoe.build_info()["cutlass"]
    off = offsets_from_counts([5, 0, 11], "cuda")

    def run(dtype, K, N, a_offset=0):
        buf = _rand(16 * K + a_offset, dtype=dtype)
        a = buf[a_offset:].view(16, K)
        b = _rand(3, N, K, dtype=dtype)
        _gg(a, b, off, True)
        torch.cuda.synchronize()
        err = capfd.readouterr().err
        return err.split("path=")[-1].split()[0]

    tensor_cores = "sm90" if major == 9 and "9.0a" in dsmoe.build_info()["cuda_archs"] else "sm80"
    expected = tensor_cores if cutlass and major >= 8 else "simt"
    assert run(torch.bfloat16, 64, 128) == expected
    assert run(torch.float16, 64, 128) == expected
    assert run(torch.float32, 64, 128) == "simt"
    assert run(torch.bfloat16, 60, 128) == "simt"  # K % 8 != 0
    assert run(torch.bfloat16, 64, 128, a_offset=1) == "simt"  # a not 16-byte aligned
    with dsmoe.use_backend(cuda_gemm_path="sm80"):
        assert run(torch.bfloat16, 64, 128) == ("sm80" if cutlass and major >= 8 else "simt")


def test_unaligned_pointer():
    """A view whose data starts 2 bytes into an allocation goes to the CUDA-core kernel."""
    counts, K, N = [7, 0, 20], 64, 64
    rows = sum(counts)
    a = _rand(rows * K + 1, dtype=torch.bfloat16)[1:].view(rows, K)
    b = _rand(3, N, K, dtype=torch.bfloat16)
    off = offsets_from_counts(counts, "cuda")
    _check(_gg(a, b, off, True), _ref_forward(a, b, counts, True), torch.bfloat16, "unaligned a")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_backward(dtype, trans_b):
    """Autograd through ops.grouped_gemm: d a by grouped_gemm with the other layout, d b by the
    variable-K wgrad, both against fp64 autograd of the per-group reference."""
    counts, K, N = [33, 0, 128, 5, 200], 64, 96
    E, rows = len(counts), sum(counts)
    a = _rand(rows, K, dtype=dtype).requires_grad_()
    b = (_rand(E, N, K, dtype=dtype) if trans_b else _rand(E, K, N, dtype=dtype)).requires_grad_()
    w = _rand(rows, N, dtype=dtype)
    off = offsets_from_counts(counts, "cuda")
    (ops.grouped_gemm(a, b, off, trans_b) * w).sum().backward()

    a64 = a.detach().double().cpu().requires_grad_()
    b64 = b.detach().double().cpu().requires_grad_()
    pieces, start = [], 0
    for e, n in enumerate(counts):
        wt = b64[e].t() if trans_b else b64[e]
        pieces.append(a64[start : start + n] @ wt)
        start += n
    (torch.cat(pieces) * w.double().cpu()).sum().backward()
    _check(a.grad, a64.grad, dtype, "d a")
    _check(b.grad, b64.grad, dtype, "d b")
    assert float(b.grad[1].abs().max()) == 0.0, "expert 1 has no rows: its gradient must be zeros"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_graph_capture(dtype):
    """Both ops captured in a CUDA graph (no host sync, no host-side group sizes) and replayed
    after new routing and new inputs are copied into the captured tensors."""
    E, rows, K, N = 6, 512, 128, 192
    a = _rand(rows, K, dtype=dtype)
    b = _rand(E, N, K, dtype=dtype)
    grad_c = _rand(rows, N, dtype=dtype)
    off = offsets_from_counts([100, 0, 12, 300, 0, 100], "cuda")
    # warm-up on a side stream (the Hopper path sets kernel attributes on first use)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _gg(a, b, off, True)
        _wgrad(a, grad_c, off, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _gg(a, b, off, True)
        dw = _wgrad(a, grad_c, off, True)
    for counts in ([0, 0, 512, 0, 0, 0], [1, 2, 3, 4, 5, 497], [100, 0, 12, 300, 0, 100]):
        off.copy_(offsets_from_counts(counts, "cuda"))
        a.copy_(_rand(rows, K, dtype=dtype))
        grad_c.copy_(_rand(rows, N, dtype=dtype))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, _ref_forward(a, b, counts, True), dtype, f"graph forward {counts}")
        _check(dw, _ref_wgrad(a, grad_c, counts, True), dtype, f"graph wgrad {counts}")


def test_noncontiguous_inputs():
    counts, K, N = [10, 0, 30], 64, 64
    rows = sum(counts)
    a = _rand(rows, 2 * K, dtype=torch.bfloat16)[:, ::2]
    b = _rand(3, K, N, dtype=torch.bfloat16).transpose(1, 2)  # [E, N, K] view, not contiguous
    assert not a.is_contiguous() and not b.is_contiguous()
    off = offsets_from_counts(counts, "cuda")
    _check(_gg(a, b, off, True), _ref_forward(a, b, counts, True), torch.bfloat16, "non-contiguous")
    g = _rand(rows, 2 * N, dtype=torch.bfloat16)[:, ::2]
    _check(_wgrad(a, g, off, False), _ref_wgrad(a, g, counts, False), torch.bfloat16, "non-contiguous wgrad")


def test_opcheck():
    off = offsets_from_counts([3, 0, 5], "cuda")
    a = _rand(8, 16, dtype=torch.bfloat16)
    b = _rand(3, 16, 24, dtype=torch.bfloat16)
    g = _rand(8, 24, dtype=torch.bfloat16)
    torch.library.opcheck(_gg.default, (a, b, off, False))
    torch.library.opcheck(_wgrad.default, (a, g, off, False))


def test_bad_inputs():
    a = _rand(8, 16, dtype=torch.bfloat16)
    b = _rand(3, 16, 24, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="expert_offsets"):
        _gg(a, b, offsets_from_counts([3, 0, 5]), False)  # offsets on the CPU
    with pytest.raises(RuntimeError, match="dtype"):
        _gg(a, b.float(), offsets_from_counts([3, 0, 5], "cuda"), False)
    with pytest.raises(ValueError, match="cuda_gemm_path must be one of"):
        dsmoe.set_backend(cuda_gemm_path="fastest")
