"""The DeepSeekMoE causal language model (Hugging Face deepseek-moe architecture and names) on the
dsmoe operators.

    model = DeepSeekMoEForCausalLM(get_preset("tiny"))
    out = model(input_ids, labels=input_ids)      # out["logits"], out.loss, out.aux_loss
    model.generate(input_ids, max_new_tokens=20)
    model.save_pretrained("ckpt"); DeepSeekMoEForCausalLM.from_pretrained("ckpt")

``loss`` = next-token cross entropy + ``aux_loss`` (the sum of the balance losses of every MoE
layer, present in training mode), which gives the same gradients as the seeds' code (whose
AddAuxiliaryLoss injects the balance-loss gradient into backward).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import DeepSeekMoEConfig, check_positions
from .generation import KVCache, generate as _generate
from .layers import (
    DeepSeekMoEBlock,
    DeepSeekMoELayer,
    RMSNorm,
    RotaryEmbedding,
    RoutedExperts,
    TopKRouter,
    _check_impl,
)
from .losses import lm_loss


@dataclass
class CausalLMOutput:
    """Model output; fields are reachable as attributes or by key (``out["logits"]``)."""

    logits: Optional[Tensor] = None  # [B, L, vocab] fp32
    loss: Optional[Tensor] = None  # LM loss + aux_loss, when labels are given
    aux_loss: Optional[Tensor] = None  # sum of the MoE balance losses (training mode)
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[Tensor] = None  # final normed hidden states [B, L, h]
    tokens_per_expert: Optional[Tuple[Tensor, ...]] = None  # per MoE layer, [E] int32

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def keys(self) -> List[str]:
        return [f.name for f in fields(self)]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in self.keys() else default

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


@torch.no_grad()
def init_module(module: nn.Module, std: float) -> None:
    """The seeds' initialisation of one module: normal(0, std) for linear, embedding and expert
    weights (padding row zeroed), ones for norms, kaiming-uniform router weights. Shared by
    :class:`DeepSeekMoEForCausalLM` and the transformers face (dsmoe.hf)."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, (RoutedExperts, TopKRouter)):
        module.reset_parameters()
    elif isinstance(module, RMSNorm):
        module.weight.fill_(1.0)


