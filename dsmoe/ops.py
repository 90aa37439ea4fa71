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

import warnings
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
    token order within an expert). ``expert_ids`` [T, k] is int32 or int64 (read as given, no
    cast). Ids >= ``num_experts`` (expert-parallel sentinels: rows another rank owns) are dropped:
    their rows are zeros after ``expert_offsets[E]``, in no group, so no grouped GEMM computes
    them and they contribute zero through unpermute; negative ids are an error. Differentiable
    in ``x``."""
    return PermuteOutput(*_ops.permute(x, expert_ids, num_experts))


def unpermute(y_perm: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """y[t] = sum_j weights[t, j] * y_perm[row_map[t*k + j]] (fp32 accumulation, a gather).
    Differentiable in ``y_perm`` and ``weights``."""
    return _ops.unpermute(y_perm, row_map, weights)


def grouped_gemm(a: Tensor, b: Tensor, expert_offsets: Tensor, trans_b: bool = False) -> Tensor:
    """c[g] = a[g] @ b[e] for the rows g of each expert e; ``b`` is [E, K, N], or [E, N, K]
    (stacked nn.Linear weights) with ``trans_b``. Rows past ``expert_offsets[-1]`` (permute's
    dropped rows) belong to no expert: zeros in ``c``. Differentiable in ``a`` and ``b``."""
    return _ops.grouped_gemm(a, b, expert_offsets, trans_b)


def grouped_gemm_wgrad(a: Tensor, grad_c: Tensor, expert_offsets: Tensor, trans_b: bool = False) -> Tensor:
    """Per-expert a[g]^T @ grad_c[g] ([E, K, N]; [E, N, K] with ``trans_b``), zeros for empty
    experts, rows past ``expert_offsets[-1]`` unread: the weight gradient of :func:`grouped_gemm`."""
    return _ops.grouped_gemm_wgrad(a, grad_c, expert_offsets, trans_b)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for ``gate_up`` = [gate | up] of shape [M, 2I]; fp32 math."""
    return _ops.swiglu(gate_up)


class PackedDecodeWeights(NamedTuple):
    gate_up: Tensor  # [E, ceil(I/8), h, 16]
    down: Tensor  # [E, ceil(h/8), 8*ceil(I/8), 8]


def pack_decode_weights(w_gate_up: Tensor, w_down: Tensor) -> PackedDecodeWeights:
    """Stacked expert weights ``w_gate_up`` [E, 2I, h] (gate rows, then up rows) and ``w_down``
    [E, h, I] in the layout :func:`moe_decode` streams: per block of 8 intermediate rows, each
    input column's 8 gate and 8 up weights side by side; down as blocks of 8 output rows, column
    by column. Zeros pad I and h to multiples of 8. fp32, bf16 or fp16 (kept). Made once per
    weight (see :mod:`dsmoe.decode`, which caches it)."""
    return PackedDecodeWeights(*_ops.pack_decode_weights(w_gate_up, w_down))


def moe_decode(
    x: Tensor,
    weights: Tensor,
    expert_ids: Tensor,
    packed: PackedDecodeWeights,
    shared: Optional[PackedDecodeWeights] = None,
) -> Tensor:
    """y[t] = sum_j weights[t, j] * expert_{expert_ids[t, j]}(x[t]) (+ shared(x[t])) for SwiGLU
    experts on weights packed by :func:`pack_decode_weights` (``shared``: the shared MLP packed as
    one expert, weight 1). For a few tokens (decode): one parallel pass over each selected
    expert's weights, fp32 accumulation and intermediate, deterministic. ``x`` [T, h] in the
    weights' dtype, ``weights`` [T, k], ``expert_ids`` [T, k] int32/int64 (ids >= E contribute
    zero). Inference only: no gradient."""
    sg, sd = (None, None) if shared is None else shared
    return _ops.moe_decode(x, weights, expert_ids, packed[0], packed[1], sg, sd)


