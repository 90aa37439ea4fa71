"""The CPU decode path of the MoE layer: routed + shared experts of a few tokens through
:func:`dsmoe.ops.moe_decode` on weights packed once (:func:`dsmoe.ops.pack_decode_weights`).

Generation runs the MoE layer on one token per sequence per step, where the time goes into
reading the selected experts' weights. The packed layout lets one parallel pass read each of
them once at the machine's read bandwidth (docs/cpu_performance.md); the training path keeps
the plain stacked weights.

The packed copies live in a cache keyed by the weight tensor (the ``nn.Parameter`` object, held
weakly) and are rebuilt only when that weight changed: another storage (``.to(dtype)``,
``p.data = ...``), another shape/dtype/stride, or an in-place write, which bumps the tensor's
version counter (``copy_``, ``load_state_dict``, most optimizer steps). torch's fused
optimizers (``fused=True``, which ``dsmoe train`` uses on CPU) write without bumping it, so
every optimizer step drops the cache (a global step hook, registered with the first packed
copy). Writes through ``p.data`` bypass the version counter: call :func:`clear_cache` after
those. The cache holds one packed copy per weight (the expert weights' size again); the
``cpu_decode`` setting (``dsmoe.set_backend``, default from ``DSMOE_CPU_DECODE``, read once)
turns the path off.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from ._ext import _C

# Tokens (rows of the layer's input) up to which the MoE layer takes the decode path on CPU.
# Measured with benchmarks/bench_decode.py (h1280 I352 E63 k7 + 2 shared, 2 threads, AVX2):
# the decode path stays ahead of the ops pipeline up to 64 tokens in fp32 and bf16.
DECODE_MAX_TOKENS = 64

_DECODE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# weight tensor -> (signature of every tensor packed from, packed weights)
# (keyed by identity: tensors compare by value)
_cache = WeakIdKeyDictionary()


def enabled() -> bool:
    """Whether the MoE layer may take the decode path (the ``cpu_decode`` setting, default on)."""
    from .backend import backend_settings

    return backend_settings().cpu_decode


def clear_cache() -> None:
    """Drops every packed copy (they are rebuilt on next use)."""
    _cache.clear()


def _signature(tensors: Sequence[Tensor]) -> tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype) for t in tensors)


def _pack(w_gate_up: Tensor, w_down: Tensor) -> ops.PackedDecodeWeights:
    """:func:`dsmoe.ops.pack_decode_weights` in one parallel pass straight into its final
    buffers, on huge pages where they span 2 MiB or more (the ``huge_pages`` setting): the packed
    copies are streamed by every decode step, as the expert weights are."""
    from .backend import new_weight

    if w_gate_up.dim() != 3 or w_down.dim() != 3 or w_gate_up.shape[1] % 2:
        return ops.pack_decode_weights(w_gate_up, w_down)  # refuses them, naming what is wrong
    E, two_i, h = w_gate_up.shape
    nb, nbh = -(-(two_i // 2) // 8), -(-h // 8)
    gate_up = new_weight((E, nb, h, 16), dtype=w_gate_up.dtype)
    down = new_weight((E, nbh, 8 * nb, 8), dtype=w_gate_up.dtype)
    _C.pack_decode_weights_into(w_gate_up, w_down, gate_up, down)
    return ops.PackedDecodeWeights(gate_up, down)


_step_hook = None


def _clear_after_optimizer_steps() -> None:
    """Drops the cache after every optimizer step of any optimizer: fused ones (AdamW/Adam/SGD
    with ``fused=True``) update the weights in place without bumping their version counters."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(lambda *_: clear_cache())


def _packed(key: Tensor, sources: Sequence[Tensor], make) -> ops.PackedDecodeWeights:
    """The packed form of ``sources`` cached under ``key``, rebuilt when any source changed."""
    sig = _signature(sources)
    hit = _cache.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    _cache.pop(key, None)  # the old copy goes before the new one is made: one extra copy at most
    with torch.no_grad():
        packed = make()
    _clear_after_optimizer_steps()
    _cache[key] = (sig, packed)
    return packed


def packed_experts(w_gate_up: Tensor, w_down: Tensor) -> ops.PackedDecodeWeights:
    """The packed form of stacked routed-expert weights w_gate_up [E, 2I, h], w_down [E, h, I],
    made on first use and cached."""
    return _packed(w_gate_up, (w_gate_up, w_down), lambda: _pack(w_gate_up.detach(), w_down.detach()))


