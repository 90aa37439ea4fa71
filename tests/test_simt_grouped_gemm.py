"""The CUDA-core (SIMT) grouped GEMM of csrc/cuda/grouped_gemm.cu -- forward, weight gradient and
the zeroing of rows outside every group -- against fp64 references, on every backend of
kernel_backends.py: in the SIMT emulator always (CI), on a GPU when one is visible (there the
default path may be a tensor-core one; the zero rows are checked on whichever path runs).
The shapes are those of test_cuda_grouped_gemm.py (empty groups, one group, K/N not multiples of 8).
"""
from __future__ import annotations

import pytest
import torch

from conftest import offsets_from_counts, routing
from kernel_backends import kernels_params, make_kernels
from test_cuda_grouped_gemm import CASES, DTYPES, IDS, REL, _ref_forward, _ref_wgrad


@pytest.fixture(params=kernels_params(), scope="module")
def kern(request):
    return make_kernels(request.param)


def _rand(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _check(got, ref, dtype, what):
    got = got.double()
    assert tuple(got.shape) == tuple(ref.shape), what
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (an element was never written)"
    if ref.numel() == 0 or float(ref.norm()) == 0.0:
        assert got.numel() == 0 or float(got.abs().max()) == 0.0, f"{what}: expected exact zeros"
        return
    rel = float((got - ref).norm()) / float(ref.norm())
    assert rel < REL[dtype], f"{what}: relative error {rel:.3g} >= {REL[dtype]:.1g}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_forward_and_wgrad(kern, case, dtype, trans_b):
    counts, K, N = case
    E, rows = len(counts), sum(counts)
    a = _rand(rows, K, dtype=dtype)
    b = _rand(E, N, K, dtype=dtype) if trans_b else _rand(E, K, N, dtype=dtype)
    grad_c = _rand(rows, N, dtype=dtype)
    offsets = offsets_from_counts(counts)
    out = kern.run("grouped_gemm", a, b, offsets, trans_b)
    assert out.dtype == dtype
    _check(out, _ref_forward(a, b, counts, trans_b), dtype, f"forward {dtype} trans_b={trans_b}")
    dw = kern.run("grouped_gemm_wgrad", a, grad_c, offsets, trans_b)
    _check(dw, _ref_wgrad(a, grad_c, counts, trans_b), dtype, f"wgrad {dtype} trans_b={trans_b}")
    for e, n in enumerate(counts):
        if n == 0:
            assert int((dw[e] != 0).sum()) == 0, f"expert {e} has no rows: its gradient must be zeros"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rows_outside_every_group_are_zero(kern, dtype):
    # Groups cover rows [3, rows - 5): the 3 rows before and the 5 after belong to no expert.
    counts, K, N = [0, 7, 0, 20, 1], 64, 48
    rows = 3 + sum(counts) + 5
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32) + 3
    a = _rand(rows, K, dtype=dtype)
    b = _rand(len(counts), N, K, dtype=dtype)
    out = kern.run("grouped_gemm", a, b, offsets.contiguous(), True)
    assert float(out[:3].double().abs().max()) == 0.0 and float(out[-5:].double().abs().max()) == 0.0
    inner = _ref_forward(a[3:-5], b, counts, True)
    _check(out[3:-5], inner, dtype, "grouped rows")


def test_out_of_range_ids_contribute_nothing(kern):
    # permute puts ids outside [0, E) after the last expert; the GEMM writes zeros there, so the
    # unpermute of the chain sums the valid experts only.
    T, h, N, E, k = 200, 32, 24, 8, 3
    ids = routing(T, k, E, "cpu")
    bad = torch.rand(T, k) < 0.15
    ids[bad] = torch.where(torch.rand(int(bad.sum())) < 0.5, -1, E).to(torch.int32)
    x, w_b, weights = torch.randn(T, h), torch.randn(E, N, h), torch.rand(T, k)
    x_perm, row_map, offsets = kern.run("permute", x, ids, E)
    y_perm = kern.run("grouped_gemm", x_perm, w_b, offsets, True)
    y = kern.run("unpermute", y_perm, row_map, weights)
    valid = (ids >= 0) & (ids < E)
    ref = torch.zeros(T, N, dtype=torch.float64)
    for j in range(k):
        e = ids[:, j].clamp(0, E - 1).long()
        contrib = torch.einsum("th,tnh->tn", x.double(), w_b.double()[e]) * weights[:, j:j + 1].double()
        ref += torch.where(valid[:, j:j + 1], contrib, torch.zeros_like(contrib))
    _check(y, ref, torch.float32, "chain with out-of-range ids")


def test_more_groups_than_one_scan_block(kern):
    # The tile offsets are scanned by one block of 1024 threads, 1024 groups at a time with the
    # running total carried over: 1300 groups (many empty) take two chunks.
    gen = torch.Generator().manual_seed(0)
    counts = (torch.randint(0, 4, (1300,), generator=gen) * (torch.rand(1300, generator=gen) < 0.3)).tolist()
    K, N = 8, 8
    rows = sum(counts)
    a = _rand(rows, K, dtype=torch.float32)
    b = _rand(len(counts), N, K, dtype=torch.float32)
    out = kern.run("grouped_gemm", a, b, offsets_from_counts(counts), True)
    _check(out, _ref_forward(a, b, counts, True), torch.float32, "forward, 1300 groups")
    assert sum(c > 0 for c in counts[1024:]) > 50  # groups with rows in the second chunk
