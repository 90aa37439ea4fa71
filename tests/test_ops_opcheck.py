"""torch.library.opcheck on every dsmoe op, the *_backward ops included: schema (no hidden
mutation or aliasing), autograd registration, fake kernels against the real ones, and AOT
dispatch with dynamic shapes."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import dsmoe.ops  # noqa: F401  (registers torch.ops.dsmoe: the samples below are built at import)
from conftest import offsets_from_counts, routing

OPS = torch.ops.dsmoe


def _samples(device):
    """(name, op, args) triples, a few per op, with inputs that require grad where the op is
    differentiable so the autograd registration is exercised."""
    f32, bf16 = torch.float32, torch.bfloat16

    def r(*shape, dtype=f32, grad=False):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=grad)

    s = []
    # gate
    s.append(("gate", OPS.gate.default, (r(8, 6, grad=True), 2, False, None, 1)))
    s.append(("gate_norm_bias_seqs", OPS.gate.default, (r(12, 5, grad=True), 3, True, r(5) * 0.1, 3)))
    s.append(("gate_bf16_k_eq_E", OPS.gate.default, (r(4, 4, dtype=bf16, grad=True), 4, True, None, 2)))
    ids = routing(8, 2, 6, device)
    s.append(("gate_backward", OPS.gate_backward.default, (r(8, 2), r(2, 6), r(8, 6), ids, True, 2)))
    s.append(("gate_backward_plain", OPS.gate_backward.default, (r(8, 2), r(1, 6), r(8, 6), ids, False, 1)))
    # permute
    ids3 = routing(10, 3, 7, device, "sparse")
    s.append(("permute", OPS.permute.default, (r(10, 9, grad=True), ids3, 7)))
    s.append(("permute_bf16", OPS.permute.default, (r(8, 16, dtype=bf16, grad=True), ids, 6)))
    row_map = torch.randperm(30, device=device).to(torch.int32)
    s.append(("permute_backward", OPS.permute_backward.default, (r(30, 9), row_map, 3)))
    # unpermute
    s.append(("unpermute", OPS.unpermute.default, (r(30, 9, grad=True), row_map, r(10, 3, grad=True))))
    s.append(
        ("unpermute_bf16", OPS.unpermute.default, (r(30, 8, dtype=bf16, grad=True), row_map, r(10, 3, grad=True)))
    )
    s.append(("unpermute_backward", OPS.unpermute_backward.default, (r(10, 9), r(30, 9), row_map, r(10, 3))))
    # grouped GEMM
    off = offsets_from_counts([3, 0, 5, 2], device)
    s.append(("grouped_gemm", OPS.grouped_gemm.default, (r(10, 6, grad=True), r(4, 6, 5, grad=True), off, False)))
    s.append(
        ("grouped_gemm_trans_b", OPS.grouped_gemm.default, (r(10, 6, grad=True), r(4, 5, 6, grad=True), off, True))
    )
    s.append(
        (
            "grouped_gemm_bf16",
            OPS.grouped_gemm.default,
            (r(10, 8, dtype=bf16, grad=True), r(4, 4, 8, dtype=bf16, grad=True), off, True),
        )
    )
    s.append(("grouped_gemm_wgrad", OPS.grouped_gemm_wgrad.default, (r(10, 6), r(10, 5), off, False)))
    s.append(("grouped_gemm_wgrad_trans_b", OPS.grouped_gemm_wgrad.default, (r(10, 6), r(10, 5), off, True)))
    # swiglu
    s.append(("swiglu", OPS.swiglu.default, (r(7, 10, grad=True),)))
    s.append(("swiglu_bf16", OPS.swiglu.default, (r(3, 16, dtype=bf16, grad=True),)))
    s.append(("swiglu_backward", OPS.swiglu_backward.default, (r(7, 5), r(7, 10))))
    # the CPU decode path (inference only: no input requires grad)
    if device == "cpu":
        s.append(("pack_decode_weights", OPS.pack_decode_weights.default, (r(4, 18, 12), r(4, 12, 9))))
        gu, dn = OPS.pack_decode_weights(r(4, 18, 12), r(4, 12, 9))
        sgu, sdn = OPS.pack_decode_weights(r(1, 10, 12), r(1, 12, 5))
        s.append(("moe_decode", OPS.moe_decode.default, (r(8, 12), r(8, 2), ids % 4, gu, dn, sgu, sdn)))
    return s


_NAMES = [name for name, _, _ in _samples("cpu")]


def test_every_op_has_samples():
    covered = {op._overloadpacket._qualified_op_name.split("::")[1] for _, op, _ in _samples("cpu")}
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dsmoe::")}
    assert len(registered) >= 10 and covered == registered


@pytest.mark.parametrize("name", _NAMES)
def test_opcheck(device, name):
    found = [(op, args) for n, op, args in _samples(device) if n == name]
    if not found:
        pytest.skip(f"{name} has kernels on the CPU only")
    (op, args), = found
    opcheck(op, args)