def packed_mlp(w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> ops.PackedDecodeWeights:
    """A dense SwiGLU MLP (gate_proj [I, h], up_proj [I, h], down_proj [h, I] weights, the shared
    experts) packed as one expert, cached."""
    from .backend import stacked_alias

    def make():
        gate_up = stacked_alias(w_gate.detach(), w_up.detach())  # the MLP keeps them back to back
        if gate_up is None:
            gate_up = torch.cat([w_gate.detach(), w_up.detach()])
        return _pack(gate_up.unsqueeze(0), w_down.detach().unsqueeze(0))

    return _packed(w_gate, (w_gate, w_up, w_down), make)


def decode_routed_experts(
    x: Tensor,
    weights: Tensor,
    expert_ids: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    shared_mlp: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """y[t] = sum_j weights[t, j] * expert_{expert_ids[t, j]}(x[t]) (+ shared_mlp(x[t])) through
    :func:`dsmoe.ops.moe_decode` on cached packed weights: the routed experts as stacked
    ``w_gate_up`` [E, 2I, h] / ``w_down`` [E, h, I]; ``shared_mlp`` the (gate, up, down) weights
    of the shared experts' MLP. Inference only."""
    packed = packed_experts(w_gate_up, w_down)
    shared = packed_mlp(*shared_mlp) if shared_mlp is not None else None
    return ops.moe_decode(x, weights, expert_ids, packed, shared)


def prepack(model: torch.nn.Module) -> int:
    """Packs the weights of every MoE layer of ``model`` that can take the decode path (CPU,
    a dtype the kernel reads) now rather than on its first decode step; returns how many layers.
    For serving: loading a model, then prepack, keeps the packing out of the first request."""
    from .backend import _plain_linear
    from .layers import DeepSeekMoELayer, MLP, RoutedExperts

    n = 0
    for layer in model.modules():
        if type(layer) is not DeepSeekMoELayer or type(layer.experts) is not RoutedExperts:
            continue
        w = layer.experts.w_gate_up
        if w.device.type != "cpu" or w.dtype not in _DECODE_DTYPES:
            continue
        packed_experts(w, layer.experts.w_down)
        shared = layer.shared_experts
        if type(shared) is MLP and all(_plain_linear(m) for m in (shared.gate_proj, shared.up_proj, shared.down_proj)):
            packed_mlp(shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
        n += 1
    return n


def applies(x: Tensor, tensors: Sequence[Tensor], training: bool) -> bool:
    """Whether a forward of ``x`` [T, h] over the weights ``tensors`` may take the decode path:
    enabled, eager (the compiler traces the plain ops), CPU, T <= DECODE_MAX_TOKENS, not
    training, nothing that needs a gradient, no autocast, one dtype the kernel reads, plain
    tensors (not sharded)."""
    if training or torch.compiler.is_compiling():  # the settings are read eagerly only
        return False
    if x.device.type != "cpu" or x.dim() != 2 or x.shape[0] > DECODE_MAX_TOKENS or x.dtype not in _DECODE_DTYPES:
        return False
    if not enabled():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.dtype != x.dtype:
            return False
        if grad and t.requires_grad:
            return False
    return not (grad and x.requires_grad)


def moe_layer_decode(layer, x: Tensor, weights: Tensor, expert_ids: Tensor) -> Optional[Tensor]:
    """The routed + shared experts of a :class:`dsmoe.layers.DeepSeekMoELayer` on ``x`` [T, h]
    through the decode path, or None where it does not apply (:func:`applies`; experts that are
    not the plain RoutedExperts / shared experts that are not plain nn.Linear)."""
    from .backend import _plain_linear
    from .layers import MLP, RoutedExperts

    experts, shared = layer.experts, layer.shared_experts
    if type(experts) is not RoutedExperts:
        return None
    tensors = [experts.w_gate_up, experts.w_down]
    shared_mlp = None
    if shared is not None:
        if type(shared) is not MLP or not all(_plain_linear(m) for m in (shared.gate_proj, shared.up_proj, shared.down_proj)):
            return None
        shared_mlp = (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
        tensors += list(shared_mlp)
    if not applies(x, tensors, layer.training):
        return None
    return decode_routed_experts(x, weights, expert_ids, experts.w_gate_up, experts.w_down, shared_mlp)


__all__ = [
    "DECODE_MAX_TOKENS",
    "enabled",
    "clear_cache",
    "packed_experts",
    "packed_mlp",
    "decode_routed_experts",
    "prepack",
    "applies",
    "moe_layer_decode",
]