class DeepSeekMoEBackbone(nn.Module):
    """Embeddings, decoder blocks and the final RMSNorm (the Hugging Face ``model.`` prefix)."""

    def __init__(self, config: DeepSeekMoEConfig, moe_impl: str = "dsmoe") -> None:
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(
            [DeepSeekMoEBlock(config, i, moe_impl=moe_impl) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # activation checkpointing of every decoder block in training (set_gradient_checkpointing,
        # or transformers' gradient_checkpointing_enable on the transformers face)
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    def _mask(
        self, attention_mask: Optional[Tensor], B: int, L: int, kv_len: int, cache_position: Tensor, past: bool
    ) -> Optional[Tensor]:
        """[B, 1, L, kv] bool (True = attend), or None when plain causal attention over these L
        tokens is exact (no padding, nothing cached before)."""
        if attention_mask is None and not past and kv_len == L:
            return None
        key_idx = torch.arange(kv_len, device=cache_position.device)
        allowed = key_idx[None, :] <= cache_position[:, None]  # [L, kv] causal by cache slot
        allowed = allowed[None].expand(B, L, kv_len)
        if attention_mask is not None:
            if attention_mask.shape[1] > kv_len:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} columns but the keys span {kv_len} positions"
                )
            keep = attention_mask.bool()
            if keep.shape[1] < kv_len:  # later columns are future slots: causality hides them
                keep = torch.cat([keep, keep.new_ones(B, kv_len - keep.shape[1])], dim=1)
            # a padding query sees only itself, so no row is all-masked (which would give NaN)
            allowed = (allowed & keep[:, None, :]) | (key_idx[None, None, :] == cache_position[None, :, None])
        return allowed[:, None]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        cache_position: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
    ) -> "BackboneOutput":
        """Returns :class:`BackboneOutput`: the normed hidden states [B, L, h], the summed aux
        loss (or None), the tokens per expert of each MoE layer, and on request every layer's
        input plus the final normed states (``output_hidden_states``) and each MoE layer's
        router logits [B*L, E] (``output_router_logits``)."""
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        B, L, _ = inputs_embeds.shape
        device = inputs_embeds.device
        cache = past_key_values
        past_len = cache.get_seq_length() if cache is not None else 0
        kv_len = cache.kv_length(L) if cache is not None else L
        if cache is None or not cache.is_static or cache_position is None:
            # a caller passing cache_position into a static cache owns the positions (generate
            # checks its whole length up front)
            check_positions(self.config, past_len + L, "forward")
        if cache_position is None:
            if cache is not None and cache.is_static:
                if past_len + L > cache.max_length:
                    raise ValueError(
                        f"the static KVCache holds {cache.max_length} positions; {past_len} are used and "
                        f"{L} more do not fit"
                    )
                cache.seen_tokens = past_len + L
            cache_position = torch.arange(past_len, past_len + L, device=device)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
                raise ValueError(
                    f"attention_mask must be [batch, keys] with batch {B}, got shape {tuple(attention_mask.shape)}"
                )
        if position_ids is None:
            if attention_mask is not None:
                # left padding: each row's positions start at its first real token
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                if positions.shape[1] < kv_len:
                    extra = torch.arange(1, kv_len - positions.shape[1] + 1, device=device)
                    positions = torch.cat([positions, positions[:, -1:] + extra], dim=1)
                position_ids = positions[:, cache_position]
            else:
                position_ids = cache_position[None, :].expand(B, L)
        has_past = cache is not None and (cache.is_static or past_len > 0)
        mask = self._mask(attention_mask, B, L, kv_len, cache_position, has_past)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)

        router_logits: List[Tensor] = []
        hooks = []
        if output_router_logits:
            for layer in self.layers:
                if layer.is_moe:
                    gate = layer.mlp.gate
                    # the router's input is [T, h]; its logits without the training noise
                    hooks.append(gate.register_forward_hook(
                        lambda module, args, out: router_logits.append(F.linear(args[0], module.weight))
                    ))
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and cache is not None:
            # backward would run each block again and write its keys into the cache a second time
            raise ValueError(
                "a KV cache (use_cache / past_key_values) cannot be combined with gradient checkpointing "
                "in training: pass use_cache=False, or run under torch.no_grad() or eval()"
            )
        hidden_states = inputs_embeds
        all_hidden: List[Tensor] = []
        aux_loss: Optional[Tensor] = None
        loads: List[Tensor] = []
        try:
            for layer in self.layers:
                if output_hidden_states:
                    all_hidden.append(hidden_states)
                if checkpointing:
                    hidden_states, layer_aux, load = self._gradient_checkpointing_func(
                        layer.__call__, hidden_states, cos, sin, mask, cache, cache_position
                    )
                else:
                    hidden_states, layer_aux, load = layer(hidden_states, cos, sin, mask, cache, cache_position)
                if layer_aux is not None:
                    aux_loss = layer_aux if aux_loss is None else aux_loss + layer_aux
                if load is not None:
                    loads.append(load)
        finally:
            for hook in hooks:
                hook.remove()
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return BackboneOutput(
            hidden_states,
            aux_loss,
            tuple(loads),
            tuple(all_hidden) if output_hidden_states else None,
            tuple(router_logits) if output_router_logits else None,
        )


class BackboneOutput(NamedTuple):
    hidden_states: Tensor  # final normed hidden states [B, L, h]
    aux_loss: Optional[Tensor]  # sum of the MoE balance losses (training mode), or None
    tokens_per_expert: Tuple[Tensor, ...]  # per MoE layer, [E] int32
    all_hidden_states: Optional[Tuple[Tensor, ...]]  # each layer's input, then the final normed states
    router_logits: Optional[Tuple[Tensor, ...]]  # per MoE layer, [B*L, E]


