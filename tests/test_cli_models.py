"""dsmoe/cli/models.py in-process: the compared architectures' arithmetic for any size (the
paper's Figure 1 layout), configs from presets and files, checkpoint loading with one-line
refusals."""
from __future__ import annotations

import json

import pytest
import torch

from dsmoe.cli import models
from dsmoe.cli.common import CLIError


@pytest.mark.parametrize("kw", [dict(), dict(hidden_size=64, num_layers=2, num_heads=2, ffn=96, experts=8, granularity=2,
                                             shared=0),
                                dict(ffn=120, experts=4, granularity=3, shared=2)])
def test_compared_architectures_layout(kw):
    p = {**dict(hidden_size=128, num_layers=4, num_heads=4, ffn=256, experts=16, granularity=4, shared=1), **kw}
    cfgs = models.compare_configs(**kw)
    assert set(cfgs) == {"dense", "gshard", "deepseekmoe"}
    m, ffn, n = p["granularity"], p["ffn"], p["experts"]
    for cfg in cfgs.values():
        assert {k: cfg[k] for k in models.COMPARE_BASE if k not in ("hidden_size", "num_hidden_layers",
                                                                     "num_attention_heads", "num_key_value_heads")} == \
            {k: v for k, v in models.COMPARE_BASE.items() if k not in ("hidden_size", "num_hidden_layers",
                                                                        "num_attention_heads", "num_key_value_heads")}
        assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (p["hidden_size"], p["num_layers"])
        assert cfg["num_attention_heads"] == cfg["num_key_value_heads"] == p["num_heads"]
        assert cfg["intermediate_size"] == 2 * ffn  # the dense FFN = 2 standard experts' worth
        # the same fields for all three (they become config.json files; dense has no gating to
        # normalise), sizes whole numbers
        assert set(cfg) - {"norm_topk_prob"} == set(cfgs["dense"]) and "moe_intermediate_size" in cfg
        assert all(type(cfg[k]) is int for k in ("intermediate_size", "moe_intermediate_size", "hidden_size"))
    dense, gshard, ds = cfgs["dense"], cfgs["gshard"], cfgs["deepseekmoe"]
    assert dense["n_routed_experts"] is None and dense["n_shared_experts"] is None and dense["num_experts_per_tok"] is None
    assert (gshard["n_routed_experts"], gshard["num_experts_per_tok"], gshard["moe_intermediate_size"]) == (n, 2, ffn)
    assert gshard["n_shared_experts"] is None and gshard["norm_topk_prob"] is True
    # fine-grained: m x as many experts of 1/m the size; `shared` of them isolated
    assert ds["moe_intermediate_size"] * m == ffn
    assert ds["n_routed_experts"] == n * m - p["shared"]
    assert ds["num_experts_per_tok"] == 2 * m - p["shared"]
    assert ds["n_shared_experts"] == (p["shared"] or None) and ds["norm_topk_prob"] is False
    # activated expert width = 2 standard FFNs; total expert width = n standard FFNs (as GShard's)
    activated = (ds["num_experts_per_tok"] + (ds["n_shared_experts"] or 0)) * ds["moe_intermediate_size"]
    total = (ds["n_routed_experts"] + (ds["n_shared_experts"] or 0)) * ds["moe_intermediate_size"]
    assert activated == 2 * ffn == gshard["num_experts_per_tok"] * gshard["moe_intermediate_size"]
    assert total == n * ffn == gshard["n_routed_experts"] * gshard["moe_intermediate_size"]


@pytest.mark.parametrize("kw, message", [
    (dict(hidden_size=1), "--hidden-size must be >= 2, got 1"),
    (dict(num_layers=0), "--num-layers must be >= 1, got 0"),
    (dict(num_heads=0), "--num-heads must be >= 1, got 0"),
    (dict(ffn=0), "--ffn must be >= 1, got 0"),
    (dict(experts=1), "--experts must be >= 2, got 1"),
    (dict(granularity=0), "--granularity must be >= 1, got 0"),
    (dict(shared=-1), "--shared must be >= 0, got -1"),
    (dict(ffn=30, granularity=4), "--granularity 4 must divide --ffn 30"),
    (dict(shared=8, granularity=4), "--shared 8 leaves no routed expert to choose (granularity 4)"),
    (dict(experts=2, granularity=1, shared=1), None),  # k = 1 of 1 routed: allowed
    (dict(experts=2, granularity=1, shared=2), "--shared 2 leaves no routed expert to choose (granularity 1)"),
])
def test_compare_refusals(kw, message):
    if message is None:
        cfg = models.compare_configs(**kw)["deepseekmoe"]
        assert cfg["num_experts_per_tok"] == cfg["n_routed_experts"] == 1
        return
    with pytest.raises(CLIError) as e:
        models.compare_configs(**kw)
    assert str(e.value) == message


