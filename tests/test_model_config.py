"""DeepSeekMoEConfig: field names and aliases, validation, JSON round trip, presets and the
parameter counts of the paper's models."""
from __future__ import annotations

import json

import pytest
import torch

from dsmoe import (
    DeepSeekMoEConfig,
    DeepSeekMoEForCausalLM,
    count_parameters,
    deepseek_moe_2b,
    deepseek_moe_16b,
    deepseek_moe_145b,
    get_preset,
    preset_names,
)


def test_readme_aliases_set_hf_fields():
    config = DeepSeekMoEConfig(num_shared_experts=2, num_routed_experts=64, num_experts_per_token=6)
    assert (config.n_shared_experts, config.n_routed_experts, config.num_experts_per_tok) == (2, 64, 6)
    assert (config.num_shared_experts, config.num_routed_experts, config.num_experts_per_token) == (2, 64, 6)
    config.num_experts_per_token = 4  # setting through the alias writes the HF field
    assert config.num_experts_per_tok == 4
    assert "num_experts_per_token" not in config.to_dict()
    with pytest.raises(ValueError, match="num_routed_experts=8 conflicts with n_routed_experts=16"):
        DeepSeekMoEConfig(num_routed_experts=8, n_routed_experts=16, num_experts_per_tok=2)


def test_defaults_are_the_seeds():
    config = DeepSeekMoEConfig()
    assert config.vocab_size == 102400 and config.moe_intermediate_size == 1407
    assert config.num_key_value_heads == config.num_attention_heads == 32
    assert config.n_routed_experts is None and config.seq_aux and not config.norm_topk_prob
    assert config.aux_loss_alpha == 0.001 and config.first_k_dense_replace == 0


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_size=24, num_attention_heads=8), "hidden_size / num_attention_heads"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(moe_intermediate_size=1.5), "moe_intermediate_size"),
        (dict(n_routed_experts=0), "n_routed_experts"),
        (dict(num_experts_per_tok=None), "num_experts_per_tok"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(scoring_func="sigmoid"), "scoring_func"),
        (dict(aux_loss_alpha=-0.1), "aux_loss_alpha"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(num_expert_devices=3), "num_expert_devices"),
        (dict(router_type="switch"), "router_type"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "rope_scaling"),
        (dict(pad_token_id=64), "pad_token_id"),
        (dict(seq_aux="yes"), "seq_aux"),
        (dict(attention_dropout=1.0), "attention_dropout"),
    ],
)
def test_validation_names_the_field(changes, field):
    base = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2)
    base.update(changes)
    with pytest.raises(ValueError) as info:
        DeepSeekMoEConfig(**base)
    assert field in str(info.value)


def test_unknown_keyword_refused_but_kept_from_json(tmp_path):
    with pytest.raises(TypeError, match="hidden_sizes"):
        DeepSeekMoEConfig(hidden_sizes=8)
    data = get_preset("tiny").to_dict()
    data.update({"auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig"}, "torch_dtype": "bfloat16"})
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = DeepSeekMoEConfig.from_pretrained(tmp_path)
    assert config.extra["torch_dtype"] == "bfloat16" and "auto_map" in config.extra
    assert config.to_dict()["auto_map"] == data["auto_map"]