# ---------------------------------------------------------------- fake kernels
# They repeat the checks of csrc/op_checks.h with the same messages (shapes, dtypes and devices;
# values are never read), so a bad call fails the same way eagerly, on 'meta' tensors and while
# torch.compile traces.

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _c10_dtype_names() -> dict:
    """Every torch dtype -> c10's name for it, as the C++ checks print it (Float, BFloat16,
    ComplexFloat, Float8_e4m3fn, UInt16, ...): a CPU tensor's legacy type string is
    'torch.<name>Tensor' ('torch.quantized.<name>Tensor'). Made once, at import (never under a
    fake or tracing mode)."""
    names = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ComplexHalf is "experimental", the quantized dtypes deprecated
        for attr in dir(torch):
            d = getattr(torch, attr)
            if isinstance(d, torch.dtype) and d not in names:
                try:
                    names[d] = torch.empty(0, dtype=d).type().removesuffix("Tensor").rsplit(".", 1)[-1]
                except (RuntimeError, TypeError, NotImplementedError):
                    pass
    return names


_DTYPE_NAMES = _c10_dtype_names()


def _dtype_name(d: torch.dtype) -> str:
    return _DTYPE_NAMES.get(d, str(d))


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_dim(op: str, name: str, t: Tensor, dim: int, shape: str) -> None:
    torch._check(
        t.dim() == dim, lambda: f"dsmoe.{op}: {name} must be {dim}-D {shape}, got shape {_shape(t)}"
    )


def _check_dtype(op: str, name: str, t: Tensor, allowed: tuple) -> None:
    torch._check(
        t.dtype in allowed,
        lambda: f"dsmoe.{op}: {name} must have dtype {'|'.join(_dtype_name(d) for d in allowed)}, got {_dtype_name(t.dtype)}",
    )


def _check_float(op: str, name: str, t: Tensor) -> None:
    _check_dtype(op, name, t, _FLOATS)


def _check_same_dtype(op: str, name: str, t: Tensor, other_name: str, other: Tensor) -> None:
    torch._check(
        t.dtype == other.dtype,
        lambda: f"dsmoe.{op}: {name} must have the dtype of {other_name} ({_dtype_name(other.dtype)}), got {_dtype_name(t.dtype)}",
    )


def _check_same_device(op: str, name: str, t: Tensor, other_name: str, other: Tensor) -> None:
    torch._check(
        t.device == other.device,
        lambda: f"dsmoe.{op}: {name} is on {t.device} but {other_name} is on {other.device}; "
        "all tensors must share a device",
    )


def _check_size(op: str, name: str, t: Tensor, dim: int, expected, what: str) -> None:
    torch._check(
        t.shape[dim] == expected,
        lambda: f"dsmoe.{op}: {name}.size({dim}) must be {expected} ({what}), got {t.shape[dim]} "
        f"(shape {_shape(t)})",
    )


def _check_offsets_meta(op: str, offsets: Tensor) -> None:
    _check_dim(op, "expert_offsets", offsets, 1, "[num_experts + 1]")
    _check_dtype(op, "expert_offsets", offsets, (torch.int32,))
    torch._check(
        offsets.shape[0] >= 2,
        lambda: f"dsmoe.{op}: expert_offsets must hold num_experts + 1 >= 2 values, got {offsets.shape[0]}",
    )


def _check_row_map(op: str, row_map: Tensor, rows) -> None:
    _check_dim(op, "row_map", row_map, 1, "[num_tokens * k]")
    _check_dtype(op, "row_map", row_map, (torch.int32,))
    _check_size(op, "row_map", row_map, 0, rows, "rows of the permuted tensor")


def _check_gate_args(logits, k, selection_bias, num_seqs) -> None:
    op = "gate"
    _check_dim(op, "logits", logits, 2, "[num_tokens, num_experts]")
    _check_float(op, "logits", logits)
    T, E = logits.shape
    torch._check(E >= 1, lambda: f"dsmoe.gate: logits must have at least one expert column, got shape {_shape(logits)}")
    torch._check(1 <= k and k <= E, lambda: f"dsmoe.gate: k must be in [1, num_experts={E}], got {k}")
    torch._check(num_seqs >= 1, lambda: f"dsmoe.gate: num_seqs must be >= 1, got {num_seqs}")
    torch._check(T % num_seqs == 0, lambda: f"dsmoe.gate: num_seqs={num_seqs} must divide num_tokens={T}")
    if selection_bias is not None:
        _check_dim(op, "selection_bias", selection_bias, 1, "[num_experts]")
        _check_size(op, "selection_bias", selection_bias, 0, E, "num_experts")
        _check_dtype(op, "selection_bias", selection_bias, (torch.float32, torch.float64))
        _check_same_device(op, "selection_bias", selection_bias, "logits", logits)


