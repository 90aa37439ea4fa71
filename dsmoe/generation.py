"""KV cache and autoregressive generation (greedy and sampling, batched with left padding)."""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import check_positions

# The default of generate's eos_token_id: the model config's (an explicit None means no stop).
FROM_CONFIG = "config"
# Steps between the checks whether every row has finished (each check syncs with the device).
EOS_CHECK_INTERVAL = 8


class KVCache:
    """Past keys and values of every attention layer.

    * static (``max_length`` given): buffers [B, kv_heads, max_length, head_dim] per layer,
      written in place at ``cache_position``; attention runs over the whole buffer with a mask,
      so a decode step has fixed shapes (what ``torch.compile`` wants). Used by
      :func:`generate`.
    * dynamic (``max_length=None``): keys/values grow by concatenation.

    A static cache counts in ``seen_tokens`` the positions written when the model chose them
    itself (no ``cache_position`` given); a caller that passes ``cache_position`` owns the
    positions. A dynamic cache's length is that of its tensors.
    """

    def __init__(
        self,
        num_layers: int,
        max_length: Optional[int] = None,
        *,
        batch_size: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"KVCache: num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.max_length = max_length
        self.seen_tokens = 0
        if max_length is None:
            self.keys: List[Optional[Tensor]] = [None] * num_layers
            self.values: List[Optional[Tensor]] = [None] * num_layers
            return
        for name, value in (("max_length", max_length), ("batch_size", batch_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value is None or value < 1:
                raise ValueError(f"KVCache: a static cache needs {name} >= 1, got {value!r}")
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def static(cls, config, batch_size: int, max_length: int, dtype: torch.dtype = torch.float32, device=None) -> "KVCache":
        return cls(
            config.num_hidden_layers,
            max_length,
            batch_size=batch_size,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=dtype,
            device=device,
        )

    @classmethod
    def dynamic(cls, config) -> "KVCache":
        return cls(config.num_hidden_layers)

    @property
    def is_static(self) -> bool:
        return self.max_length is not None

    def get_seq_length(self) -> int:
        """Positions already held (the start position of the next tokens)."""
        if self.is_static:
            return self.seen_tokens
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def kv_length(self, new_tokens: int) -> int:
        """Length of the keys that attention sees after adding ``new_tokens``."""
        if self.is_static:
            return self.max_length
        return self.get_seq_length() + new_tokens

    def update(self, layer_idx: int, key: Tensor, value: Tensor, cache_position: Tensor) -> Tuple[Tensor, Tensor]:
        """Stores key/value [B, kv_heads, L, d] at ``cache_position`` [L]; returns all keys and
        values of the layer."""
        if self.is_static:
            k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
            if key.shape[0] != k_buf.shape[0]:
                raise ValueError(f"KVCache: batch size {key.shape[0]} does not match the cache's {k_buf.shape[0]}")
            k_buf.index_copy_(2, cache_position, key.to(k_buf.dtype))
            v_buf.index_copy_(2, cache_position, value.to(v_buf.dtype))
            return k_buf, v_buf
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]


def _warn_at_caller(message: str) -> None:
    """``warnings.warn`` pointed at the first frame outside dsmoe and torch (the user's line),
    whether generate was called directly, through the model or through no_grad. The frames are
    counted from this function's own, the one ``stacklevel=1`` names, so wrappers between it
    and generate (a decorator, a mutation-testing trampoline) cannot shift the count."""
    inside = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _filter_logits(logits: Tensor, top_k: Optional[int], top_p: Optional[float]) -> Tensor:
    """Masks (to -inf) all but the top_k logits and the smallest set whose probability reaches
    top_p (the most likely token always stays)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int = 20,
    *,
    do_sample: Optional[bool] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Union[int, Sequence[int], None, str] = FROM_CONFIG,
    pad_token_id: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    streamer: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """Continues ``input_ids`` [B, L] by up to ``max_new_tokens`` tokens; returns [B, L + n].

    Greedy unless sampling is asked for (``do_sample=True``, or any of temperature / top_k /
    top_p given; temperature 0 means greedy). Rows of a batch may be left-padded: pass
    ``attention_mask`` (1 = token, 0 = padding); positions then start at each row's first
    token, so a padded row generates what it would alone (a right-padded row cannot: it gets a
    warning). Once a row emits ``eos_token_id`` (default: the config's; ``None``: never stop) it
    is filled with ``pad_token_id`` (default: the eos id) and generation stops when every row
    is done; that is checked every EOS_CHECK_INTERVAL steps, not every step (each check waits
    for the device), and the result is cut where the last row finished. ``streamer`` is called
    with each step's new tokens [B]. The KV cache (static, one buffer of L + max_new_tokens) is
    used unless ``use_cache=False``. Prompt plus new tokens must fit max_position_embeddings.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"generate: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("generate: input_ids must hold at least one token per row")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"generate: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if temperature is not None and temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0, got {top_k}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"generate: {name} must be a finite number, got {value}")
    if do_sample is None:
        do_sample = temperature is not None or top_k is not None or top_p is not None
    if temperature == 0:
        do_sample = False
    temperature = 1.0 if temperature is None else float(temperature)
    config = model.config
    total = input_ids.shape[1] + max_new_tokens
    check_positions(config, total, f"generate (a prompt of {input_ids.shape[1]} tokens + max_new_tokens={max_new_tokens})")
    if isinstance(eos_token_id, str):
        if eos_token_id != FROM_CONFIG:
            raise ValueError(f"generate: eos_token_id must be an integer, a list of them or None, got {eos_token_id!r}")
        eos_token_id = config.eos_token_id
    eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else (config.pad_token_id if config.pad_token_id is not None else 0)

    device = input_ids.device
    B, L = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    # a meta-device run (shapes only) has no values to look at: no checks, no early stop
    has_values = device.type != "meta"
    if has_values and B > 1 and bool((attention_mask[:, -1] == 0).any()):  # one check per call
        _warn_at_caller(
            "generate: right padding detected (a row's last column is padding); new tokens follow "
            "the padding and differ from that row alone. Pad on the left for batched generation."
        )
    eos = torch.tensor(eos_ids, device=device, dtype=input_ids.dtype) if eos_ids and has_values else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    # the step at which every row had finished (max_new_tokens = not yet), kept on the device
    all_done_at = torch.full((), max_new_tokens, dtype=torch.long, device=device)
    tokens = input_ids
    if max_new_tokens == 0:
        return tokens

    def pick(logits: Tensor) -> Tensor:
        logits = logits.float()
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = _filter_logits(logits / temperature, top_k, top_p)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    cache = None
    if use_cache:
        param = next(model.parameters())
        cache = KVCache.static(config, B, total, dtype=param.dtype, device=device)
        # full-length mask: future columns are ones (causality hides them), so decode steps
        # keep one shape
        full_mask = torch.ones(B, total, dtype=torch.long, device=device)
        full_mask[:, :L] = attention_mask
        out = model(
            tokens,
            attention_mask=full_mask,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.arange(L, device=device),
            logits_to_keep=1,
        )
    else:
        out = model(tokens, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    for step in range(max_new_tokens):
        next_tokens = pick(out["logits"][:, -1, :])
        if eos is not None:
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
            finished = finished | torch.isin(next_tokens, eos)
            all_done_at = torch.where(finished.all() & (all_done_at == max_new_tokens), step, all_done_at)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens[:, None])], dim=1)
        if streamer is not None:
            streamer(next_tokens)
        if step == max_new_tokens - 1:
            break
        if eos is not None and (step + 1) % EOS_CHECK_INTERVAL == 0 and bool(finished.all()):
            break
        if use_cache:
            pos = L + step
            out = model(
                next_tokens[:, None],
                attention_mask=full_mask,
                past_key_values=cache,
                use_cache=True,
                cache_position=torch.tensor([pos], device=device),
                logits_to_keep=1,
            )
        else:
            out = model(tokens, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    if eos is not None:  # drop the steps run after every row had finished
        tokens = tokens[:, : L + int(all_done_at) + 1]
    return tokens


__all__ = ["KVCache", "generate", "FROM_CONFIG", "EOS_CHECK_INTERVAL"]