def test_json_round_trip(tmp_path):
    config = get_preset("tiny", rope_scaling={"type": "linear", "factor": 2.0}, router_type="noisy_topk")
    config.save_pretrained(tmp_path)
    loaded = DeepSeekMoEConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.to_dict() == config.to_dict()
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "deepseek" and data["n_routed_experts"] == 8
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DeepSeekMoEConfig.from_pretrained(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        DeepSeekMoEConfig.from_pretrained(tmp_path / "missing")


def test_released_16b_config_json_loads():
    """The config.json of deepseek-ai/deepseek-moe-16b-base, as published."""
    released = {
        "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModel": "modeling_deepseek.DeepseekModel",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "max_position_embeddings": 4096, "model_type": "deepseek", "moe_intermediate_size": 1408,
        "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 28,
        "num_key_value_heads": 16, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True, "vocab_size": 102400,
    }
    config = DeepSeekMoEConfig.from_dict(released)
    preset = deepseek_moe_16b()
    for name in DeepSeekMoEConfig._DEFAULTS:
        assert getattr(config, name) == getattr(preset, name), name


@pytest.mark.parametrize(
    "make, total, activated",
    [(deepseek_moe_2b, 2.0, 0.3), (deepseek_moe_16b, 16.4, 2.8), (deepseek_moe_145b, 144.6, 22.2)],
)
def test_paper_parameter_counts(make, total, activated):
    config = make()
    n_total, n_active = count_parameters(config)
    assert round(n_total / 1e9, 1) == total
    assert round(n_active / 1e9, 1) == activated


@pytest.mark.parametrize("name", ["deepseek-moe-2b", "deepseek-moe-16b", "deepseek-moe-145b", "small", "tiny"])
def test_count_matches_instantiated_model(name):
    """The analytic count equals the parameters of the model built on the meta device."""
    config = get_preset(name)
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(config)
    assert count_parameters(config)[0] == model.num_parameters()


@pytest.mark.parametrize(
    "changes",
    [dict(tie_word_embeddings=True), dict(attention_bias=True), dict(router_type="noisy_topk"),
     dict(n_shared_experts=None), dict(moe_layer_freq=2, first_k_dense_replace=0),
     dict(n_routed_experts=None, num_experts_per_tok=None)],
)
def test_count_variants(changes):
    config = get_preset("tiny", num_hidden_layers=3, **changes)
    model = DeepSeekMoEForCausalLM(config)
    total, activated = count_parameters(config)
    assert total == model.num_parameters()
    routed = sum(
        layer.experts.w_gate_up.numel() + layer.experts.w_down.numel() for layer in model.moe_layers()
    )
    per_expert_fraction = (config.num_experts_per_tok or 0) / (config.n_routed_experts or 1)
    assert activated == total - routed + round(routed * per_expert_fraction)


def test_presets():
    assert set(preset_names()) >= {"deepseek-moe-2b", "deepseek-moe-16b", "deepseek-moe-145b", "small", "tiny"}
    assert get_preset("16B") == deepseek_moe_16b()
    assert get_preset("tiny", hidden_size=64).hidden_size == 64
    config = deepseek_moe_145b()
    assert (config.n_shared_experts, config.n_routed_experts, config.num_experts_per_tok) == (4, 128, 12)
    config = deepseek_moe_2b()
    assert (config.n_shared_experts, config.n_routed_experts, config.num_experts_per_tok) == (1, 63, 7)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("7b")


def test_replace_validates():
    config = get_preset("tiny")
    assert config.replace(num_experts_per_tok=3).num_experts_per_tok == 3
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        config.replace(num_experts_per_tok=99)


def test_readme_quick_start_literal_config_on_meta():
    """The Quick Start's exact config (14B parameters) builds, runs forward and generates on the
    meta device (shapes only; the dsmoe ops' fake kernels stand in for the math)."""
    from dsmoe import DeepSeekMoEModel

    with torch.device("meta"):
        config = DeepSeekMoEConfig(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_shared_experts=2,
            num_routed_experts=64,
            num_experts_per_token=6,
        )
        model = DeepSeekMoEModel(config)
        batch_size, seq_len = 2, 16
        input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
        outputs = model(input_ids)
        logits = outputs["logits"]
        generated = model.generate(input_ids, max_new_tokens=2)
    assert logits.shape == (batch_size, seq_len, config.vocab_size)
    assert generated.shape == (batch_size, seq_len + 2)
    assert count_parameters(config)[0] == model.num_parameters()


_SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2)


@pytest.mark.parametrize("factor", [1.0, 0.99, True, "2", None])
def test_rope_scaling_factor_must_be_a_number_above_one(factor):
    with pytest.raises(ValueError) as info:
        DeepSeekMoEConfig(**_SMALL, rope_scaling={"type": "linear", "factor": factor})
    assert str(info.value) == f"DeepSeekMoEConfig: rope_scaling factor must be a number > 1, got {factor!r}"


def test_rope_scaling_factors_just_above_one_and_whole_numbers_are_taken():
    for factor in (1.0001, 2, 4.0):
        assert DeepSeekMoEConfig(**_SMALL, rope_scaling={"rope_type": "dynamic", "factor": factor}).rope_scaling["factor"] == factor


@pytest.mark.parametrize("name, value", [
    (name, value) for name in ("pad_token_id", "bos_token_id", "eos_token_id")
    for value in (-1, True, "3", 2.0, [1, -2], [1, "x"])
    if not (name == "pad_token_id" and isinstance(value, list))  # (pad: one id only, below)
])
def test_special_token_ids_must_be_non_negative_integers(name, value):
    with pytest.raises(ValueError) as info:
        DeepSeekMoEConfig(**_SMALL, **{name: value})
    assert str(info.value) == f"DeepSeekMoEConfig: {name} must be a non-negative integer or null, got {value!r}"


def test_special_token_ids_that_are_taken():
    # id 0 is a token like any other; bos / eos may list several ids (transformers' generation
    # stops at any of them); each is checked after a null one before it
    config = DeepSeekMoEConfig(**_SMALL, pad_token_id=0, bos_token_id=0, eos_token_id=[0, 5])
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 0, [0, 5])
    with pytest.raises(ValueError, match=r"^DeepSeekMoEConfig: bos_token_id must be a non-negative integer or null, got -1$"):
        DeepSeekMoEConfig(**_SMALL, pad_token_id=None, bos_token_id=-1)
    with pytest.raises(ValueError) as info:
        DeepSeekMoEConfig(**_SMALL, pad_token_id=[1, 2])
    assert str(info.value) == "DeepSeekMoEConfig: pad_token_id must be one integer or null, got [1, 2]"