def test_presets_and_config_files(tmp_path):
    from dsmoe import config as cfgmod

    names = models.preset_names()
    assert names == list(cfgmod.preset_names()) + ["compare-dense", "compare-gshard", "compare-deepseekmoe"]
    assert models.make_config().to_dict() == cfgmod.get_preset("small").to_dict()  # the default preset
    tiny = models.make_config("tiny", overrides={"vocab_size": 300})
    assert tiny.vocab_size == 300 and tiny.hidden_size == cfgmod.get_preset("tiny").hidden_size
    cmp = models.make_config("compare-gshard", overrides={"aux_loss_alpha": 0.5})
    assert cmp.n_routed_experts == 16 and cmp.aux_loss_alpha == 0.5
    tiny.save_pretrained(tmp_path)
    from_dir = models.make_config(config_path=str(tmp_path), overrides={"vocab_size": 512})
    from_file = models.make_config(config_path=str(tmp_path / "config.json"))
    assert from_dir.hidden_size == from_file.hidden_size == tiny.hidden_size
    assert (from_dir.vocab_size, from_file.vocab_size) == (512, 300)  # the overrides apply to a file's config too
    assert models.make_config("tiny", config_path=str(tmp_path)).vocab_size == 300  # a file wins over a preset name


def test_config_refusals(tmp_path):
    def refusal(*a, **kw):
        with pytest.raises(CLIError) as e:
            models.make_config(*a, **kw)
        return str(e.value)

    assert refusal("nope") == f"--preset: unknown preset 'nope'; choose one of {', '.join(models.preset_names())}"
    assert refusal(config_path=str(tmp_path / "none.json")) == f"--config: {tmp_path / 'none.json'} does not exist"
    assert refusal(config_path=str(tmp_path)) == f"--config: {tmp_path / 'config.json'} does not exist"
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 10, "num_attention_heads": 3}))
    msg = refusal(config_path=str(tmp_path / "bad.json"))
    assert msg.startswith(f"--config {tmp_path / 'bad.json'}: ") and "num_attention_heads" in msg
    msg = refusal("tiny", overrides={"hidden_size": -1})
    assert msg.startswith("--preset tiny: ") and "hidden_size" in msg
    assert refusal(overrides={"hidden_size": -1}).startswith("--preset small: ")
    assert refusal("compare-dense", overrides={"nonsense_option": 1}).startswith("--preset compare-dense: ")


def test_parameter_counts_are_the_library_s():
    from dsmoe.config import count_parameters

    cfg = models.make_config("tiny")
    assert models.parameter_counts(cfg) == count_parameters(cfg)
    total, active = models.parameter_counts(models.make_config("compare-dense"))
    assert total == active  # no routing: every parameter is used by every token


def test_load_model_and_its_refusals(tmp_path):
    from dsmoe.model import DeepSeekMoEForCausalLM

    cfg = models.make_config("tiny")
    torch.manual_seed(0)
    DeepSeekMoEForCausalLM(cfg).save_pretrained(tmp_path / "m")
    model = models.load_model(tmp_path / "m", torch.device("cpu"), dtype=torch.bfloat16, impl="reference")
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16
    assert model.moe_impl == "reference"
    assert models.load_model(tmp_path / "m", torch.device("cpu")).moe_impl == "dsmoe"
    assert models.routers(model) == [layer.gate for layer in model.moe_layers()] and len(models.routers(model)) >= 1

    def refusal(path):
        with pytest.raises(CLIError) as e:
            models.load_model(path, torch.device("cpu"))
        return str(e.value)

    assert refusal(tmp_path / "none") == f"--model: {tmp_path / 'none'} does not exist"
    (tmp_path / "f").write_text("x")
    assert refusal(tmp_path / "f") == f"--model: {tmp_path / 'f'} is not a checkpoint directory"
    (tmp_path / "empty").mkdir()
    assert refusal(tmp_path / "empty") == f"--model: {tmp_path / 'empty'} has no config.json (not a checkpoint directory)"
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("[1]")
    assert refusal(tmp_path / "badjson") == f"--model: {tmp_path / 'badjson' / 'config.json'} must hold a JSON object, got list"
    (tmp_path / "noweights").mkdir()
    cfg.save_pretrained(tmp_path / "noweights")
    assert refusal(tmp_path / "noweights") == (f"cannot load checkpoint {tmp_path / 'noweights'}: no model.safetensors "
                                               f"or model.safetensors.index.json in {tmp_path / 'noweights'}")


def test_first_line():
    assert models._first_line(ValueError("  one\ntwo ")) == "one"
    assert models._first_line(ValueError("")) == "ValueError"
    assert models._first_line(KeyError()) == "KeyError"
