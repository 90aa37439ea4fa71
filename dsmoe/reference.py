"""Plain-PyTorch reference math for dsmoe: the ground truth of the tests and the model's
``impl="reference"`` path.

Two groups of functions:

* **Op-level references** with the signatures and semantics of :mod:`dsmoe.ops` (``gate``,
  ``permute``, ``unpermute``, ``grouped_gemm``, ``grouped_gemm_wgrad``, ``swiglu``). They compute
  in fp32 (fp64 for fp64 inputs) and round once to the output dtype, so they are the accurate
  answer a kernel is compared against. They are differentiable through ordinary autograd.
* **Model-level references** transcribed from the seeds' ``modeling_deepseek.py``
  (``MoEGate.forward``, ``DeepseekMoE.forward`` in training mode, ``DeepseekMoE.moe_infer``),
  written as functions over stacked expert weights ``w_gate_up [E, 2I, h]`` (rows of
  ``gate_proj.weight`` then ``up_proj.weight``) and ``w_down [E, h, I]`` (``down_proj.weight``),
  plus :func:`expert_balance_loss`, the seeds' auxiliary loss rebuilt from the gate statistics
  that :func:`dsmoe.ops.gate` returns.

Differences between the seeds' gate and dsmoe's gate (both documented where they matter):

* The seeds call ``torch.topk(scores, k, sorted=False)``: the order of the k chosen experts is
  unspecified and ties are broken arbitrarily. dsmoe returns them in descending score with ties
  going to the lower expert id. :func:`canonical_topk` sorts the seeds' output the dsmoe way, so
  the two can be compared element by element.
* The seeds take the softmax in the dtype of the hidden states (bf16 in a bf16 model); dsmoe
  always takes it in fp32. The two agree exactly in fp32.
* The seeds renormalise the weights only when ``top_k > 1 and norm_topk_prob``; ``dsmoe.ops.gate``
  renormalises whenever ``normalize`` is true (so a model passes
  ``normalize=norm_topk_prob and top_k > 1``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gate",
    "permute",
    "unpermute",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "swiglu",
    "canonical_topk",
    "moe_gate",
    "expert_mlp",
    "moe_forward_train",
    "moe_infer",
    "expert_balance_loss",
    "AddAuxiliaryLoss",
]


def _acc_dtype(t: Tensor) -> torch.dtype:
    # fp64 stays fp64; every other float type is computed in fp32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- op-level


def gate(
    logits: Tensor,
    k: int,
    normalize: bool = False,
    selection_bias: Optional[Tensor] = None,
    num_seqs: int = 1,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference of :func:`dsmoe.ops.gate`.

    ``logits`` [T, E] -> softmax in fp32 (fp64 for fp64 logits); the ``k`` experts with the
    largest ``probs + selection_bias`` (a stable descending sort, so ties go to the lower expert
    id, and the chosen experts come out in descending key); weights = the chosen probs, divided by
    their sum + 1e-20 when ``normalize``.

    Returns ``(weights [T,k] fp32|fp64, expert_ids [T,k] int32, tokens_per_expert [S,E] int32,
    score_sums [S,E] fp32|fp64)`` where S = ``num_seqs`` splits the T tokens into equal
    consecutive sequences; ``score_sums[s, e]`` is the sum of probs of expert e over sequence s.
    Differentiable in ``logits`` through ``weights`` and ``score_sums``.
    """
    T, E = logits.shape
    acc = _acc_dtype(logits)
    probs = torch.softmax(logits.to(acc), dim=-1)
    keys = probs.detach()
    if selection_bias is not None:
        keys = keys + selection_bias.to(acc)
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, order)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    L = T // num_seqs
    tokens_per_expert = torch.zeros(num_seqs, E, dtype=torch.int64, device=logits.device)
    if T > 0:
        seq_of_row = torch.arange(T, device=logits.device).div(L, rounding_mode="floor")
        flat = (seq_of_row.unsqueeze(1) * E + order).reshape(-1)  # (sequence, expert) bins
        tokens_per_expert = torch.bincount(flat, minlength=num_seqs * E).view(num_seqs, E)
    score_sums = probs.reshape(num_seqs, L, E).sum(dim=1)
    return weights, order.to(torch.int32), tokens_per_expert.to(torch.int32), score_sums


