"""Checkpoints in the Hugging Face deepseek-moe layout: round trips, a hand-written HF
checkpoint, and the refusal of bad ones."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import seeds_reference as seeds
from dsmoe import DeepSeekMoEForCausalLM, get_preset
from dsmoe.checkpoint import CheckpointError, to_hf_state_dict


def tiny(**changes):
    return get_preset("tiny", num_hidden_layers=3, **changes)


def assert_same_weights(a: DeepSeekMoEForCausalLM, b: DeepSeekMoEForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", [None, 20_000])
def test_round_trip_is_bit_exact(tmp_path, dtype, shard):
    model = DeepSeekMoEForCausalLM(tiny()).to(dtype).eval()
    model.save_pretrained(tmp_path, max_shard_size=shard)
    files = sorted(os.listdir(tmp_path))
    if shard is None:
        assert files == ["config.json", "model.safetensors"]
    else:
        shards = [f for f in files if f.startswith("model-")]
        assert len(shards) > 1 and "model.safetensors.index.json" in files
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == dtype and loaded.config == model.config and not loaded.training
    assert_same_weights(model, loaded)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids)["logits"], loaded(ids)["logits"])


def test_saved_names_are_hugging_face_ones(tmp_path):
    config = tiny()
    model = DeepSeekMoEForCausalLM(config)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    E, I, h = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        expected |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        if n == 0:
            expected |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        else:
            expected.add(p + "mlp.gate.weight")
            expected |= {p + f"mlp.shared_experts.{x}_proj.weight" for x in ("gate", "up", "down")}
            expected |= {p + f"mlp.experts.{j}.{x}_proj.weight" for j in range(E) for x in ("gate", "up", "down")}
    assert set(tensors) == expected
    layer = model.model.layers[1].mlp.experts
    assert tensors["model.layers.1.mlp.experts.3.gate_proj.weight"].shape == (I, h)
    assert torch.equal(tensors["model.layers.1.mlp.experts.3.gate_proj.weight"], layer.w_gate_up[3, :I])
    assert torch.equal(tensors["model.layers.1.mlp.experts.3.up_proj.weight"], layer.w_gate_up[3, I:])
    assert torch.equal(tensors["model.layers.1.mlp.experts.3.down_proj.weight"], layer.w_down[3])


def test_tied_and_optional_tensors_round_trip(tmp_path):
    config = tiny(tie_word_embeddings=True, use_selection_bias=True, router_type="noisy_topk", attention_bias=True)
    model = DeepSeekMoEForCausalLM(config)
    with torch.no_grad():
        model.moe_layers()[0].gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    model.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in names  # stored once, as the embedding
    assert {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.gate.noise_weight",
            "model.layers.0.self_attn.q_proj.bias"} <= names
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_weights(model, loaded)


def write_hf_checkpoint(directory, config, state, shards=1, extra_config=None):
    """A checkpoint as the Hugging Face exporter writes it, by hand."""
    os.makedirs(directory, exist_ok=True)
    data = {k: v for k, v in config.to_dict().items()}
    data.update({"auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig"},
                 "torch_dtype": "float32", "transformers_version": "4.36.0"})
    data.update(extra_config or {})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(data, f)
    names = list(state)
    if shards == 1:
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per : (i + 1) * per]}
        save_file(part, os.path.join(directory, file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("shards", [1, 3])
def test_hand_written_hf_checkpoint_loads(tmp_path, shards):
    """Weights of the seeds' model (per-expert nn.Linear modules), saved under their own module
    names, load into dsmoe and give the same logits."""
    config = tiny()
    ref = seeds.DeepseekForCausalLM(config).eval()
    state = {name: t.contiguous() for name, t in ref.state_dict().items()}
    # old exports carry the rotary tables; they are ignored
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = ref.model.layers[0].self_attn.rotary_emb.inv_freq.clone()
    write_hf_checkpoint(tmp_path, config, state, shards=shards)
    model = DeepSeekMoEForCausalLM.from_pretrained(tmp_path)
    assert model.config.extra["transformers_version"] == "4.36.0"
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)["logits"], ref(ids)["logits"], rtol=2e-4, atol=2e-5)
    saved = to_hf_state_dict(model)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(saved[name], tensor), name


def test_load_casts_to_requested_dtype(tmp_path):
    model = DeepSeekMoEForCausalLM(tiny())
    model.save_pretrained(tmp_path)
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


@pytest.fixture
def good_checkpoint(tmp_path):
    config = tiny()
    model = DeepSeekMoEForCausalLM(config)
    state = to_hf_state_dict(model)
    return tmp_path, config, state


def test_missing_tensor_refused(good_checkpoint):
    path, config, state = good_checkpoint
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    write_hf_checkpoint(path / "ckpt", config, state)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt")


def test_unexpected_tensor_refused(good_checkpoint):
    path, config, state = good_checkpoint
    state["model.layers.1.mlp.experts.8.gate_proj.weight"] = torch.zeros(16, 32)  # a 9th expert
    write_hf_checkpoint(path / "ckpt", config, state)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model\.layers\.1\.mlp\.experts\.8\.gate_proj"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt")


def test_misshaped_tensor_refused(good_checkpoint):
    path, config, state = good_checkpoint
    state["model.layers.1.mlp.experts.2.down_proj.weight"] = torch.zeros(32, 15)
    write_hf_checkpoint(path / "ckpt", config, state)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.2\.down_proj\.weight .*shape \[32, 15\].*\[32, 16\]"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt")


def test_config_that_disagrees_with_weights_refused(good_checkpoint):
    path, config, state = good_checkpoint
    write_hf_checkpoint(path / "ckpt", config, state, extra_config={"moe_intermediate_size": 8})
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight .*shape \[16, 32\].*\[8, 32\]"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt")


def test_integer_tensor_refused(good_checkpoint):
    path, config, state = good_checkpoint
    state["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    write_hf_checkpoint(path / "ckpt", config, state)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .*dtype I32"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt")


def test_truncated_file_refused(good_checkpoint):
    path, config, state = good_checkpoint
    write_hf_checkpoint(path / "ckpt", config, state)
    weights = path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt")


def test_bad_index_refused(good_checkpoint):
    path, config, state = good_checkpoint
    write_hf_checkpoint(path / "ckpt", config, state, shards=2)
    index_path = path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    os.remove(path / "ckpt" / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt")
    write_hf_checkpoint(path / "ckpt2", config, state, shards=2)
    index = json.loads((path / "ckpt2" / "model.safetensors.index.json").read_text())
    name = next(n for n, f in index["weight_map"].items() if f.startswith("model-00001"))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (path / "ckpt2" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor {name}"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt2")
    (path / "ckpt2" / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="index"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt2")


def test_duplicate_tensor_across_shards_refused(good_checkpoint):
    path, config, state = good_checkpoint
    os.makedirs(path / "ckpt")
    (path / "ckpt" / "config.json").write_text(json.dumps(config.to_dict()))
    names = list(state)
    save_file({n: state[n] for n in names[:10]}, path / "ckpt" / "model-00001-of-00002.safetensors")
    save_file({n: state[n] for n in names[9:]}, path / "ckpt" / "model-00002-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names[:10]}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in names[10:]})
    (path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"tensor {names[9]} appears twice"):
        DeepSeekMoEForCausalLM.from_pretrained(path / "ckpt")


def test_pickle_and_empty_directories_refused(tmp_path):
    config = tiny()
    os.makedirs(tmp_path / "bin")
    config.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(CheckpointError, match="pickle"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path / "bin")
    os.makedirs(tmp_path / "empty")
    config.save_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_bad_shard_size_refused(tmp_path):
    model = DeepSeekMoEForCausalLM(tiny())
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path, max_shard_size="lots")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model.save_pretrained(tmp_path)  # a later unsharded save replaces the shards
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------ from_pretrained's arguments


def test_from_pretrained_dtype_and_device_arguments(tmp_path):
    model = DeepSeekMoEForCausalLM(tiny())
    model.save_pretrained(tmp_path)
    for kwargs in ({"torch_dtype": torch.bfloat16}, {"dtype": "bfloat16"}, {"dtype": "bf16"}):
        assert DeepSeekMoEForCausalLM.from_pretrained(tmp_path, **kwargs).dtype == torch.bfloat16, kwargs
    assert DeepSeekMoEForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.float32
    for kwargs in ({"device": "cpu"}, {"device_map": "cpu"}, {"device_map": {"": "cpu"}}):
        assert DeepSeekMoEForCausalLM.from_pretrained(tmp_path, **kwargs).device == torch.device("cpu"), kwargs
    with pytest.raises(ValueError, match="device_map='auto' would spread"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path, device_map="auto")
    with pytest.raises(ValueError, match="device or device_map, not both"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path, device="cpu", device_map="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            DeepSeekMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda")
    with pytest.raises(ValueError, match="not a floating dtype"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="disagree"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="trust_remote_code"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    # config fields stay overridable, and a re-save writes plain JSON
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path, aux_loss_alpha=0.5, torch_dtype=torch.bfloat16)
    assert loaded.config.aux_loss_alpha == 0.5
    loaded.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["aux_loss_alpha"] == 0.5 and "dtype" not in config


# ------------------------------------------------------------------ atomic saving


def _snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_save_into_an_existing_directory_keeps_other_files_and_drops_stale_shards(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("step,loss\n")
    first = DeepSeekMoEForCausalLM(tiny())
    first.save_pretrained(run, max_shard_size=20_000)
    assert (run / "model.safetensors.index.json").exists()
    torch.manual_seed(1)
    second = DeepSeekMoEForCausalLM(tiny())
    second.save_pretrained(run)  # one file now: the shards and the index of the first go
    names = sorted(p.name for p in run.iterdir())
    assert names == ["config.json", "log.csv", "model.safetensors"]
    assert_same_weights(DeepSeekMoEForCausalLM.from_pretrained(run), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging directory left


@pytest.mark.parametrize("fault", ["disk_full", "safetensors"])
@pytest.mark.parametrize("existing", [True, False])
def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, fault, existing):
    import errno

    import safetensors
    import safetensors.torch

    import dsmoe.checkpoint as checkpoint

    target = tmp_path / "ckpt"
    before = DeepSeekMoEForCausalLM(tiny())
    if existing:
        before.save_pretrained(target, max_shard_size=20_000)
        (target / "notes.txt").write_text("mine")
        snapshot = _snapshot(target)
    if fault == "disk_full":
        writes = []
        real_write = checkpoint._fsync_write

        def write(path, data):
            writes.append(path)
            if len(writes) == 2:  # the second file: after one shard is on disk
                raise OSError(errno.ENOSPC, "No space left on device", path)
            real_write(path, data)

        monkeypatch.setattr(checkpoint, "_fsync_write", write)
        expected = "No space left on device"
    else:
        def save(*args, **kwargs):
            raise safetensors.SafetensorError("Error while serializing: IoError")

        monkeypatch.setattr(safetensors.torch, "save", save)
        expected = "Error while serializing"
    torch.manual_seed(2)
    with pytest.raises(OSError) as info:
        DeepSeekMoEForCausalLM(tiny()).save_pretrained(target, max_shard_size=20_000)
    message = str(info.value)
    assert "\n" not in message and str(target) in message and expected in message
    assert isinstance(info.value, checkpoint.SaveError)
    if existing:
        assert _snapshot(target) == snapshot  # byte for byte what it was
        monkeypatch.undo()
        assert_same_weights(DeepSeekMoEForCausalLM.from_pretrained(target), before)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    else:
        assert list(tmp_path.iterdir()) == []  # neither the target nor a partial staging directory


_SAVE_LOOP = """
import sys, torch
from dsmoe import DeepSeekMoEForCausalLM, get_preset
cfg = get_preset("tiny", hidden_size=128, intermediate_size=256, moe_intermediate_size=64, n_routed_experts=16)
models = []
for seed in (0, 1):
    torch.manual_seed(seed)
    models.append(DeepSeekMoEForCausalLM(cfg))
print("ready", flush=True)
i = 0
while True:
    models[i % 2].save_pretrained(sys.argv[1])
    i += 1
"""


def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """A process saving two models in turn into one directory, killed at random moments: the
    directory always loads, as exactly one of the two."""
    import random
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "ckpt"
    cfg = get_preset("tiny", hidden_size=128, intermediate_size=256, moe_intermediate_size=64, n_routed_experts=16)
    expected = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected.append(DeepSeekMoEForCausalLM(cfg))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(target)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.time() + 60
        while not (target / "config.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = DeepSeekMoEForCausalLM.from_pretrained(target)
        matches = [all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.state_dict().values())) for m in expected]
        assert any(matches)


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path):
    model = DeepSeekMoEForCausalLM(tiny())
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.experts.3.up_proj.weight"][2, 5] = float("nan")
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor model\.(layers\.1\.mlp\.experts\.3\.up_proj|norm)\.weight .* 1 NaN/inf value"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path)
