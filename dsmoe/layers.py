"""Building blocks of the DeepSeekMoE model: RMSNorm, rotary attention (SDPA, grouped KV heads,
KV cache), the dense SwiGLU MLP, the routers, the routed experts on the dsmoe ops and the
DeepSeekMoE layer (shared + fine-grained routed experts), and the decoder block.

Module and parameter names follow the Hugging Face deepseek-moe code so that a state dict maps
onto a released checkpoint one to one, except that the routed experts are stacked:
``mlp.experts.w_gate_up`` [E, 2I, h] (gate rows, then up rows) and ``mlp.experts.w_down``
[E, h, I] stand for the per-expert ``mlp.experts.J.{gate,up,down}_proj.weight`` (see
:mod:`dsmoe.checkpoint`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._ext import empty_huge_pages
from .backend import (
    BACKENDS,
    BackendSettings,
    apply_keeping_stacked,
    deepcopy_keeping_stacked,
    backend_settings,
    get_backend,
    new_weight,
    on_huge_pages,
    routed_experts,
    stack_parameters,
)
from .config import DeepSeekMoEConfig
from .losses import DeviceBalanceLoss, LoadBalanceLoss

MOE_IMPLS = tuple(BACKENDS)


def _check_impl(impl: str) -> str:
    get_backend(impl)  # refuses an unknown name
    return impl


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back before the weight
    (the seeds' DeepseekRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions (rotate-half convention, as the seeds). ``rope_scaling``
    ``linear`` divides positions by the factor; ``dynamic`` (NTK) raises the base once the
    sequence is longer than max_position_embeddings, using the longest position present."""

    def __init__(self, config: DeepSeekMoEConfig) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.scaling_type = scaling.get("type", scaling.get("rope_type"))
        self.scaling_factor = float(scaling.get("factor", 1.0))

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """position_ids [B, L] -> cos, sin [B, L, head_dim] in ``dtype``."""
        # fp32 tables (fp64 for an fp64 model); the inverse frequencies are computed here in
        # fp32, as the seeds do, rather than kept as a buffer that casting the model would round
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        positions = position_ids.to(compute)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=positions.device).float() / self.dim))
        inv_freq = inv_freq.to(compute)
        if self.scaling_type == "linear":
            positions = positions / self.scaling_factor
        elif self.scaling_type == "dynamic":
            seq_len = (position_ids.max() + 1).to(compute)
            ratio = self.scaling_factor * seq_len / self.max_position_embeddings - (self.scaling_factor - 1)
            base = torch.where(
                seq_len > self.max_position_embeddings,
                self.base * ratio.clamp(min=1.0) ** (self.dim / (self.dim - 2)),
                torch.tensor(self.base, device=positions.device, dtype=compute),
            )
            inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2, device=positions.device).to(compute) / self.dim))
        freqs = positions.unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, L, d] with cos/sin [B, L, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head attention with rotary embeddings and grouped KV heads, through
    F.scaled_dot_product_attention; ``cache`` (a :class:`dsmoe.generation.KVCache`) holds past
    keys/values."""

    def __init__(self, config: DeepSeekMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(
        self,
        hidden_states: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Optional[Tensor] = None,
        cache=None,
        cache_position: Optional[Tensor] = None,
    ) -> Tensor:
        """``attn_mask`` [B, 1, L, kv] bool (True = attend), or None for plain causal attention
        over exactly these L tokens."""
        B, L, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and L > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (the seeds' DeepseekMLP); also the
    shared experts, with intermediate size moe_intermediate_size * n_shared_experts.

    ``gate_proj.weight`` and ``up_proj.weight`` share one storage, gate rows then up rows, so that
    a backend can multiply by both at once without stacking them (dsmoe.backend.stacked); every
    conversion keeps them so."""

    # The default of the dense_own_gemm_min_rows setting (dsmoe.backend.BackendSettings).
    OWN_GEMM_MIN_ROWS = BackendSettings.dense_own_gemm_min_rows

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        stack_parameters(self.gate_proj, self.up_proj)

    def forward(self, x: Tensor, add_to: Optional[Tensor] = None, dsmoe_kernels: bool = True) -> Tensor:
        """x [..., h] -> [..., h]; ``add_to``: returns add_to + mlp(x). How is the backend's
        (dsmoe.backend.DsmoeBackend.dense_mlp); ``dsmoe_kernels=False``: the nn.Linear modules
        only (the MoE layer's reference path)."""
        return get_backend("dsmoe" if dsmoe_kernels else "reference").dense_mlp(self, x, add_to)

    def _apply(self, fn, recurse=True):
        return apply_keeping_stacked(self, self.gate_proj.weight, self.up_proj.weight, fn, recurse, super()._apply)

    def __deepcopy__(self, memo):
        return deepcopy_keeping_stacked(self, memo, lambda m: [(m.gate_proj.weight, m.up_proj.weight)])


# ---------------------------------------------------------------- routing


class RouterOutput(NamedTuple):
    weights: Tensor  # [T, k] fp32: gate values g of the chosen experts
    expert_ids: Tensor  # [T, k] int32
    tokens_per_expert: Tensor  # [S, E] int32
    score_sums: Tensor  # [S, E] fp32, sum over each sequence of the softmax scores


class TopKRouter(nn.Module):
    """The seeds' MoEGate: scores = softmax(x @ weight^T) over the routed experts, the top k
    scores per token are its gate values (renormalised to sum 1 when ``norm_topk_prob`` and
    k > 1). With ``use_selection_bias`` a per-expert bias (``e_score_correction_bias``) is added
    to the scores for choosing experts only. ``impl="dsmoe"`` runs the fused gate op,
    ``"reference"`` plain PyTorch."""

    def __init__(self, config: DeepSeekMoEConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.hidden_size = config.hidden_size
        self.normalize = bool(config.norm_topk_prob and self.top_k > 1)
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_size))
        if config.use_selection_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as the seeds' MoEGate

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: Tensor, num_seqs: int = 1, impl: str = "dsmoe") -> RouterOutput:
        """x [T, h] -> routing of its T tokens; statistics per sequence of T / num_seqs."""
        logits = self.logits(x)
        bias = self.e_score_correction_bias
        if bias is not None:
            bias = bias.float()  # the gate op selects in fp32 (a cast model may hold it in bf16)
        return RouterOutput(*get_backend(impl).route(logits, self.top_k, self.normalize, bias, num_seqs))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, normalize={self.normalize}"


