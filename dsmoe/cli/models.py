"""Glue between the command line and the model package: configs from presets or files, the
three architectures of the paper's comparison as ordinary configs, loading checkpoints with
one-line errors. The expert ablation itself is dsmoe.analysis."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import analysis
from .common import CLIError, read_json

# The architectures compared in the paper (its Figure 1 / Table 1), at a size a 2-core CPU
# trains in minutes, laid out as the paper's 2B validation: activated expert parameters = 2
# standard FFNs per token for all three, total expert parameters = 16 standard FFNs for both MoEs:
#   dense     one FFN of 2 x 256 = 512
#   gshard    16 experts of 256, top-2, no shared expert, top-2 gates normalised to sum 1
#             (GShard's gating, Lepikhin et al. 2020, Algorithm 1)
#   deepseek  granularity m = 4: experts of 64; 1 shared + 63 routed, top-7  -> (1+7) x 64 = 512
#             activated, (1+63) x 64 = 4096 = 16 x 256 total; gates not renormalised (the paper's)
COMPARE_BASE = dict(
    vocab_size=259, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=1024, initializer_range=0.02, aux_loss_alpha=0.01, seq_aux=True,
    first_k_dense_replace=0, moe_layer_freq=1, bos_token_id=256, eos_token_id=257, pad_token_id=None,
)


def compare_configs(hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, ffn: int = 256,
                    experts: int = 16, granularity: int = 4, shared: int = 1) -> dict[str, dict[str, Any]]:
    """Config dicts of the dense / GShard / DeepSeekMoE variants (see COMPARE_BASE).

    ``ffn`` is the standard expert's intermediate size, ``experts`` the GShard expert count (top-2),
    ``granularity`` m splits each into m experts of ffn/m, ``shared`` of those are shared; the
    fine-grained model routes to 2m - shared of the m*experts - shared routed experts."""
    for name, v, lo in (("hidden_size", hidden_size, 2), ("num_layers", num_layers, 1), ("num_heads", num_heads, 1),
                        ("ffn", ffn, 1), ("experts", experts, 2), ("granularity", granularity, 1), ("shared", shared, 0)):
        if v < lo:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    if ffn % granularity:
        raise CLIError(f"--granularity {granularity} must divide --ffn {ffn}")
    k_fine = 2 * granularity - shared
    routed_fine = experts * granularity - shared
    if k_fine < 1 or k_fine > routed_fine:
        raise CLIError(f"--shared {shared} leaves no routed expert to choose (granularity {granularity})")
    base = {**COMPARE_BASE, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_heads}
    return {
        "dense": {**base, "intermediate_size": 2 * ffn, "moe_intermediate_size": ffn,
                  "n_routed_experts": None, "n_shared_experts": None, "num_experts_per_tok": None},
        "gshard": {**base, "intermediate_size": 2 * ffn, "moe_intermediate_size": ffn,
                   "n_routed_experts": experts, "n_shared_experts": None, "num_experts_per_tok": 2,
                   "norm_topk_prob": True},
        "deepseekmoe": {**base, "intermediate_size": 2 * ffn, "moe_intermediate_size": ffn // granularity,
                        "n_routed_experts": routed_fine, "n_shared_experts": shared or None,
                        "num_experts_per_tok": k_fine, "norm_topk_prob": False},
    }


CLI_PRESETS = {f"compare-{name}": cfg for name, cfg in compare_configs().items()}


def preset_names() -> list[str]:
    from dsmoe import config as cfgmod

    return list(cfgmod.preset_names()) + list(CLI_PRESETS)


def make_config(preset: str | None = None, config_path: str | None = None, overrides: dict | None = None):
    """A DeepSeekMoEConfig from a preset name or a config.json (file or checkpoint folder)."""
    from dsmoe.config import DeepSeekMoEConfig, get_preset

    overrides = dict(overrides or {})
    try:
        if config_path is not None:
            p = Path(config_path).expanduser()
            if p.is_dir():
                p = p / "config.json"
            data = read_json(p, "--config")
            return DeepSeekMoEConfig.from_dict(data, **overrides)
        name = preset or "small"
        if name in CLI_PRESETS:
            return DeepSeekMoEConfig(**{**CLI_PRESETS[name], **overrides})
        return get_preset(name, **overrides)
    except (ValueError, TypeError) as e:
        src = f"--config {config_path}" if config_path is not None else f"--preset {preset or 'small'}"
        if "unknown preset" in str(e):
            raise CLIError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(preset_names())}") from None
        raise CLIError(f"{src}: {e}") from None


def parameter_counts(config) -> tuple[int, int]:
    from dsmoe.config import count_parameters

    return count_parameters(config)


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype | None = None, impl: str = "dsmoe"):
    """A checkpoint directory -> model in eval mode, or a one-line CLIError."""
    from dsmoe.checkpoint import CheckpointError
    from dsmoe.model import DeepSeekMoEForCausalLM

    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"--model: {path} does not exist")
    if not p.is_dir():
        raise CLIError(f"--model: {path} is not a checkpoint directory")
    if not (p / "config.json").is_file():
        raise CLIError(f"--model: {path} has no config.json (not a checkpoint directory)")
    read_json(p / "config.json", "--model")  # a readable JSON object before anything else
    try:
        return DeepSeekMoEForCausalLM.from_pretrained(p, dtype=dtype, device=device, moe_impl=impl)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        raise CLIError(f"cannot load checkpoint {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def routers(model) -> list:
    """The router (``mlp.gate``) of every MoE layer, in layer order."""
    return [layer.gate for layer in model.moe_layers()]


# the ablation lives in the library (dsmoe.analysis); this name stays for existing callers
disable_top_experts = analysis.disable_top_experts