def permute(x: Tensor, expert_ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`dsmoe.ops.permute`.

    Flattens ``expert_ids`` [T,k] to [M=T*k], sorts it with a *stable* argsort (rows of one expert
    keep token order) and gathers ``x_perm = x[order // k]``. ``row_map[f]`` is the row of
    ``x_perm`` holding flat entry ``f = t*k + j``; ``expert_offsets`` [E+1] is the exclusive
    prefix sum of the per-expert counts. Differentiable in ``x``.
    """
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    x_perm = x[order.div(k, rounding_mode="floor")]
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts)
    expert_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return x_perm, row_map.to(torch.int32), expert_offsets.to(torch.int32)


def unpermute(y_perm: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """Reference of :func:`dsmoe.ops.unpermute`:
    ``y[t] = sum_j weights[t,j] * y_perm[row_map[t*k+j]]`` in fp32 (fp64 for fp64 ``y_perm``),
    returned in ``y_perm``'s dtype. Differentiable in ``y_perm`` and ``weights``."""
    T, k = weights.shape
    acc = _acc_dtype(y_perm)
    rows = y_perm.to(acc)[row_map.long()].view(T, k, y_perm.shape[1])
    y = (rows * weights.to(acc).unsqueeze(-1)).sum(dim=1)
    return y.to(y_perm.dtype)


def _group_bounds(expert_offsets: Tensor):
    off = expert_offsets.tolist()
    return [(e, off[e], off[e + 1]) for e in range(len(off) - 1)]


def grouped_gemm(a: Tensor, b: Tensor, expert_offsets: Tensor, trans_b: bool = False) -> Tensor:
    """Reference of :func:`dsmoe.ops.grouped_gemm`: for every expert e, rows
    ``expert_offsets[e]:expert_offsets[e+1]`` of ``a`` [M,K] times ``b[e]`` ([K,N]; ``b[e].T``
    for ``b`` [E,N,K] with ``trans_b``). A Python loop over experts in fp32 (fp64 for fp64),
    rounded to ``a``'s dtype. Differentiable in ``a`` and ``b``."""
    acc = _acc_dtype(a)
    N = b.shape[1] if trans_b else b.shape[2]
    parts = []
    for e, lo, hi in _group_bounds(expert_offsets):
        be = b[e].to(acc)
        parts.append(a[lo:hi].to(acc) @ (be.t() if trans_b else be))
    c = torch.cat(parts, dim=0) if parts else a.new_zeros((0, N), dtype=acc)
    return c.to(a.dtype)


def grouped_gemm_wgrad(a: Tensor, grad_c: Tensor, expert_offsets: Tensor, trans_b: bool = False) -> Tensor:
    """Reference of :func:`dsmoe.ops.grouped_gemm_wgrad`: per expert ``a[g].T @ grad_c[g]``
    ([E,K,N]), or ``grad_c[g].T @ a[g]`` ([E,N,K]) with ``trans_b``; zeros for experts with no
    rows. Computed in fp32 (fp64 for fp64), returned in ``a``'s dtype."""
    acc = _acc_dtype(a)
    outs = []
    for e, lo, hi in _group_bounds(expert_offsets):
        ag, gg = a[lo:hi].to(acc), grad_c[lo:hi].to(acc)
        outs.append(gg.t() @ ag if trans_b else ag.t() @ gg)
    return torch.stack(outs).to(a.dtype)


def swiglu(gate_up: Tensor) -> Tensor:
    """Reference of :func:`dsmoe.ops.swiglu`: ``silu(gate) * up`` for ``gate_up = [gate | up]``
    [M, 2I], computed in fp32 (fp64 for fp64) and returned in the input dtype."""
    acc = _acc_dtype(gate_up)
    g, u = gate_up.to(acc).chunk(2, dim=-1)
    return (F.silu(g) * u).to(gate_up.dtype)


# ----------------------------------------------------------------------------- model-level


def canonical_topk(topk_idx: Tensor, topk_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Orders each row of a top-k selection the dsmoe way: descending weight, ties to the lower
    expert id. Makes the seeds' ``torch.topk(..., sorted=False)`` output comparable with
    :func:`dsmoe.ops.gate` (valid where weights are the chosen probs, i.e. no selection bias;
    renormalising keeps the order). Returns ``(idx, weight)`` with ``idx`` in its input dtype."""
    by_id = torch.sort(topk_idx, dim=-1, stable=True)
    w = topk_weight.gather(-1, by_id.indices)
    by_w = torch.sort(w, dim=-1, descending=True, stable=True)
    return by_id.values.gather(-1, by_w.indices), by_w.values


def moe_gate(
    hidden_states: Tensor,
    gate_weight: Tensor,
    top_k: int,
    norm_topk_prob: bool,
    aux_loss_alpha: float,
    seq_aux: bool,
    training: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The seeds' ``MoEGate.forward`` (softmax scoring), as a function.

    ``hidden_states`` [B, L, h], ``gate_weight`` [E, h]. Returns ``(topk_idx [B*L, k] int64,
    topk_weight [B*L, k], aux_loss)``; ``aux_loss`` is None unless ``training and
    aux_loss_alpha > 0``. Line for line the seeds' math: softmax in the dtype of the hidden
    states, ``torch.topk(sorted=False)`` (unspecified order, arbitrary ties: compare through
    :func:`canonical_topk`), renormalisation only for ``top_k > 1``, and the sequence-level
    (``seq_aux``) or token-level balance loss.
    """
    bsz, seq_len, h = hidden_states.shape
    n_routed_experts = gate_weight.shape[0]
    hidden_states = hidden_states.view(-1, h)
    logits = F.linear(hidden_states, gate_weight, None)
    scores = logits.softmax(dim=-1)

    topk_weight, topk_idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)

    if top_k > 1 and norm_topk_prob:
        denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
        topk_weight = topk_weight / denominator

    if training and aux_loss_alpha > 0.0:
        scores_for_aux = scores
        aux_topk = top_k
        topk_idx_for_aux_loss = topk_idx.view(bsz, -1)
        if seq_aux:
            scores_for_seq_aux = scores_for_aux.view(bsz, seq_len, -1)
            ce = torch.zeros(bsz, n_routed_experts, device=hidden_states.device)
            ce.scatter_add_(
                1, topk_idx_for_aux_loss, torch.ones(bsz, seq_len * aux_topk, device=hidden_states.device)
            ).div_(seq_len * aux_topk / n_routed_experts)
            aux_loss = (ce * scores_for_seq_aux.mean(dim=1)).sum(dim=1).mean() * aux_loss_alpha
        else:
            mask_ce = F.one_hot(topk_idx_for_aux_loss.view(-1), num_classes=n_routed_experts)
            ce = mask_ce.float().mean(0)
            Pi = scores_for_aux.mean(0)
            fi = ce * n_routed_experts
            aux_loss = (Pi * fi).sum() * aux_loss_alpha
    else:
        aux_loss = None
    return topk_idx, topk_weight, aux_loss


def expert_balance_loss(
    tokens_per_expert: Tensor, score_sums: Tensor, k: int, alpha: float, seq_aux: bool
) -> Tensor:
    """The seeds' balance loss rebuilt from the statistics of :func:`dsmoe.ops.gate` (called with
    ``num_seqs = B`` for ``seq_aux``; any ``num_seqs`` otherwise).

    With S sequences of L tokens, T = S*L, counts = ``tokens_per_expert`` [S,E] and
    sums = ``score_sums`` [S,E]:

    * ``seq_aux``: ``alpha * mean_s sum_e (counts[s,e] / (L*k/E)) * (sums[s,e] / L)``;
      the seeds' ``ce.div_(seq_len * aux_topk / E)`` times ``scores.view(B,L,E).mean(1)``.
    * token level: ``alpha * sum_e (sum_s sums[s,e] / T) * (sum_s counts[s,e] / (T*k) * E)``;
      the seeds' ``Pi * fi`` with ``Pi = scores.mean(0)``, ``fi = one_hot(ids).mean(0) * E``.

    L and T are read from the counts (every token counts k times), as tensor math: no host sync.
    Gradients flow through ``score_sums`` only, as in the seeds (the counts are constants).
    """
    E = tokens_per_expert.shape[-1]
    counts = tokens_per_expert.to(score_sums.dtype)
    if seq_aux:
        Lk = counts.sum(dim=-1, keepdim=True)  # L * k per sequence
        ce = counts / (Lk / E)
        mean_scores = score_sums / (Lk / k)
        return (ce * mean_scores).sum(dim=1).mean() * alpha
    counts_tot = counts.sum(dim=0)
    Tk = counts_tot.sum()  # T * k
    Pi = score_sums.sum(dim=0) / (Tk / k)
    fi = counts_tot / Tk * E
    return (Pi * fi).sum() * alpha


class AddAuxiliaryLoss(torch.autograd.Function):
    """The seeds' (Hugging Face DeepSeek's) trick to train the balance loss: identity on ``x`` in
    forward; in backward ``loss`` receives gradient 1, as if it had been added to the total."""

    @staticmethod
    def forward(ctx, x, loss):
        assert loss.numel() == 1
        ctx.dtype = loss.dtype
        ctx.required_aux_loss = loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad_output):
        grad_loss = None
        if ctx.required_aux_loss:
            grad_loss = torch.ones(1, dtype=ctx.dtype, device=grad_output.device)
        return grad_output, grad_loss


def expert_mlp(x: Tensor, w_gate_up_e: Tensor, w_down_e: Tensor) -> Tensor:
    """One routed expert, the seeds' ``DeepseekMLP`` with SiLU:
    ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with ``w_gate_up_e = cat(gate_proj.weight,
    up_proj.weight)`` [2I, h] and ``w_down_e = down_proj.weight`` [h, I], in ``x``'s dtype."""
    inter = w_gate_up_e.shape[0] // 2
    gate_proj, up_proj = w_gate_up_e[:inter], w_gate_up_e[inter:]
    return F.linear(F.silu(F.linear(x, gate_proj)) * F.linear(x, up_proj), w_down_e)


def moe_forward_train(
    x: Tensor,
    topk_idx: Tensor,
    topk_weight: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    aux_loss: Optional[Tensor] = None,
) -> Tensor:
    """The seeds' ``DeepseekMoE.forward`` training path over the routed experts (no shared
    experts): every token row repeated k times (``repeat_interleave``), a Python loop over the
    experts filling the rows routed to each, then the weighted sum over the k slots.

    ``x`` [..., h] (T tokens), ``topk_idx`` / ``topk_weight`` [T, k]; returns ``x``'s shape and
    dtype. When ``aux_loss`` is given it is attached with :class:`AddAuxiliaryLoss`, as the
    seeds do.
    """
    orig_shape = x.shape
    k = topk_idx.shape[-1]
    hidden_states = x.reshape(-1, x.shape[-1])
    flat_topk_idx = topk_idx.reshape(-1)
    hidden_states = hidden_states.repeat_interleave(k, dim=0)
    y = torch.empty_like(hidden_states)
    for i in range(w_gate_up.shape[0]):
        # .to(y.dtype): under autocast the expert runs in bf16/fp16 while y keeps x's dtype
        y[flat_topk_idx == i] = expert_mlp(hidden_states[flat_topk_idx == i], w_gate_up[i], w_down[i]).to(y.dtype)
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    # The seeds' weights share x's dtype; fp32 weights with bf16 x would promote: keep x's dtype.
    y = y.to(x.dtype).view(*orig_shape)
    if aux_loss is not None:
        y = AddAuxiliaryLoss.apply(y, aux_loss)
    return y


@torch.no_grad()
def moe_infer(x: Tensor, topk_idx: Tensor, topk_weight: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """The seeds' ``DeepseekMoE.moe_infer`` (inference path, no grad): sort the flat expert ids,
    run each expert with tokens once on its slice, scale by the routing weight in place and
    ``scatter_reduce_(sum)`` into the output. ``x`` [..., h], ``topk_idx``/``topk_weight``
    [T, k]; returns ``x``'s shape and dtype. Like the seeds it reads the counts on the host."""
    orig_shape = x.shape
    num_experts_per_tok = topk_idx.shape[-1]
    x = x.reshape(-1, x.shape[-1])
    flat_expert_indices = topk_idx.reshape(-1)
    flat_expert_weights = topk_weight.reshape(-1, 1)
    expert_cache = torch.zeros_like(x)
    idxs = flat_expert_indices.argsort()
    tokens_per_expert = flat_expert_indices.bincount().cpu().numpy().cumsum(0)
    token_idxs = idxs // num_experts_per_tok
    for i, end_idx in enumerate(tokens_per_expert):
        start_idx = 0 if i == 0 else tokens_per_expert[i - 1]
        if start_idx == end_idx:
            continue
        exp_token_idx = token_idxs[start_idx:end_idx]
        expert_tokens = x[exp_token_idx]
        # .to(): under autocast the expert runs in bf16/fp16 while the cache keeps x's dtype
        expert_out = expert_mlp(expert_tokens, w_gate_up[i], w_down[i]).to(expert_cache.dtype)
        expert_out.mul_(flat_expert_weights[idxs[start_idx:end_idx]])
        expert_cache.scatter_reduce_(
            0, exp_token_idx.view(-1, 1).repeat(1, x.shape[-1]), expert_out, reduce="sum"
        )
    return expert_cache.view(*orig_shape)