class NoisyTopKRouter(TopKRouter):
    """Top-k router with learned, input-dependent noise for exploration (Shazeer et al. 2017,
    the seeds' README NoisyTopKRouter): in training the logits become
    x W^T + N(0, 1) * softplus(x W_noise^T); in eval it is the plain router."""

    def __init__(self, config: DeepSeekMoEConfig) -> None:
        super().__init__(config)
        # zeros: the noise starts at softplus(0) ~ 0.69 for every expert and is learned from there
        self.noise_weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_size))

    def logits(self, x: Tensor) -> Tensor:
        logits = F.linear(x, self.weight)
        if self.training:
            noise_std = F.softplus(F.linear(x, self.noise_weight))
            logits = logits + torch.randn_like(logits) * noise_std
        return logits


# ---------------------------------------------------------------- experts


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: w_gate_up [E, 2I, h] (gate rows, then up rows) and
    w_down [E, h, I]. ``forward(x, weights, expert_ids)`` returns
    y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]).

    ``impl`` names the backend (dsmoe.backend): ``"dsmoe"``: permute -> grouped GEMM -> SwiGLU ->
    grouped GEMM -> unpermute, no host sync; ``"reference"``: the seeds' loop over experts
    (training path in training mode, ``moe_infer`` in eval). CPU weights of 2 MiB or more are
    made on transparent huge pages and converted onto them (the ``huge_pages`` setting): every
    forward streams them, and on 4 KiB pages the hardware prefetchers stop at every page."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.init_std = init_std
        self.w_gate_up = nn.Parameter(new_weight((num_experts, 2 * intermediate_size, hidden_size)))
        self.w_down = nn.Parameter(new_weight((num_experts, hidden_size, intermediate_size)))
        self.reset_parameters()

    @torch.no_grad()
    def place_weights_on_huge_pages(self, keep_values: bool = True) -> None:
        """Moves CPU expert weights of 2 MiB or more that are not there yet onto transparent huge
        pages (``keep_values``: copying them), when asked: construction and conversions put them
        there already (docs/cpu_performance.md). Shared-memory weights stay where they are."""
        if not backend_settings().huge_pages:
            return
        for p in (self.w_gate_up, self.w_down):
            if type(p.data) is not torch.Tensor or p.device.type != "cpu" or p.is_shared():
                continue  # a sharded (DTensor) or wrapped weight, or one other processes map
            placed = p.data_ptr() % (2 << 20) == 0  # what empty_huge_pages returns
            if p.numel() * p.element_size() >= 2 << 20 and not placed:
                t = empty_huge_pages(p.shape, p.dtype)
                if keep_values:
                    t.copy_(p)
                p.data = t

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # normal(0, initializer_range), as the seeds initialise each expert's nn.Linear
        self.w_gate_up.normal_(0.0, self.init_std)
        self.w_down.normal_(0.0, self.init_std)

    def _apply(self, fn, recurse=True):
        # .to()/.float()/.to_empty() make the new weight tensors on huge pages
        return super()._apply(on_huge_pages(fn), recurse)

    def forward(self, x: Tensor, weights: Tensor, expert_ids: Tensor, impl: str = "dsmoe") -> Tensor:
        return get_backend(impl).routed_experts(x, weights, expert_ids, self.w_gate_up, self.w_down, self.training)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


class MoEOutput(NamedTuple):
    hidden_states: Tensor  # [B, L, h]
    aux_loss: Optional[Tensor]  # scalar; None outside training or when every alpha is 0
    tokens_per_expert: Tensor  # [E] int32, this call's load per routed expert