class DeepSeekMoEForCausalLM(nn.Module):
    """DeepSeekMoE causal LM: ``model`` (:class:`DeepSeekMoEBackbone`) + ``lm_head``.

    ``moe_impl`` chooses how every MoE layer runs: ``"dsmoe"`` (fused ops) or ``"reference"``
    (plain PyTorch); both compute the same function."""

    def __init__(self, config: DeepSeekMoEConfig, moe_impl: str = "dsmoe") -> None:
        super().__init__()
        if not isinstance(config, DeepSeekMoEConfig):
            raise TypeError(f"config must be a DeepSeekMoEConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.model = DeepSeekMoEBackbone(config, moe_impl=_check_impl(moe_impl))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    # ------------------------------------------------------------ init / properties
    @torch.no_grad()
    def init_weights(self) -> None:
        """The seeds' initialisation (see :func:`init_module`) of every module."""
        for module in self.modules():
            init_module(module, self.config.initializer_range)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def moe_impl(self) -> str:
        for layer in self.moe_layers():
            return layer.impl
        return "dsmoe"

    def set_moe_impl(self, impl: str) -> None:
        _check_impl(impl)
        for layer in self.moe_layers():
            layer.impl = impl

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recomputes each decoder block's activations in backward (training mode only)."""
        self.model.gradient_checkpointing = bool(enable)

    def moe_layers(self) -> List[DeepSeekMoELayer]:
        return [block.mlp for block in self.model.layers if block.is_moe]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def update_selection_bias(self, tokens_per_expert: Tuple[Tensor, ...], rate: float = 1e-3) -> None:
        """Applies :meth:`DeepSeekMoELayer.update_selection_bias` to every MoE layer with the
        ``tokens_per_expert`` of an output (config.use_selection_bias must be on)."""
        layers = self.moe_layers()
        if len(tokens_per_expert) != len(layers):
            raise ValueError(f"tokens_per_expert has {len(tokens_per_expert)} entries for {len(layers)} MoE layers")
        for layer, load in zip(layers, tokens_per_expert):
            layer.update_selection_bias(load, rate)

    # ------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: Optional[bool] = None,
        position_ids: Optional[Tensor] = None,
        cache_position: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """``input_ids`` [B, L]; ``attention_mask`` [B, keys] (1 = token, 0 = padding; covers the
        cached positions too); ``labels`` [B, L] (-100 = ignore) gives ``loss``; ``logits_to_keep``
        > 0 computes the logits of the last that many positions only (generation);
        ``past_key_values`` a :class:`KVCache` (a dynamic one is made when ``use_cache`` and none
        is given); ``cache_position`` [L] the cache slots of these tokens (default: after the
        cached ones)."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("forward: pass input_ids or inputs_embeds")
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise TypeError(
                f"past_key_values must be a dsmoe.KVCache (from a previous output or KVCache.static), "
                f"got {type(past_key_values).__name__}"
            )
        if use_cache is None:
            use_cache = past_key_values is not None
        if use_cache and past_key_values is None:
            past_key_values = KVCache.dynamic(self.config)
        hidden_states, aux_loss, loads, _, _ = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if use_cache else None,
            cache_position=cache_position,
            inputs_embeds=inputs_embeds,
        )
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")
        kept = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        logits = self.lm_head(kept).float()
        loss = None
        if labels is not None:
            loss = lm_loss(logits, labels)
            if aux_loss is not None:
                loss = loss + aux_loss
        return CausalLMOutput(
            logits=logits,
            loss=loss,
            aux_loss=aux_loss,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=hidden_states,
            tokens_per_expert=loads,
        )

    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, **kwargs: Any) -> Tensor:
        """See :func:`dsmoe.generation.generate`; runs in eval mode and restores the mode."""
        was_training = self.training
        self.eval()
        try:
            return _generate(self, input_ids, max_new_tokens, **kwargs)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: Optional[int | str] = None) -> None:
        """config.json + safetensors in the Hugging Face deepseek-moe layout (sharded with
        model.safetensors.index.json when ``max_shard_size`` is exceeded), written atomically;
        the tokenizer files of the directory the model was loaded from come along. transformers
        opens the directory with AutoModelForCausalLM after ``import dsmoe``."""
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: Optional[torch.dtype | str] = None,
        torch_dtype: Optional[torch.dtype | str] = None,
        device: Optional[str | torch.device | int] = None,
        device_map: Any = None,
        moe_impl: str = "dsmoe",
        **config_overrides: Any,
    ) -> "DeepSeekMoEForCausalLM":
        """Loads a checkpoint directory (ours or a released deepseek-moe one). ``dtype`` (alias
        ``torch_dtype``): a dtype, a name or "auto"; default the stored one. ``device`` or
        ``device_map`` (one device, or {"": device}; a map over several devices is refused).
        Other keywords must be config fields to override (anything else is a TypeError). The
        directory's NaN/inf weights are refused, naming the first such tensor."""
        from .checkpoint import load_pretrained

        return load_pretrained(
            cls, path, dtype=dtype, torch_dtype=torch_dtype, device=device, device_map=device_map,
            moe_impl=moe_impl, **config_overrides,
        )


# The seeds' README calls the full language model DeepSeekMoEModel (its outputs carry
# "logits" and it has generate); Hugging Face calls the bare stack DeepseekModel, which is
# DeepSeekMoEBackbone here.
DeepSeekMoEModel = DeepSeekMoEForCausalLM

__all__ = ["BackboneOutput", "CausalLMOutput", "DeepSeekMoEBackbone", "DeepSeekMoEForCausalLM", "DeepSeekMoEModel"]
