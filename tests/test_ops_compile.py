"""The op chain of an MoE layer under torch.compile(fullgraph=True): no graph break, and the
same forward and gradients as eager."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from dsmoe import ops, reference
from conftest import assert_close


def moe_chain(x, router_w, w_gate_up, w_down, k: int, num_seqs: int):
    E = router_w.shape[0]
    logits = x @ router_w.t()
    weights, ids, counts, sums = ops.gate(logits, k, normalize=True, num_seqs=num_seqs)
    x_perm, row_map, offsets = ops.permute(x, ids, E)
    h = ops.swiglu(ops.grouped_gemm(x_perm, w_gate_up, offsets, trans_b=True))
    y_perm = ops.grouped_gemm(h, w_down, offsets, trans_b=True)
    y = ops.unpermute(y_perm, row_map, weights)
    aux = reference.expert_balance_loss(counts, sums, k, 0.01, seq_aux=True)
    return y, aux, counts


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(device, T, h, inter, E):
    x = torch.randn(T, h, device=device, requires_grad=True)
    router_w = (torch.randn(E, h, device=device) / h**0.5).requires_grad_()
    w_gate_up = (torch.randn(E, 2 * inter, h, device=device) / h**0.5).requires_grad_()
    w_down = (torch.randn(E, h, inter, device=device) / inter**0.5).requires_grad_()
    return x, router_w, w_gate_up, w_down


def test_compile_fullgraph_matches_eager(device, fresh_dynamo):
    h, inter, E, k, S = 16, 12, 8, 3, 2
    compiled = torch.compile(moe_chain, fullgraph=True)
    # The second token count recompiles with dynamic shapes (automatic dynamic): both the static
    # and the symbolic-shape traces of the fake kernels are exercised.
    for T in (24, 40):
        params = _params(device, T, h, inter, E)

        def run(fn):
            y, aux, counts = fn(*params, k, S)
            g = torch.autograd.grad((y * torch.linspace(-1, 1, h, device=device)).sum() + aux, params)
            return y.detach(), aux.detach(), counts, g

        y_e, aux_e, counts_e, g_e = run(moe_chain)
        y_c, aux_c, counts_c, g_c = run(compiled)
        assert torch.equal(counts_c, counts_e)
        assert_close(y_c, y_e, torch.float32)
        assert_close(aux_c, aux_e, torch.float32)
        for gc, ge in zip(g_c, g_e):
            assert_close(gc, ge, torch.float32)
        # The eager chain is the seeds' MoE: compare with the reference loop as well.
        x, router_w, w_gate_up, w_down = (p.detach() for p in params)
        w, ids, _, _ = reference.gate(x @ router_w.t(), k, normalize=True)
        ref = reference.moe_forward_train(x, ids, w, w_gate_up, w_down)
        assert_close(y_c, ref, torch.float32, scale=2.0)
