"""The transformers face of dsmoe's DeepSeekMoE model: ``DeepseekConfig`` (a PreTrainedConfig) and
``DeepseekForCausalLM`` (PreTrainedModel + GenerationMixin), registered with AutoConfig,
AutoModelForCausalLM and AutoTokenizer for the released checkpoints' model type ``deepseek``
(transformers ships no class for it; the checkpoints carry remote code, which is not needed).

    import dsmoe, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained("deepseek-moe-16b-base", dtype="auto")
    tok = transformers.AutoTokenizer.from_pretrained("deepseek-moe-16b-base")

One implementation, two faces: ``DeepseekForCausalLM.model`` is dsmoe's
:class:`~dsmoe.model.DeepSeekMoEBackbone` and ``lm_head`` an ``nn.Linear``, so the parameter names
and numbers are those of :class:`dsmoe.DeepSeekMoEForCausalLM` (routed experts stacked as
``mlp.experts.w_gate_up`` [E, 2I, h] / ``w_down`` [E, h, I]). The released per-expert tensors are
stacked on load and split back on save by transformers' weight conversion (registered here), so
``save_pretrained`` writes the released layout.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .. import ops
from ..config import DeepSeekMoEConfig, check_positions
from ..model import DeepSeekMoEBackbone, init_module

MODEL_TYPE = "deepseek"
# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache``
# (generate passes ``cache=``); both names are accepted, the output uses the installed one's
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class DeepseekConfig(PreTrainedConfig):
    """The released deepseek-moe ``DeepseekConfig`` fields (and dsmoe's additions, see
    :class:`dsmoe.DeepSeekMoEConfig`), validated by it. ``output_router_logits`` as in
    transformers' MoE models. A loaded ``auto_map`` (pointers to remote code) is dropped: this
    class replaces that code, and a saved config must not point at files that are not there."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "num_shared_experts": "n_shared_experts",
        "num_routed_experts": "n_routed_experts",
        "num_experts_per_token": "num_experts_per_tok",
        "num_local_experts": "n_routed_experts",
    }

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    n_shared_experts: Optional[int] = None
    n_routed_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: Union[float, int] = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: Union[float, int] = 0.02
    rms_norm_eps: Union[float, int] = 1e-6
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 100000
    eos_token_id: Union[int, list, None] = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: Union[float, int] = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: Union[float, int] = 0.0
    device_aux_loss_alpha: Union[float, int] = 0.0
    num_expert_devices: int = 1
    router_type: str = "topk"
    use_selection_bias: bool = False
    output_router_logits: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("auto_map", None)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.to_dsmoe()  # validates every field (ValueError naming it)

    def to_dsmoe(self) -> DeepSeekMoEConfig:
        """The same architecture as a :class:`dsmoe.DeepSeekMoEConfig`."""
        return DeepSeekMoEConfig(**{name: getattr(self, name) for name in DeepSeekMoEConfig._DEFAULTS})

    @classmethod
    def from_dsmoe(cls, config: DeepSeekMoEConfig, **kwargs: Any) -> "DeepseekConfig":
        if not isinstance(config, DeepSeekMoEConfig):
            raise TypeError(f"from_dsmoe: config must be a DeepSeekMoEConfig, got {type(config).__name__}")
        return cls(**{name: getattr(config, name) for name in DeepSeekMoEConfig._DEFAULTS}, **kwargs)


