"""DeepSeekMoE model configuration: the Hugging Face deepseek-moe field names (so a released
checkpoint's config.json loads as is), the seeds' README aliases, validation, JSON I/O, presets
for the paper's models and small ones, and an analytic parameter count."""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Dict, Optional, Tuple

CONFIG_NAME = "config.json"

# The seeds' README names of three Hugging Face fields.
ALIASES = {
    "num_shared_experts": "n_shared_experts",
    "num_routed_experts": "n_routed_experts",
    "num_experts_per_token": "num_experts_per_tok",
}

ROUTER_TYPES = ("topk", "noisy_topk")
ROPE_SCALING_TYPES = ("linear", "dynamic")


class DeepSeekMoEConfig:
    """Architecture of a DeepSeekMoE causal language model.

    Field names and defaults follow the Hugging Face ``DeepseekConfig`` of deepseek-moe (see
    ../shared/seeds). dsmoe adds:

    * ``device_aux_loss_alpha`` / ``num_expert_devices``: the paper's device-level balance loss
      (alpha_2) over routed experts grouped into D contiguous blocks (expert e on device
      ``e // (E / D)``); off when alpha_2 is 0 or D is 1.
    * ``router_type``: ``"topk"`` (the seeds' MoEGate) or ``"noisy_topk"`` (the README's
      NoisyTopKRouter: learned, input-dependent Gaussian noise on the router logits in training).
    * ``use_selection_bias``: a per-expert bias added to the scores for expert selection only
      (DeepSeek-V3's loss-free balancing), stored as ``mlp.gate.e_score_correction_bias``.

    Unknown keys of a loaded config.json (``architectures``, ``auto_map``, ``torch_dtype``, …)
    are kept in :attr:`extra` and written back; unknown constructor keywords are refused.
    """

    model_type = "deepseek"

    # name -> default, in the order of the seeds' DeepseekConfig, then dsmoe's additions
    _DEFAULTS: Dict[str, Any] = {
        "vocab_size": 102400,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "moe_intermediate_size": 1407,
        "num_hidden_layers": 30,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "n_shared_experts": None,
        "n_routed_experts": None,
        "num_experts_per_tok": None,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 0,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # dsmoe additions
        "device_aux_loss_alpha": 0.0,
        "num_expert_devices": 1,
        "router_type": "topk",
        "use_selection_bias": False,
    }

    def __init__(self, **kwargs: Any) -> None:
        for alias, name in ALIASES.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if name in kwargs and kwargs[name] != value:
                    raise ValueError(
                        f"DeepSeekMoEConfig: {alias}={value!r} conflicts with {name}={kwargs[name]!r} "
                        f"(they name the same field)"
                    )
                kwargs[name] = value
        extra = kwargs.pop("extra", None) or {}
        unknown = [key for key in kwargs if key not in self._DEFAULTS]
        if unknown:
            raise TypeError(
                f"DeepSeekMoEConfig: unknown field(s) {', '.join(sorted(unknown))}; use "
                "DeepSeekMoEConfig.from_dict to keep unknown keys of a config.json"
            )
        for name, default in self._DEFAULTS.items():
            object.__setattr__(self, name, copy.deepcopy(kwargs.get(name, default)))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.extra: Dict[str, Any] = dict(extra)
        self.validate()

    # ------------------------------------------------------------ aliases (README names)
    @property
    def num_shared_experts(self) -> Optional[int]:
        return self.n_shared_experts

    @property
    def num_routed_experts(self) -> Optional[int]:
        return self.n_routed_experts

    @property
    def num_experts_per_token(self) -> Optional[int]:
        return self.num_experts_per_tok

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The seeds' rule: MoE where layer_idx >= first_k_dense_replace and
        layer_idx % moe_layer_freq == 0 (and routed experts exist), dense MLP elsewhere."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raises ValueError naming the first field that is out of range or inconsistent."""

        def need_int(name: str, minimum: int, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"DeepSeekMoEConfig: {name} must be an integer >= {minimum}, got {value!r}")

        def need_float(name: str, minimum: float, strict: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"DeepSeekMoEConfig: {name} must be a finite number, got {value!r}")
            if value < minimum or (strict and value == minimum):
                op = ">" if strict else ">="
                raise ValueError(f"DeepSeekMoEConfig: {name} must be {op} {minimum}, got {value!r}")

        def need_bool(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DeepSeekMoEConfig: {name} must be true or false, got {getattr(self, name)!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "moe_layer_freq", "pretraining_tp", "num_expert_devices"):
            need_int(name, 1)
        need_int("moe_intermediate_size", 1)
        need_int("first_k_dense_replace", 0)
        need_int("n_shared_experts", 0, allow_none=True)
        need_int("n_routed_experts", 1, allow_none=True)
        need_int("num_experts_per_tok", 1, allow_none=True)
        for name in ("norm_topk_prob", "seq_aux", "use_cache", "tie_word_embeddings",
                     "attention_bias", "use_selection_bias"):
            need_bool(name)
        need_float("aux_loss_alpha", 0.0)
        need_float("device_aux_loss_alpha", 0.0)
        need_float("initializer_range", 0.0)
        need_float("rms_norm_eps", 0.0, strict=True)
        need_float("rope_theta", 0.0, strict=True)
        need_float("attention_dropout", 0.0)
        if self.attention_dropout >= 1.0:
            raise ValueError(f"DeepSeekMoEConfig: attention_dropout must be < 1, got {self.attention_dropout!r}")

        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"DeepSeekMoEConfig: num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"DeepSeekMoEConfig: num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"DeepSeekMoEConfig: hidden_size / num_attention_heads = {self.head_dim} must be even "
                "(rotary embeddings rotate pairs)"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"DeepSeekMoEConfig: hidden_act must be 'silu' (SwiGLU experts), got {self.hidden_act!r}")
        if self.scoring_func != "softmax":
            raise ValueError(f"DeepSeekMoEConfig: scoring_func must be 'softmax', got {self.scoring_func!r}")
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"DeepSeekMoEConfig: router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")

        if self.n_routed_experts is not None:
            if self.num_experts_per_tok is None:
                raise ValueError("DeepSeekMoEConfig: num_experts_per_tok must be set when n_routed_experts is")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(
                    f"DeepSeekMoEConfig: num_experts_per_tok={self.num_experts_per_tok} must be <= "
                    f"n_routed_experts={self.n_routed_experts}"
                )
            if self.n_routed_experts % self.num_expert_devices:
                raise ValueError(
                    f"DeepSeekMoEConfig: num_expert_devices={self.num_expert_devices} must divide "
                    f"n_routed_experts={self.n_routed_experts}"
                )

        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"DeepSeekMoEConfig: rope_scaling must be a dict or null, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            factor = self.rope_scaling.get("factor")
            if kind not in ROPE_SCALING_TYPES:
                raise ValueError(
                    f"DeepSeekMoEConfig: rope_scaling type must be one of {ROPE_SCALING_TYPES}, got {kind!r}"
                )
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1.0:
                raise ValueError(f"DeepSeekMoEConfig: rope_scaling factor must be a number > 1, got {factor!r}")

        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            ids = value if isinstance(value, list) else [value]
            for token in ids:
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise ValueError(f"DeepSeekMoEConfig: {name} must be a non-negative integer or null, got {value!r}")
        if isinstance(self.pad_token_id, list):
            raise ValueError(f"DeepSeekMoEConfig: pad_token_id must be one integer or null, got {self.pad_token_id!r}")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"DeepSeekMoEConfig: pad_token_id={self.pad_token_id} must be < vocab_size={self.vocab_size}"
            )

    # ------------------------------------------------------------ dict / JSON
    def to_dict(self) -> Dict[str, Any]:
        """Every field under its Hugging Face name, plus the kept unknown keys."""
        out: Dict[str, Any] = {"model_type": self.model_type, "architectures": ["DeepseekForCausalLM"]}
        out.update(copy.deepcopy(self.extra))
        for name in self._DEFAULTS:
            out[name] = copy.deepcopy(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any], **overrides: Any) -> "DeepSeekMoEConfig":
        """Builds a config from a dict (e.g. a config.json); keys that are not fields are kept
        in :attr:`extra`. ``overrides`` replace fields afterwards."""
        if not isinstance(data, dict):
            raise TypeError(f"DeepSeekMoEConfig.from_dict: data must be a dict, got {type(data).__name__}")
        fields: Dict[str, Any] = {}
        extra: Dict[str, Any] = {}
        for key, value in {**data, **overrides}.items():
            if key in cls._DEFAULTS or key in ALIASES:
                fields[key] = value
            elif key not in ("model_type", "architectures"):
                extra[key] = value
        return cls(extra=extra, **fields)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Writes ``config.json`` into the directory (created if needed); returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "DeepSeekMoEConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"DeepSeekMoEConfig: {path} is not valid JSON: {e}") from None
        return cls.from_dict(data, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "DeepSeekMoEConfig":
        """Reads ``config.json`` from a checkpoint directory (or a JSON file path)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DeepSeekMoEConfig: no config file at {path}")
        return cls.from_json_file(path, **overrides)

    # ------------------------------------------------------------ misc
    def replace(self, **changes: Any) -> "DeepSeekMoEConfig":
        """A validated copy with some fields changed."""
        data = {name: getattr(self, name) for name in self._DEFAULTS}
        data.update(changes)
        return type(self)(extra=self.extra, **data)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ALIASES:
            name = ALIASES[name]
        object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        """Same architecture fields (the kept unknown keys are metadata and do not count)."""
        return isinstance(other, DeepSeekMoEConfig) and all(
            getattr(self, name) == getattr(other, name) for name in self._DEFAULTS
        )

    def __repr__(self) -> str:
        changed = {n: getattr(self, n) for n, d in self._DEFAULTS.items() if getattr(self, n) != d}
        body = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"DeepSeekMoEConfig({body})"


def position_limit(config: "DeepSeekMoEConfig") -> Optional[int]:
    """The most positions the model was made for: max_position_embeddings, times the factor of a
    linear rope scaling; None (no limit) with dynamic NTK scaling, which exists to go past it."""
    scaling = config.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind == "dynamic":
        return None
    if kind == "linear":
        return int(config.max_position_embeddings * float(scaling["factor"]))
    return config.max_position_embeddings


def check_positions(config: "DeepSeekMoEConfig", needed: int, what: str) -> None:
    """ValueError when ``needed`` positions exceed :func:`position_limit` (as the CLI refuses)."""
    limit = position_limit(config)
    if limit is not None and needed > limit:
        raise ValueError(
            f"{what} needs {needed} positions but the model's max_position_embeddings is {limit}; "
            "shorten the input (or the number of new tokens)"
        )


# ---------------------------------------------------------------- presets
# The paper's models (DeepSeekMoE, arXiv 2401.06066). A "standard FFN" there has an intermediate
# size of 2.75 x hidden; fine-grained experts are 1/4 (2B, 16B) or 1/8 (145B) of it, i.e. 880 and
# 1408. The 16B preset is the released deepseek-moe-16b config.json. The 145B model's dense first
# layer is not given in the text; 21888 (the 16B's 10944/2048 ratio at hidden 4096) reproduces the
# published 144.6B / 22.2B. The counts are checked by tests/test_model_config.py.
_PRESETS: Dict[str, Dict[str, Any]] = {
    "deepseek-moe-2b": dict(
        vocab_size=8192, hidden_size=1280, intermediate_size=3520, moe_intermediate_size=880,
        num_hidden_layers=9, num_attention_heads=10, num_key_value_heads=10,
        n_shared_experts=1, n_routed_experts=63, num_experts_per_tok=7,
        first_k_dense_replace=0, moe_layer_freq=1, max_position_embeddings=2048,
        aux_loss_alpha=0.01, initializer_range=0.006, bos_token_id=None, eos_token_id=None,
    ),
    "deepseek-moe-16b": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, max_position_embeddings=4096,
        aux_loss_alpha=0.001, initializer_range=0.02, bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-moe-145b": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=21888, moe_intermediate_size=1408,
        num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=32,
        n_shared_experts=4, n_routed_experts=128, num_experts_per_tok=12,
        first_k_dense_replace=1, moe_layer_freq=1, max_position_embeddings=4096,
        aux_loss_alpha=0.003, device_aux_loss_alpha=0.05, num_expert_devices=4,
        initializer_range=0.006, bos_token_id=100000, eos_token_id=100001,
    ),
    # Byte-level demo model for `dsmoe train` on a 2-core CPU: the 256 bytes + <|bos|>, <|eos|>,
    # <|pad|>, the vocabulary `dsmoe train` gives it (so its parameter count is the same everywhere).
    "small": dict(
        vocab_size=259, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4,
        first_k_dense_replace=1, moe_layer_freq=1, max_position_embeddings=1024,
        aux_loss_alpha=0.001, initializer_range=0.02, bos_token_id=256, eos_token_id=257,
    ),
    # Tests: every feature (dense first layer, GQA, shared + routed experts) at toy size.
    "tiny": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=1, moe_layer_freq=1, max_position_embeddings=128,
        aux_loss_alpha=0.01, initializer_range=0.02, bos_token_id=None, eos_token_id=None,
    ),
}

PRESET_ALIASES = {"2b": "deepseek-moe-2b", "16b": "deepseek-moe-16b", "145b": "deepseek-moe-145b"}


def preset_names() -> Tuple[str, ...]:
    return tuple(_PRESETS)


def get_preset(name: str, **overrides: Any) -> DeepSeekMoEConfig:
    """A preset config by name (``deepseek-moe-2b``/``2b``, ``deepseek-moe-16b``/``16b``,
    ``deepseek-moe-145b``/``145b``, ``small``, ``tiny``), with fields overridden."""
    key = PRESET_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)} (or 2b/16b/145b)")
    return DeepSeekMoEConfig(**{**_PRESETS[key], **overrides})


def deepseek_moe_2b(**overrides: Any) -> DeepSeekMoEConfig:
    """The paper's DeepSeekMoE 2B (2.0B total / 0.3B activated parameters)."""
    return get_preset("deepseek-moe-2b", **overrides)


def deepseek_moe_16b(**overrides: Any) -> DeepSeekMoEConfig:
    """DeepSeekMoE 16B (16.4B / 2.8B), the released deepseek-moe-16b architecture."""
    return get_preset("deepseek-moe-16b", **overrides)


def deepseek_moe_145b(**overrides: Any) -> DeepSeekMoEConfig:
    """The paper's DeepSeekMoE 145B (144.6B / 22.2B)."""
    return get_preset("deepseek-moe-145b", **overrides)


# ---------------------------------------------------------------- parameter count
def count_parameters(config: DeepSeekMoEConfig) -> Tuple[int, int]:
    """(total, activated) parameters of a DeepSeekMoEForCausalLM built from ``config``.

    Activated = what one token uses: everything except the routed experts it is not sent to
    (embeddings and the output head included, as in the paper's tables)."""
    h, hd = config.hidden_size, config.head_dim
    bias = 1 if config.attention_bias else 0
    q = h * config.num_attention_heads * hd + bias * config.num_attention_heads * hd
    kv = 2 * (h * config.num_key_value_heads * hd + bias * config.num_key_value_heads * hd)
    o = config.num_attention_heads * hd * h + bias * h
    per_layer_common = q + kv + o + 2 * h  # attention + two RMSNorm weights

    def mlp(inter: int) -> int:
        return 3 * h * inter

    total = activated = 0
    for layer in range(config.num_hidden_layers):
        total += per_layer_common
        activated += per_layer_common
        if config.is_moe_layer(layer):
            E, k, I = config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size
            router = E * h * (2 if config.router_type == "noisy_topk" else 1)
            shared = mlp(I * config.n_shared_experts) if config.n_shared_experts else 0
            total += router + shared + E * mlp(I)
            activated += router + shared + k * mlp(I)
        else:
            total += mlp(config.intermediate_size)
            activated += mlp(config.intermediate_size)
    embed = config.vocab_size * h
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    total += embed + head + h  # + final norm
    activated += embed + head + h
    return total, activated