@torch.library.register_fake("dsmoe::gate")
def _gate_fake(logits, k, normalize=False, selection_bias=None, num_seqs=1):
    _check_gate_args(logits, k, selection_bias, num_seqs)
    T, E = logits.shape
    acc = _acc_dtype(logits)
    return (
        logits.new_empty((T, k), dtype=acc),
        logits.new_empty((T, k), dtype=torch.int32),
        logits.new_empty((num_seqs, E), dtype=torch.int32),
        logits.new_empty((num_seqs, E), dtype=acc),
    )


@torch.library.register_fake("dsmoe::gate_backward")
def _gate_backward_fake(grad_weights, grad_score_sums, logits, expert_ids, normalize, num_seqs):
    op = "gate_backward"
    _check_dim(op, "logits", logits, 2, "[num_tokens, num_experts]")
    _check_float(op, "logits", logits)
    T, E = logits.shape
    torch._check(
        num_seqs >= 1 and T % num_seqs == 0,
        lambda: f"dsmoe.gate_backward: num_seqs={num_seqs} must be >= 1 and divide num_tokens={T}",
    )
    _check_dim(op, "expert_ids", expert_ids, 2, "[num_tokens, k]")
    _check_dtype(op, "expert_ids", expert_ids, (torch.int32,))
    _check_size(op, "expert_ids", expert_ids, 0, T, "num_tokens of logits")
    k = expert_ids.shape[1]
    torch._check(
        1 <= k and k <= E, lambda: f"dsmoe.gate_backward: expert_ids.size(1)=k must be in [1, {E}], got {k}"
    )
    _check_dim(op, "grad_weights", grad_weights, 2, "[num_tokens, k]")
    _check_size(op, "grad_weights", grad_weights, 0, T, "num_tokens")
    _check_size(op, "grad_weights", grad_weights, 1, k, "k")
    _check_float(op, "grad_weights", grad_weights)
    _check_dim(op, "grad_score_sums", grad_score_sums, 2, "[num_seqs, num_experts]")
    _check_size(op, "grad_score_sums", grad_score_sums, 0, num_seqs, "num_seqs")
    _check_size(op, "grad_score_sums", grad_score_sums, 1, E, "num_experts")
    _check_float(op, "grad_score_sums", grad_score_sums)
    _check_same_device(op, "grad_weights", grad_weights, "logits", logits)
    _check_same_device(op, "grad_score_sums", grad_score_sums, "logits", logits)
    _check_same_device(op, "expert_ids", expert_ids, "logits", logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("dsmoe::permute")
def _permute_fake(x, expert_ids, num_experts):
    op = "permute"
    _check_dim(op, "x", x, 2, "[num_tokens, hidden]")
    _check_float(op, "x", x)
    _check_dim(op, "expert_ids", expert_ids, 2, "[num_tokens, k]")
    _check_dtype(op, "expert_ids", expert_ids, (torch.int32, torch.int64))
    _check_size(op, "expert_ids", expert_ids, 0, x.shape[0], "num_tokens of x")
    torch._check(
        expert_ids.shape[1] >= 1,
        lambda: f"dsmoe.permute: expert_ids must have k >= 1 columns, got {_shape(expert_ids)}",
    )
    torch._check(
        num_experts >= 1 and num_experts < (1 << 30),
        lambda: f"dsmoe.permute: num_experts must be >= 1, got {num_experts}",
    )
    M = x.shape[0] * expert_ids.shape[1]
    torch._check(M < (1 << 31), lambda: f"dsmoe.permute: num_tokens * k must fit int32 row indices, got {M}")
    _check_same_device(op, "expert_ids", expert_ids, "x", x)
    return (
        x.new_empty((M, x.shape[1])),
        x.new_empty((M,), dtype=torch.int32),
        x.new_empty((num_experts + 1,), dtype=torch.int32),
    )


@torch.library.register_fake("dsmoe::permute_backward")
def _permute_backward_fake(grad_x_perm, row_map, k):
    op = "permute_backward"
    _check_dim(op, "grad_x_perm", grad_x_perm, 2, "[num_tokens * k, hidden]")
    _check_float(op, "grad_x_perm", grad_x_perm)
    torch._check(k >= 1, lambda: f"dsmoe.permute_backward: k must be >= 1, got {k}")
    torch._check(
        grad_x_perm.shape[0] % k == 0,
        lambda: f"dsmoe.permute_backward: grad_x_perm.size(0)={grad_x_perm.shape[0]} must be a multiple of k={k}",
    )
    _check_row_map(op, row_map, grad_x_perm.shape[0])
    _check_same_device(op, "row_map", row_map, "grad_x_perm", grad_x_perm)
    return grad_x_perm.new_empty((grad_x_perm.shape[0] // k, grad_x_perm.shape[1]))


def _check_unpermute_args(op, y_perm, row_map, weights) -> None:
    _check_dim(op, "y_perm", y_perm, 2, "[num_tokens * k, hidden]")
    _check_float(op, "y_perm", y_perm)
    _check_dim(op, "weights", weights, 2, "[num_tokens, k]")
    _check_float(op, "weights", weights)
    torch._check(
        weights.shape[1] >= 1, lambda: f"dsmoe.{op}: weights must have k >= 1 columns, got {_shape(weights)}"
    )
    _check_size(op, "y_perm", y_perm, 0, weights.shape[0] * weights.shape[1], "num_tokens * k of weights")
    _check_row_map(op, row_map, y_perm.shape[0])
    _check_same_device(op, "row_map", row_map, "y_perm", y_perm)
    _check_same_device(op, "weights", weights, "y_perm", y_perm)


@torch.library.register_fake("dsmoe::unpermute")
def _unpermute_fake(y_perm, row_map, weights):
    _check_unpermute_args("unpermute", y_perm, row_map, weights)
    return y_perm.new_empty((weights.shape[0], y_perm.shape[1]))


@torch.library.register_fake("dsmoe::unpermute_backward")
def _unpermute_backward_fake(grad_y, y_perm, row_map, weights):
    op = "unpermute_backward"
    _check_unpermute_args(op, y_perm, row_map, weights)
    _check_dim(op, "grad_y", grad_y, 2, "[num_tokens, hidden]")
    _check_float(op, "grad_y", grad_y)
    _check_size(op, "grad_y", grad_y, 0, weights.shape[0], "num_tokens")
    _check_size(op, "grad_y", grad_y, 1, y_perm.shape[1], "hidden")
    _check_same_device(op, "grad_y", grad_y, "y_perm", y_perm)
    return (
        torch.empty_like(y_perm, memory_format=torch.contiguous_format),
        torch.empty_like(weights, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("dsmoe::grouped_gemm")
def _grouped_gemm_fake(a, b, expert_offsets, trans_b=False):
    op = "grouped_gemm"
    _check_dim(op, "a", a, 2, "[rows, K]")
    _check_float(op, "a", a)
    _check_dim(op, "b", b, 3, "[num_experts, N, K]" if trans_b else "[num_experts, K, N]")
    _check_same_dtype(op, "b", b, "a", a)
    _check_offsets_meta(op, expert_offsets)
    _check_size(op, "b", b, 0, expert_offsets.shape[0] - 1, "num_experts = expert_offsets.size(0) - 1")
    _check_size(op, "b", b, 2 if trans_b else 1, a.shape[1], "K = a.size(1)")
    _check_same_device(op, "b", b, "a", a)
    _check_same_device(op, "expert_offsets", expert_offsets, "a", a)
    N = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], N))


@torch.library.register_fake("dsmoe::grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(a, grad_c, expert_offsets, trans_b=False):
    op = "grouped_gemm_wgrad"
    _check_dim(op, "a", a, 2, "[rows, K]")
    _check_float(op, "a", a)
    _check_dim(op, "grad_c", grad_c, 2, "[rows, N]")
    _check_same_dtype(op, "grad_c", grad_c, "a", a)
    _check_size(op, "grad_c", grad_c, 0, a.shape[0], "rows of a")
    _check_offsets_meta(op, expert_offsets)
    _check_same_device(op, "grad_c", grad_c, "a", a)
    _check_same_device(op, "expert_offsets", expert_offsets, "a", a)
    E = expert_offsets.shape[0] - 1
    K, N = a.shape[1], grad_c.shape[1]
    return a.new_empty((E, N, K) if trans_b else (E, K, N))


def _check_swiglu_args(op, gate_up) -> None:
    _check_dim(op, "gate_up", gate_up, 2, "[rows, 2 * intermediate]")
    _check_float(op, "gate_up", gate_up)
    torch._check(
        gate_up.shape[1] % 2 == 0,
        lambda: f"dsmoe.{op}: gate_up.size(1) must be even (gate and up halves), got {gate_up.shape[1]}",
    )


@torch.library.register_fake("dsmoe::swiglu")
def _swiglu_fake(gate_up):
    _check_swiglu_args("swiglu", gate_up)
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.register_fake("dsmoe::swiglu_backward")
def _swiglu_backward_fake(grad_out, gate_up):
    op = "swiglu_backward"
    _check_swiglu_args(op, gate_up)
    _check_dim(op, "grad_out", grad_out, 2, "[rows, intermediate]")
    _check_float(op, "grad_out", grad_out)
    _check_size(op, "grad_out", grad_out, 0, gate_up.shape[0], "rows of gate_up")
    _check_size(op, "grad_out", grad_out, 1, gate_up.shape[1] // 2, "gate_up.size(1) / 2")
    _check_same_device(op, "grad_out", grad_out, "gate_up", gate_up)
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


_DECODE_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.register_fake("dsmoe::pack_decode_weights")
def _pack_decode_weights_fake(w_gate_up, w_down):
    op = "pack_decode_weights"
    _check_dim(op, "w_gate_up", w_gate_up, 3, "[num_experts, 2 * intermediate, hidden]")
    _check_dim(op, "w_down", w_down, 3, "[num_experts, hidden, intermediate]")
    _check_dtype(op, "w_gate_up", w_gate_up, _DECODE_FLOATS)
    _check_same_dtype(op, "w_down", w_down, "w_gate_up", w_gate_up)
    E, two_i, h = w_gate_up.shape
    torch._check(
        two_i >= 2 and two_i % 2 == 0,
        lambda: f"dsmoe.pack_decode_weights: w_gate_up.size(1) must be 2 * intermediate (even, >= 2), got shape {_shape(w_gate_up)}",
    )
    torch._check(h >= 1, lambda: f"dsmoe.pack_decode_weights: hidden must be >= 1, got shape {_shape(w_gate_up)}")
    I = two_i // 2
    _check_size(op, "w_down", w_down, 0, E, "num_experts of w_gate_up")
    _check_size(op, "w_down", w_down, 1, h, "hidden = w_gate_up.size(2)")
    _check_size(op, "w_down", w_down, 2, I, "intermediate = w_gate_up.size(1) / 2")
    nb, nbh = (I + 7) // 8, (h + 7) // 8
    return w_gate_up.new_empty((E, nb, h, 16)), w_down.new_empty((E, nbh, nb * 8, 8))


def _check_packed_meta(op, gu_name, gu, down_name, down, x) -> None:
    h = x.shape[1]
    _check_dim(op, gu_name, gu, 4, "[num_experts, ceil(intermediate / 8), hidden, 16]")
    _check_dim(op, down_name, down, 4, "[num_experts, ceil(hidden / 8), 8 * ceil(intermediate / 8), 8]")
    _check_same_dtype(op, gu_name, gu, "x", x)
    _check_same_dtype(op, down_name, down, "x", x)
    _check_same_device(op, gu_name, gu, "x", x)
    _check_same_device(op, down_name, down, "x", x)
    _check_size(op, gu_name, gu, 2, h, "hidden = x.size(1)")
    _check_size(op, gu_name, gu, 3, 16, "the packed block width (pack_decode_weights)")
    _check_size(op, down_name, down, 0, gu.shape[0], "num_experts of the packed gate_up")
    _check_size(op, down_name, down, 1, (h + 7) // 8, "ceil(hidden / 8)")
    _check_size(op, down_name, down, 2, gu.shape[1] * 8, "8 * packed gate_up.size(1)")
    _check_size(op, down_name, down, 3, 8, "the packed block width (pack_decode_weights)")
    torch._check(
        gu.shape[1] >= 1, lambda: f"dsmoe.{op}: {gu_name} must have intermediate >= 1, got shape {_shape(gu)}"
    )


@torch.library.register_fake("dsmoe::moe_decode")
def _moe_decode_fake(x, weights, expert_ids, packed_gate_up, packed_down, shared_gate_up=None, shared_down=None):
    op = "moe_decode"
    _check_dim(op, "x", x, 2, "[num_tokens, hidden]")
    _check_dtype(op, "x", x, _DECODE_FLOATS)
    _check_dim(op, "weights", weights, 2, "[num_tokens, k]")
    _check_float(op, "weights", weights)
    _check_dim(op, "expert_ids", expert_ids, 2, "[num_tokens, k]")
    _check_dtype(op, "expert_ids", expert_ids, (torch.int32, torch.int64))
    _check_size(op, "weights", weights, 0, x.shape[0], "num_tokens of x")
    _check_size(op, "expert_ids", expert_ids, 0, x.shape[0], "num_tokens of x")
    _check_size(op, "expert_ids", expert_ids, 1, weights.shape[1], "k of weights")
    _check_same_device(op, "weights", weights, "x", x)
    _check_same_device(op, "expert_ids", expert_ids, "x", x)
    torch._check(x.shape[1] >= 1, lambda: f"dsmoe.moe_decode: x must have hidden >= 1, got shape {_shape(x)}")
    _check_packed_meta(op, "packed_gate_up", packed_gate_up, "packed_down", packed_down, x)
    torch._check(
        (shared_gate_up is None) == (shared_down is None),
        lambda: "dsmoe.moe_decode: shared_gate_up and shared_down must be given together",
    )
    if shared_gate_up is not None:
        _check_packed_meta(op, "shared_gate_up", shared_gate_up, "shared_down", shared_down, x)
        _check_size(op, "shared_gate_up", shared_gate_up, 0, 1, "one shared expert (the shared MLP packed as E=1)")
    return x.new_empty(x.shape)


# ---------------------------------------------------------------- autograd
# Every backward is itself built from dsmoe ops.


def _gate_setup(ctx, inputs, output):
    logits, k, normalize, selection_bias, num_seqs = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.normalize, ctx.num_seqs = normalize, num_seqs


def _gate_backward(ctx, grad_weights, grad_ids, grad_counts, grad_sums):
    # autograd hands zeros for an output the loss does not use (grads are materialized, eagerly
    # and under torch.compile), never None
    logits, expert_ids = ctx.saved_tensors
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


def _inference_only(op: str):
    def refuse(*_, **__):  # as setup_context: a call with inputs that require grad never gets a backward
        raise RuntimeError(
            f"dsmoe.{op} is inference-only (no gradient); run it under torch.no_grad() or with inputs "
            "that do not require grad, or use the differentiable ops (permute, grouped_gemm, swiglu, unpermute)"
        )

    torch.library.register_autograd(f"dsmoe::{op}", refuse, setup_context=refuse)


_inference_only("pack_decode_weights")
_inference_only("moe_decode")

__all__ = [
    "GateOutput",
    "PermuteOutput",
    "gate",
    "permute",
    "unpermute",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "swiglu",
    "PackedDecodeWeights",
    "pack_decode_weights",
    "moe_decode",
]
