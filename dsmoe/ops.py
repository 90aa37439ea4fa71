"""The dsmoe operators: thin wrappers over ``torch.ops.dsmoe.*`` with their fake (meta) kernels
and autograd formulas, so they run under ``torch.compile(fullgraph=True)`` and in backward.

Notation: T tokens, h hidden, E routed experts, k experts per token, M = T*k routed rows,
S sequences (T = S*L). A typical MoE layer::

    weights, ids, counts, sums = gate(router_logits, k)
    x_perm, row_map, offsets = permute(x, ids, E)
    h = swiglu(grouped_gemm(x_perm, w_gate_up, offsets, trans_b=True))   # w_gate_up [E, 2I, h]
    y = unpermute(grouped_gemm(h, w_down, offsets, trans_b=True), row_map, weights)  # w_down [E, h, I]
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _ext  # noqa: F401  (registers torch.ops.dsmoe)

_ops = torch.ops.dsmoe


class GateOutput(NamedTuple):
    weights: Tensor  # [T, k] fp32 (fp64 for fp64 logits)
    expert_ids: Tensor  # [T, k] int32, in descending selection key
    tokens_per_expert: Tensor  # [S, E] int32
    score_sums: Tensor  # [S, E] sum over each sequence's tokens of the softmax scores


class PermuteOutput(NamedTuple):
    x_perm: Tensor  # [M, h]
    row_map: Tensor  # [M] int32: row_map[t*k+j] = row of x_perm holding token t's j-th copy
    expert_offsets: Tensor  # [E+1] int32


def gate(
    logits: Tensor,
    k: int,
    normalize: bool = False,
    selection_bias: Optional[Tensor] = None,
    num_seqs: int = 1,
) -> GateOutput:
    """Softmax routing with top-k selection, in one pass.

    Softmax of ``logits`` [T, E] in fp32; the top ``k`` experts of ``probs + selection_bias``
    (bias only steers selection, as in DeepSeek-V3's loss-free balancing) with ties going to the
    lower expert id; weights are the chosen probs, divided by their sum (+1e-20) when
    ``normalize``. ``num_seqs`` splits the tokens into S equal sequences for the per-sequence
    statistics (seq_aux balance loss). Differentiable in ``logits`` through ``weights`` and
    ``score_sums``.
    """
    return GateOutput(*_ops.gate(logits, k, normalize, selection_bias, num_seqs))


def permute(x: Tensor, expert_ids: Tensor, num_experts: int) -> PermuteOutput:
    """Copies each token row of ``x`` [T, h] once per chosen expert, grouped by expert (stable:
    token order within an expert). Differentiable in ``x``."""
    return PermuteOutput(*_ops.permute(x, expert_ids, num_experts))


def unpermute(y_perm: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """y[t] = sum_j weights[t, j] * y_perm[row_map[t*k + j]] (fp32 accumulation, a gather).
    Differentiable in ``y_perm`` and ``weights``."""
    return _ops.unpermute(y_perm, row_map, weights)


def grouped_gemm(a: Tensor, b: Tensor, expert_offsets: Tensor, trans_b: bool = False) -> Tensor:
    """c[g] = a[g] @ b[e] for the rows g of each expert e; ``b`` is [E, K, N], or [E, N, K]
    (stacked nn.Linear weights) with ``trans_b``. Differentiable in ``a`` and ``b``."""
    return _ops.grouped_gemm(a, b, expert_offsets, trans_b)


def grouped_gemm_wgrad(a: Tensor, grad_c: Tensor, expert_offsets: Tensor, trans_b: bool = False) -> Tensor:
    """Per-expert a[g]^T @ grad_c[g] ([E, K, N]; [E, N, K] with ``trans_b``), zeros for empty
    experts: the weight gradient of :func:`grouped_gemm`."""
    return _ops.grouped_gemm_wgrad(a, grad_c, expert_offsets, trans_b)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for ``gate_up`` = [gate | up] of shape [M, 2I]; fp32 math."""
    return _ops.swiglu(gate_up)


# ---------------------------------------------------------------- fake kernels
# They repeat the shape checks of csrc/op_checks.h (values are never read).

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("dsmoe::gate")
def _gate_fake(logits, k, normalize=False, selection_bias=None, num_seqs=1):
    torch._check(logits.dim() == 2, lambda: f"dsmoe.gate: logits must be 2-D, got {logits.dim()}-D")
    torch._check(logits.dtype in _FLOATS, lambda: f"dsmoe.gate: logits must be floating, got {logits.dtype}")
    T, E = logits.shape
    torch._check(1 <= k <= E, lambda: f"dsmoe.gate: k must be in [1, num_experts={E}], got {k}")
    torch._check(num_seqs >= 1, lambda: f"dsmoe.gate: num_seqs must be >= 1, got {num_seqs}")
    torch._check(T % num_seqs == 0, lambda: f"dsmoe.gate: num_seqs={num_seqs} must divide num_tokens={T}")
    acc = _acc_dtype(logits)
    return (
        logits.new_empty((T, k), dtype=acc),
        logits.new_empty((T, k), dtype=torch.int32),
        logits.new_empty((num_seqs, E), dtype=torch.int32),
        logits.new_empty((num_seqs, E), dtype=acc),
    )


@torch.library.register_fake("dsmoe::gate_backward")
def _gate_backward_fake(grad_weights, grad_score_sums, logits, expert_ids, normalize, num_seqs):
    torch._check(logits.dim() == 2, lambda: "dsmoe.gate_backward: logits must be 2-D")
    torch._check(expert_ids.shape[0] == logits.shape[0], lambda: "dsmoe.gate_backward: expert_ids rows must match logits")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("dsmoe::permute")
def _permute_fake(x, expert_ids, num_experts):
    torch._check(x.dim() == 2, lambda: f"dsmoe.permute: x must be 2-D, got {x.dim()}-D")
    torch._check(expert_ids.dim() == 2, lambda: f"dsmoe.permute: expert_ids must be 2-D, got {expert_ids.dim()}-D")
    torch._check(expert_ids.dtype == torch.int32, lambda: f"dsmoe.permute: expert_ids must be int32, got {expert_ids.dtype}")
    torch._check(expert_ids.shape[0] == x.shape[0], lambda: "dsmoe.permute: expert_ids.size(0) must equal x.size(0)")
    M = x.shape[0] * expert_ids.shape[1]
    return (
        x.new_empty((M, x.shape[1])),
        x.new_empty((M,), dtype=torch.int32),
        x.new_empty((num_experts + 1,), dtype=torch.int32),
    )


@torch.library.register_fake("dsmoe::permute_backward")
def _permute_backward_fake(grad_x_perm, row_map, k):
    torch._check(grad_x_perm.dim() == 2, lambda: "dsmoe.permute_backward: grad_x_perm must be 2-D")
    torch._check(grad_x_perm.shape[0] % k == 0, lambda: "dsmoe.permute_backward: rows must be a multiple of k")
    return grad_x_perm.new_empty((grad_x_perm.shape[0] // k, grad_x_perm.shape[1]))


@torch.library.register_fake("dsmoe::unpermute")
def _unpermute_fake(y_perm, row_map, weights):
    torch._check(y_perm.dim() == 2 and weights.dim() == 2, lambda: "dsmoe.unpermute: y_perm and weights must be 2-D")
    torch._check(
        y_perm.shape[0] == weights.shape[0] * weights.shape[1],
        lambda: "dsmoe.unpermute: y_perm.size(0) must equal num_tokens * k of weights",
    )
    return y_perm.new_empty((weights.shape[0], y_perm.shape[1]))


@torch.library.register_fake("dsmoe::unpermute_backward")
def _unpermute_backward_fake(grad_y, y_perm, row_map, weights):
    return torch.empty_like(y_perm, memory_format=torch.contiguous_format), torch.empty_like(
        weights, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("dsmoe::grouped_gemm")
def _grouped_gemm_fake(a, b, expert_offsets, trans_b=False):
    torch._check(a.dim() == 2, lambda: f"dsmoe.grouped_gemm: a must be 2-D, got {a.dim()}-D")
    torch._check(b.dim() == 3, lambda: f"dsmoe.grouped_gemm: b must be 3-D, got {b.dim()}-D")
    torch._check(b.dtype == a.dtype, lambda: f"dsmoe.grouped_gemm: b must have the dtype of a ({a.dtype}), got {b.dtype}")
    torch._check(
        b.shape[0] == expert_offsets.shape[0] - 1,
        lambda: "dsmoe.grouped_gemm: b.size(0) must equal expert_offsets.size(0) - 1",
    )
    K = b.shape[2] if trans_b else b.shape[1]
    torch._check(K == a.shape[1], lambda: f"dsmoe.grouped_gemm: b's K must equal a.size(1)={a.shape[1]}")
    N = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], N))


@torch.library.register_fake("dsmoe::grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(a, grad_c, expert_offsets, trans_b=False):
    torch._check(a.dim() == 2 and grad_c.dim() == 2, lambda: "dsmoe.grouped_gemm_wgrad: a and grad_c must be 2-D")
    torch._check(grad_c.shape[0] == a.shape[0], lambda: "dsmoe.grouped_gemm_wgrad: grad_c rows must equal a rows")
    E = expert_offsets.shape[0] - 1
    K, N = a.shape[1], grad_c.shape[1]
    return a.new_empty((E, N, K) if trans_b else (E, K, N))


@torch.library.register_fake("dsmoe::swiglu")
def _swiglu_fake(gate_up):
    torch._check(gate_up.dim() == 2, lambda: f"dsmoe.swiglu: gate_up must be 2-D, got {gate_up.dim()}-D")
    torch._check(gate_up.shape[1] % 2 == 0, lambda: "dsmoe.swiglu: gate_up.size(1) must be even")
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.register_fake("dsmoe::swiglu_backward")
def _swiglu_backward_fake(grad_out, gate_up):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- autograd
# Every backward is itself built from dsmoe ops.


def _gate_setup(ctx, inputs, output):
    logits, k, normalize, selection_bias, num_seqs = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.normalize, ctx.num_seqs = normalize, num_seqs


def _gate_backward(ctx, grad_weights, grad_ids, grad_counts, grad_sums):
    logits, expert_ids = ctx.saved_tensors
    T, E = logits.shape
    acc = _acc_dtype(logits)
    if grad_weights is None:
        grad_weights = logits.new_zeros((T, expert_ids.shape[1]), dtype=acc)
    if grad_sums is None:
        grad_sums = logits.new_zeros((ctx.num_seqs, E), dtype=acc)
    grad_logits = _ops.gate_backward(grad_weights, grad_sums, logits, expert_ids, ctx.normalize, ctx.num_seqs)
    return grad_logits, None, None, None, None


def _permute_setup(ctx, inputs, output):
    x, expert_ids, num_experts = inputs
    ctx.save_for_backward(output[1])
    ctx.k = expert_ids.shape[1]


def _permute_backward(ctx, grad_x_perm, grad_row_map, grad_offsets):
    (row_map,) = ctx.saved_tensors
    return _ops.permute_backward(grad_x_perm, row_map, ctx.k), None, None


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_backward(ctx, grad_y):
    y_perm, row_map, weights = ctx.saved_tensors
    grad_y_perm, grad_weights = _ops.unpermute_backward(grad_y, y_perm, row_map, weights)
    return grad_y_perm, None, grad_weights


def _grouped_gemm_setup(ctx, inputs, output):
    a, b, expert_offsets, trans_b = inputs
    ctx.save_for_backward(a, b, expert_offsets)
    ctx.trans_b = trans_b


def _grouped_gemm_backward(ctx, grad_c):
    a, b, offsets = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _ops.grouped_gemm(grad_c, b, offsets, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        grad_b = _ops.grouped_gemm_wgrad(a, grad_c, offsets, ctx.trans_b)
    return grad_a, grad_b, None, None


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad_out):
    (gate_up,) = ctx.saved_tensors
    return _ops.swiglu_backward(grad_out, gate_up)


torch.library.register_autograd("dsmoe::gate", _gate_backward, setup_context=_gate_setup)
torch.library.register_autograd("dsmoe::permute", _permute_backward, setup_context=_permute_setup)
torch.library.register_autograd("dsmoe::unpermute", _unpermute_backward, setup_context=_unpermute_setup)
torch.library.register_autograd("dsmoe::grouped_gemm", _grouped_gemm_backward, setup_context=_grouped_gemm_setup)
torch.library.register_autograd("dsmoe::swiglu", _swiglu_backward, setup_context=_swiglu_setup)

__all__ = [
    "GateOutput",
    "PermuteOutput",
    "gate",
    "permute",
    "unpermute",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "swiglu",
]