class DeepSeekMoELayer(nn.Module):
    """The DeepSeekMoE layer: shared experts (one dense SwiGLU MLP of moe_intermediate_size *
    n_shared_experts, always on) plus the top-k of n_routed_experts fine-grained experts.

    ``forward(hidden_states [B, L, h])`` returns :class:`MoEOutput` (output, balance loss in
    training, tokens per expert). ``impl`` names the backend that runs it (dsmoe.backend):
    ``"dsmoe"`` (fused ops, default) or ``"reference"`` (plain PyTorch, for comparison); both
    compute the same function.
    Submodule names (``gate``, ``experts``, ``shared_experts``) are the Hugging Face ones; the
    ``experts`` module can be swapped (expert parallelism keeps this interface).
    """

    def __init__(self, config: DeepSeekMoEConfig, impl: str = "dsmoe") -> None:
        super().__init__()
        if config.n_routed_experts is None:
            raise ValueError("DeepSeekMoELayer: config.n_routed_experts must be set")
        self.config = config
        self.impl = _check_impl(impl)
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.seq_aux = config.seq_aux
        router_cls = NoisyTopKRouter if config.router_type == "noisy_topk" else TopKRouter
        self.gate = router_cls(config)
        self.experts = RoutedExperts(
            self.num_experts, config.hidden_size, config.moe_intermediate_size, config.initializer_range
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.balance_loss = (
            LoadBalanceLoss(self.num_experts, self.top_k, config.aux_loss_alpha) if config.aux_loss_alpha > 0 else None
        )
        self.device_balance_loss = (
            DeviceBalanceLoss(self.num_experts, self.top_k, config.num_expert_devices, config.device_aux_loss_alpha)
            if config.device_aux_loss_alpha > 0 and config.num_expert_devices > 1
            else None
        )

    def forward(self, hidden_states: Tensor) -> MoEOutput:
        if hidden_states.dim() != 3:
            raise ValueError(f"DeepSeekMoELayer: hidden_states must be [batch, seq, hidden], got {tuple(hidden_states.shape)}")
        B, L, h = hidden_states.shape
        x = hidden_states.reshape(B * L, h)
        wants_loss = self.training and (self.balance_loss is not None or self.device_balance_loss is not None)
        # per-sequence statistics only matter for the seq_aux loss
        num_seqs = B if (wants_loss and self.seq_aux) else 1
        backend = get_backend(self.impl)
        route = self.gate(x, num_seqs=num_seqs, impl=self.impl)
        y = backend.moe_experts(self, x, route)
        aux_loss = None
        if wants_loss:
            seq_len = (B * L) // num_seqs  # tokens per sequence of the statistics
            aux_loss = backend.balance_loss(self, route, seq_len)
            if self.device_balance_loss is not None:
                dev = self.device_balance_loss(route.tokens_per_expert, route.score_sums, seq_len)
                aux_loss = dev if aux_loss is None else aux_loss + dev
        load = route.tokens_per_expert  # [S, E]
        load = load[0] if load.shape[0] == 1 else load.sum(0, dtype=torch.int32)
        return MoEOutput(y.view(B, L, h), aux_loss, load)

    @torch.no_grad()
    def update_selection_bias(self, tokens_per_expert: Tensor, rate: float = 1e-3) -> None:
        """DeepSeek-V3's loss-free balancing step: raise the selection bias of under-loaded
        experts and lower it for over-loaded ones by ``rate``."""
        bias = self.gate.e_score_correction_bias
        if bias is None:
            raise ValueError("update_selection_bias: the config has use_selection_bias=False")
        load = tokens_per_expert.to(bias.device, torch.float32)
        bias += rate * torch.sign(load.mean() - load)


# The seeds' README names of the expert modules (its experts.py).
Expert = SharedExpert = MLP
ExpertGroup = RoutedExperts


# ---------------------------------------------------------------- decoder block


class DeepSeekMoEBlock(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)), where mlp is the
    DeepSeekMoE layer or, per first_k_dense_replace / moe_layer_freq, a dense MLP."""

    def __init__(self, config: DeepSeekMoEConfig, layer_idx: int, moe_impl: str = "dsmoe") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = DeepSeekMoELayer(config, impl=moe_impl) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Optional[Tensor] = None,
        cache=None,
        cache_position: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Returns (hidden_states, aux_loss or None, tokens_per_expert [E] or None)."""
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), cos, sin, attn_mask, cache, cache_position)
        hidden_states = residual + hidden_states
        residual = hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        if self.is_moe:
            out, aux_loss, load = self.mlp(normed)
        else:
            out, aux_loss, load = self.mlp(normed), None, None
        return residual + out, aux_loss, load


__all__ = [
    "MOE_IMPLS",
    "RMSNorm",
    "RotaryEmbedding",
    "Attention",
    "MLP",
    "RouterOutput",
    "TopKRouter",
    "NoisyTopKRouter",
    "RoutedExperts",
    "routed_experts",
    "Expert",
    "SharedExpert",
    "ExpertGroup",
    "MoEOutput",
    "DeepSeekMoELayer",
    "DeepSeekMoEBlock",
]
