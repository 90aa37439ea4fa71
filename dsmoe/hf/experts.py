"""The ``"dsmoe"`` experts implementation of transformers' MoE models.

transformers 5 stores a MoE layer's experts stacked (``gate_up_proj`` [E, 2I, h], ``down_proj``
[E, h, I]; [E, h, 2I] and [E, I, h] where the class is ``is_transposed``) and dispatches their
forward, ``fn(self, hidden_states [T, h], top_k_index [T, k], top_k_weights [T, k])``, through
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``. :func:`dsmoe_experts_forward` runs it as
dsmoe's own layer does (the same backend method,
:meth:`dsmoe.backend.DsmoeBackend.routed_experts`: permute -> grouped GEMM -> SwiGLU -> grouped
GEMM -> unpermute) on the module's own parameters, with no copy of the weights, forward
and backward; the model keeps its own router. int64 ids and routing weights in the model's dtype
go into the ops as transformers gives them; expert-parallel sentinel ids (>= E) cost nothing and
contribute zero.

dsmoe's math is gate|up concatenated, SiLU-gated, bias-free experts. A family that needs anything
else (GPT-OSS: expert biases, interleaved gate/up, clamped SwiGLU) is refused with a ValueError
when ``"dsmoe"`` is set (``set_experts_implementation``, ``from_pretrained(...,
experts_implementation="dsmoe")`` or a config naming it), never computed differently.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers.activations import SiLUActivation
    from transformers.integrations import moe as _hf_moe
    from transformers.modeling_utils import PreTrainedModel
except ImportError as e:  # pragma: no cover - exercised by the no-transformers test
    raise ImportError(
        "dsmoe.hf needs Hugging Face transformers >= 5 (pip install 'dsmoe[hf]'); "
        f"importing it failed: {e}"
    ) from e

from ..backend import get_backend

IMPLEMENTATION = "dsmoe"

# Display names of the families people ask for by name (the rest show their model_type).
_FAMILY_NAMES = {"gpt_oss": "GPT-OSS"}


def _family(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None) or "unknown"
    name = _FAMILY_NAMES.get(model_type, model_type)
    return f"{name} (model_type {model_type!r}, {type(module).__name__})"


def _is_silu(act_fn) -> bool:
    return isinstance(act_fn, (nn.SiLU, SiLUActivation))


def unsupported_features(module: nn.Module) -> list:
    """What an experts module built by transformers' ``use_experts_implementation`` needs that
    dsmoe's experts do not compute; empty where dsmoe runs it exactly."""
    missing = []
    if getattr(module, "has_bias", False):
        missing.append("expert biases (has_bias=True; dsmoe's grouped_gemm has no bias input)")
    if not getattr(module, "has_gate", True):
        missing.append("non-gated experts (has_gate=False; dsmoe computes SwiGLU experts)")
    if not getattr(module, "is_concatenated", True):
        missing.append("interleaved gate/up columns (is_concatenated=False; dsmoe's swiglu takes [gate | up])")
    if getattr(module, "has_post_expert_norm", False):
        missing.append("a norm after each expert (has_post_expert_norm=True)")
    if type(module)._apply_gate is not _hf_moe._default_apply_gate:
        missing.append(
            f"a custom gate activation ({type(module).__name__}._apply_gate, e.g. GPT-OSS's clamped "
            "SwiGLU with alpha and up + 1; dsmoe computes silu(gate) * up)"
        )
    elif not _is_silu(getattr(module, "act_fn", None)):
        missing.append(f"the activation {type(getattr(module, 'act_fn', None)).__name__} (dsmoe computes silu(gate) * up)")
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(module, name, None)
        if not isinstance(p, Tensor) or p.dim() != 3:
            missing.append(f"{name} as a stacked [num_experts, ., .] tensor (got {type(p).__name__})")
        elif p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            missing.append(f"{name} of dtype {p.dtype} (dsmoe's GEMMs take fp32/bf16/fp16/fp64 weights)")
    num_experts, weights = getattr(module, "num_experts", None), getattr(module, "gate_up_proj", None)
    if isinstance(num_experts, int) and isinstance(weights, Tensor) and weights.dim() == 3 and weights.shape[0] != num_experts:
        # ids >= the weights' expert count are dropped as sentinels: they must mean just that
        missing.append(f"num_experts={num_experts} equal to the experts in gate_up_proj ({weights.shape[0]})")
    return missing


def check_experts_module(module: nn.Module) -> None:
    """Raises ValueError naming the family and the missing features where dsmoe cannot compute
    ``module``'s experts exactly."""
    missing = unsupported_features(module)
    if missing:
        raise ValueError(
            f'experts_implementation="dsmoe" does not support {_family(module)}: it needs '
            + "; ".join(missing)
            + '. Use another experts_implementation (e.g. "grouped_mm") for this model.'
        )


def _experts_modules(model: nn.Module):
    """The experts modules of ``model`` dispatched through transformers' experts registry."""
    for m in model.modules():
        if hasattr(m, "is_concatenated") and hasattr(m, "_is_expert_parallel") and hasattr(m, "_apply_gate"):
            yield m


def check_model(model: nn.Module) -> None:
    """check_experts_module on every experts module of ``model``."""
    for m in _experts_modules(model):
        check_experts_module(m)


def dsmoe_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The experts' output [T, h] for tokens ``hidden_states`` [T, h] routed to ``top_k_index``
    [T, k] (int64 or int32; ids >= E are expert-parallel sentinels: zero, no compute) with
    ``top_k_weights`` [T, k] (any float dtype). Returned in ``hidden_states``' dtype."""
    check_experts_module(self)  # attribute reads only; cheap, and constant under torch.compile
    x = hidden_states
    w_gate_up, w_down = self.gate_up_proj, self.down_proj
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != w_gate_up.dtype:
        x = x.to(w_gate_up.dtype)  # as transformers' grouped_mm: the GEMMs run in the weights' dtype
    y = get_backend("dsmoe").routed_experts(
        x, top_k_weights, top_k_index, w_gate_up, w_down, training=self.training, trans_b=not self.is_transposed
    )
    return y.to(hidden_states.dtype)


_original_get_correct = PreTrainedModel.get_correct_experts_implementation
_original_post_init = PreTrainedModel.post_init


def _get_correct_experts_implementation(self, requested_experts):
    # set_experts_implementation calls this on the built model: refuse unsupported experts there
    applicable = _original_get_correct(self, requested_experts)
    if applicable == IMPLEMENTATION:
        check_model(self)
    return applicable


def _post_init(self):
    # a model built with experts_implementation="dsmoe" (from_pretrained, or a config naming it):
    # the experts modules exist only from here on
    _original_post_init(self)
    if getattr(self.config, "_experts_implementation", None) == IMPLEMENTATION:
        check_model(self)


def register() -> None:
    """Registers ``"dsmoe"`` in transformers' experts registry and the check of the experts
    modules when it is set (idempotent)."""
    _hf_moe.ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, dsmoe_experts_forward)
    PreTrainedModel.get_correct_experts_implementation = _get_correct_experts_implementation
    PreTrainedModel.post_init = _post_init


__all__ = ["IMPLEMENTATION", "check_experts_module", "check_model", "dsmoe_experts_forward", "register", "unsupported_features"]