class _CacheView:
    """A transformers :class:`Cache` seen through the interface dsmoe's attention and backbone use
    (:class:`dsmoe.KVCache`'s): the keys and values live in the transformers cache, so its
    beam reordering, cropping and offloading apply as usual."""

    def __init__(self, cache: Cache, past_length: int) -> None:
        self.cache = cache
        self.past_length = past_length
        self.is_static = bool(cache.is_compileable)

    def get_seq_length(self) -> int:
        return self.past_length

    def kv_length(self, new_tokens: int) -> int:
        return int(self.cache.get_mask_sizes(new_tokens, 0)[0])

    def update(self, layer_idx: int, key: Tensor, value: Tensor, cache_position: Tensor):
        # transformers' layers place new entries after their own count (== cache_position)
        return self.cache.update(key, value, layer_idx)


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepSeekMoEBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        init_module(module, self.config.initializer_range)


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    """DeepSeekMoE causal LM for transformers: ``model`` (dsmoe's backbone) + ``lm_head``.

    ``forward`` returns :class:`~transformers.modeling_outputs.MoeCausalLMOutputWithPast`: fp32
    ``logits``; ``loss`` (labels given; transformers' causal-LM loss, which shifts them) plus, in
    training mode, ``aux_loss``, the sum of the MoE layers' balance losses (``aux_loss_alpha``
    included, as the released code adds it to the gradients); ``router_logits`` per MoE layer
    [B*L, E] with ``output_router_logits``, which also reports (and adds to the loss) the
    balance losses outside training, as transformers' MoE models do; ``hidden_states`` with
    ``output_hidden_states``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekConfig, moe_impl: str = "dsmoe") -> None:
        super().__init__(config)
        self.model = DeepSeekMoEBackbone(config.to_dsmoe(), moe_impl=moe_impl)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def create_masks_for_generate(self, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Optional[Tensor]:
        # generate builds 4-d masks for static caches; dsmoe's backbone takes the 2-d padding mask
        # and derives causality from the cache slots itself
        return attention_mask

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        # refuse before any work, not at the step that passes the limit
        check_positions(
            self.model.config,
            generation_config.max_length,
            f"generate (a prompt of {input_ids_length} tokens, max_length={generation_config.max_length})",
        )

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_dsmoe(cls, model: nn.Module) -> "DeepseekForCausalLM":
        """The same weights (shared, not copied) behind the transformers face."""
        hf_config = DeepseekConfig.from_dsmoe(model.config)
        with torch.device("meta"):
            out = cls(hf_config, moe_impl=model.moe_impl)
        out.model = model.model
        out.lm_head = model.lm_head
        out.to(model.lm_head.weight.dtype)
        return out.train(model.training)

    def to_dsmoe(self):
        """The same weights (shared, not copied) behind :class:`dsmoe.DeepSeekMoEForCausalLM`."""
        from ..model import DeepSeekMoEForCausalLM

        with torch.device("meta"):
            out = DeepSeekMoEForCausalLM(self.model.config)
        out.model = self.model
        out.lm_head = self.lm_head
        return out.train(self.training)

    # ------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_position: Optional[Tensor] = None,
        logits_to_keep: Union[int, Tensor] = 0,
        cache: Optional[Cache] = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DeepseekForCausalLM.forward: pass exactly one of input_ids and inputs_embeds")
        if output_attentions:
            raise ValueError(
                "DeepseekForCausalLM: output_attentions is not supported (attention runs through "
                "scaled_dot_product_attention, which returns no weights)"
            )
        if cache is not None and past_key_values is not None:
            raise ValueError("DeepseekForCausalLM.forward: pass the KV cache as cache or past_key_values, not both")
        name = "cache" if cache is not None else "past_key_values"
        past_key_values = cache if cache is not None else past_key_values
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError(f"{name} must be a transformers Cache, got {type(past_key_values).__name__}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be the 2-d padding mask [batch, keys], got shape {tuple(attention_mask.shape)}"
            )
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states)
        output_router_logits = bool(
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.model.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # recomputed blocks would write the cache twice
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        view = None
        if use_cache:
            past = int(past_key_values.get_seq_length())
            check_positions(self.model.config, past + seq_len, "forward")
            if cache_position is None:
                device = (input_ids if input_ids is not None else inputs_embeds).device
                cache_position = torch.arange(past, past + seq_len, device=device)
            view = _CacheView(past_key_values, past)
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=view,
            cache_position=cache_position,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
        )
        hidden_states = out.hidden_states
        if isinstance(logits_to_keep, int):
            kept = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            kept = hidden_states[:, logits_to_keep]
        logits = self.lm_head(kept).float()

        aux_loss = out.aux_loss
        if aux_loss is None and output_router_logits:
            aux_loss = self.balance_loss(out.router_logits, hidden_states.shape[0])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.dtype)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=out.all_hidden_states,
            attentions=None,
            router_logits=out.router_logits,
            **{_CACHE_FIELD: past_key_values if use_cache else None},
        )


    def balance_loss(self, router_logits: Tuple[Tensor, ...], batch_size: int) -> Optional[Tensor]:
        """The sum of the MoE layers' balance losses (as their training-mode forward computes
        them) from their router logits [B*L, E]: what ``aux_loss`` reports outside training
        when ``output_router_logits`` is asked for, as transformers' MoE models do."""
        total = None
        for layer, logits in zip((b.mlp for b in self.model.layers if b.is_moe), router_logits):
            if layer.balance_loss is None and layer.device_balance_loss is None:
                continue
            num_seqs = batch_size if layer.seq_aux else 1
            bias = layer.gate.e_score_correction_bias
            route = ops.gate(logits, layer.top_k, layer.gate.normalize, None if bias is None else bias.float(), num_seqs)
            seq_len = logits.shape[0] // num_seqs
            for loss_fn in (layer.balance_loss, layer.device_balance_loss):
                if loss_fn is not None:
                    loss = loss_fn(route.tokens_per_expert, route.score_sums, seq_len)
                    total = loss if total is None else total + loss
        return total


def _expert_weight_conversions():
    """Released per-expert tensors <-> dsmoe's stacked experts (gate rows, then up rows)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    return [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.w_gate_up",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.w_down",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


_registered = False


def register() -> None:
    """Registers the classes with AutoConfig, AutoModelForCausalLM and AutoTokenizer and the
    expert weight conversion for model type ``deepseek`` (idempotent; done when this module is
    imported, which ``import dsmoe`` arranges for the moment transformers is imported)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    AutoConfig.register(MODEL_TYPE, DeepseekConfig, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekConfig, DeepseekForCausalLM, exist_ok=True)
    # a directory with tokenizer.json but no tokenizer_config.json naming a class
    AutoTokenizer.register(DeepseekConfig, tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)
    register_checkpoint_conversion_mapping(MODEL_TYPE, _expert_weight_conversions(), overwrite=True)
    _registered = True


register()

__all__ = ["DeepseekConfig", "DeepseekPreTrainedModel", "DeepseekForCausalLM", "register", "MODEL_TYPE"]
