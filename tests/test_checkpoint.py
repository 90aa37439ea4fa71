"""Checkpoints in the Hugging Face deepseek-moe layout: round trips, a hand-written HF
checkpoint, and the refusal of bad ones."""
from __future__ import annotations

import json
import os
import re

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


# ---------------------------------------------------------------- pieces, exactly (mutation pass)


@pytest.mark.parametrize(
    "size, expected",
    [
        (1, 1), (20_000, 20_000), ("1", 1), ("0.5KB", 500), ("2kb", 2000), (" 3 MB ", 3_000_000),
        ("1.5GB", 1_500_000_000), ("1KiB", 1024), ("2mib", 2 * 2**20), ("1GiB", 2**30), ("7B", 7), ("7b", 7),
    ],
)
def test_max_shard_size_spellings(size, expected):
    from dsmoe.checkpoint import _parse_size

    assert _parse_size(size) == expected


@pytest.mark.parametrize(
    "size, message",
    [
        (0, "max_shard_size must be positive, got 0"),
        (-5, "max_shard_size must be positive, got -5"),
        ("0MB", "max_shard_size must be positive, got '0MB'"),
        ("0.1B", "max_shard_size must be positive, got '0.1B'"),
        (True, "max_shard_size must be bytes or like '500MB' / '2GB', got True"),
        ("lots", "max_shard_size must be bytes or like '500MB' / '2GB', got 'lots'"),
        ("5 TB", "max_shard_size must be bytes or like '500MB' / '2GB', got '5 TB'"),
        ("-5", "max_shard_size must be bytes or like '500MB' / '2GB', got '-5'"),
    ],
)
def test_max_shard_size_refusals(size, message):
    from dsmoe.checkpoint import _parse_size

    with pytest.raises(ValueError) as info:
        _parse_size(size)
    assert str(info.value) == message


def test_shards_fill_up_to_the_limit_exactly():
    from dsmoe.checkpoint import _shards

    tensors = {name: torch.zeros(25) for name in "abcd"}  # 100 bytes each
    assert [list(s) for s in _shards(tensors, 200)] == [["a", "b"], ["c", "d"]]
    assert [list(s) for s in _shards(tensors, 199)] == [["a"], ["b"], ["c"], ["d"]]
    assert [list(s) for s in _shards(tensors, None)] == [["a", "b", "c", "d"]]
    big = {"a": torch.zeros(100), "b": torch.zeros(10)}  # a tensor over the limit gets a shard alone
    assert [list(s) for s in _shards(big, 50)] == [["a"], ["b"]]


def test_hf_state_dict_copies_expert_slices_and_shares_the_rest():
    # expert slices are fresh tensors (safetensors refuses shared storage); whole tensors are not
    # copied (saving must not double the model's memory)
    model = DeepSeekMoEForCausalLM(tiny())
    state = to_hf_state_dict(model)
    assert state["model.embed_tokens.weight"].data_ptr() == model.model.embed_tokens.weight.data_ptr()
    stacked = model.moe_layers()[0].experts.w_gate_up
    expert = state["model.layers.1.mlp.experts.0.gate_proj.weight"]
    assert torch.equal(expert, stacked[0, : expert.shape[0]])
    start, end = stacked.untyped_storage().data_ptr(), stacked.untyped_storage().data_ptr() + stacked.untyped_storage().nbytes()
    assert not start <= expert.data_ptr() < end


def test_describe_shows_five_names_and_counts_the_rest():
    from dsmoe.checkpoint import _describe

    assert _describe(list("abcde")) == "a, b, c, d, e"
    assert _describe(list("abcdef")) == "a, b, c, d, e (and 1 more)"
    assert _describe(list("abcdefgh")) == "a, b, c, d, e (and 3 more)"
    assert _describe([]) == ""


def test_scan_and_index_messages(tmp_path):
    from dsmoe.checkpoint import _scan, _weight_files, checkpoint_dtype

    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    save_file({"x": torch.zeros(2)}, one)
    save_file({"x": torch.zeros(3)}, two)
    with pytest.raises(CheckpointError) as info:
        _scan([one, two], None)
    assert str(info.value) == f"tensor x appears twice ({one} and {two})"
    with pytest.raises(CheckpointError) as info:
        _scan([one], {"x": "one.safetensors", "y": "one.safetensors"})
    assert str(info.value) == "the index maps tensor y to one.safetensors, which does not hold it"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(CheckpointError) as info:
        _weight_files(str(tmp_path))
    assert str(info.value) == f"{tmp_path / 'model.safetensors.index.json'}: weight_map must be an object"
    # the stored floating dtype, past integer tensors that come first
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file({"a_counts": torch.zeros(3, dtype=torch.int64), "b_weight": torch.zeros(2, dtype=torch.bfloat16)},
              str(mixed / "model.safetensors"))
    assert checkpoint_dtype(str(mixed)) == torch.bfloat16


@pytest.mark.parametrize(
    "device, device_map, expected",
    [
        (None, None, "cpu"), ("meta", None, "meta"), (None, "meta", "meta"), (None, {"": "meta"}, "meta"),
        (None, torch.device("meta"), "meta"), (torch.device("cpu"), None, "cpu"),
    ],
)
def test_resolve_device_one_device(device, device_map, expected):
    from dsmoe.checkpoint import _resolve_device

    assert _resolve_device(device, device_map) == torch.device(expected)


def test_resolve_device_refusals(monkeypatch):
    from dsmoe.checkpoint import _resolve_device

    def message(device, device_map=None):
        with pytest.raises(ValueError) as info:
            _resolve_device(device, device_map)
        return str(info.value)

    assert message("cpu", "cpu") == "from_pretrained: pass device or device_map, not both"
    for spread in ("auto", "balanced", "balanced_low_0", "sequential", {"model": "cpu"}, {"": "cpu", "lm_head": "cpu"}):
        assert message(None, spread) == (
            f"from_pretrained: device_map={spread!r} would spread the model over devices, which dsmoe's "
            "model does not do; pass one device (device='cuda'), or load it with transformers' "
            "AutoModelForCausalLM.from_pretrained(path, device_map=...) after import dsmoe"
        )
    assert message("nonsense").startswith("from_pretrained: device 'nonsense' is not a device (")
    assert message(True).startswith("from_pretrained: device True is not a device (")  # a bool is not an index
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in (0, "cuda:0"):
        assert message(device) == "from_pretrained: device 'cuda:0' asked for, but torch finds no CUDA device"
    assert message(None, 1) == "from_pretrained: device 'cuda:1' asked for, but torch finds no CUDA device"


def test_saved_files_names_metadata_and_json_text(tmp_path):
    from safetensors import safe_open

    from dsmoe import DeepSeekMoEConfig
    from dsmoe.checkpoint import save_pretrained

    config = DeepSeekMoEConfig.from_dict({**tiny().to_dict(), "auto_map": {"AutoModel": "modeling_deepseek.X"}})
    model = DeepSeekMoEForCausalLM(config)
    total = sum(t.numel() * t.element_size() for t in to_hf_state_dict(model).values())
    # two shards: named from 00001, listed in an index
    names = save_pretrained(model, tmp_path / "two", max_shard_size=total // 2 + total // 4)
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index_text = (tmp_path / "two" / "model.safetensors.index.json").read_text()
    index = json.loads(index_text)
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert index["metadata"] == {"total_size": total} and sorted(set(index["weight_map"].values())) == names
    for name in names:  # transformers reads the format from the header
        with safe_open(str(tmp_path / "two" / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    config_text = (tmp_path / "two" / "config.json").read_text()
    config = json.loads(config_text)
    assert config_text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert "auto_map" not in config and config["torch_dtype"] == "float32"  # no remote-code pointers
    assert save_pretrained(model, tmp_path / "one") == ["model.safetensors"]
    with safe_open(str(tmp_path / "one" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_tokenizer_files_come_along_unless_the_target_has_its_own(tmp_path):
    source = tmp_path / "source"
    DeepSeekMoEForCausalLM(tiny()).save_pretrained(source)
    carried = {"tokenizer.json": b'{"t": 1}', "generation_config.json": b'{"g": 2}', "chat_template.jinja": b"{{x}}"}
    for name, data in carried.items():
        (source / name).write_bytes(data)
    (source / "notes.txt").write_text("not a tokenizer file")
    loaded = DeepSeekMoEForCausalLM.from_pretrained(source)
    loaded.save_pretrained(tmp_path / "new")
    for name, data in carried.items():
        assert (tmp_path / "new" / name).read_bytes() == data
    assert not (tmp_path / "new" / "notes.txt").exists()
    # a target with its own tokenizer keeps it; the others still come
    own = tmp_path / "own"
    own.mkdir()
    (own / "tokenizer.json").write_bytes(b'{"mine": true}')
    loaded.save_pretrained(own)
    assert (own / "tokenizer.json").read_bytes() == b'{"mine": true}'
    assert (own / "generation_config.json").read_bytes() == carried["generation_config.json"]
    # saving back where it came from, or after the source is gone, changes nothing else
    loaded.save_pretrained(source)
    assert {n: (source / n).read_bytes() for n in carried} == carried
    for name in carried:
        (source / name).unlink()
    loaded.save_pretrained(tmp_path / "after")
    assert not any((tmp_path / "after" / n).exists() for n in carried)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_fp64_and_fp16_checkpoints_round_trip(tmp_path, dtype):
    model = DeepSeekMoEForCausalLM(tiny()).to(dtype)
    model.save_pretrained(tmp_path)
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == dtype
    assert_same_weights(model, loaded)


def test_load_messages_in_full(tmp_path, monkeypatch):
    import dsmoe.checkpoint as ckpt

    model = DeepSeekMoEForCausalLM(tiny())
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    tensors["model.norm.weight"][:3] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path)
    assert str(info.value) == (
        f"tensor model.norm.weight in {path} holds 3 NaN/inf value(s) of {tensors['model.norm.weight'].numel()}: "
        "the checkpoint is corrupt (or was saved from a diverged run)"
    )
    # a tensor whose header reads but whose data does not
    real_open = ckpt._open

    class Unreadable:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return self.inner.get_slice(name)

        def get_tensor(self, name):
            raise RuntimeError("I/O error")

    monkeypatch.setattr(ckpt, "_open", lambda p: Unreadable(real_open(p)))
    with pytest.raises(CheckpointError, match=r"^cannot read tensor model\.\S+ from " + re.escape(path) + ": I/O error$"):
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_each_pickle_extension_is_refused_by_name(tmp_path, name):
    tiny().save_pretrained(tmp_path)
    (tmp_path / name).write_bytes(b"\x80\x04not read")
    (tmp_path / "a.bin").write_bytes(b"\x80\x04not read")
    expected = ", ".join(sorted({name, "a.bin"}))
    with pytest.raises(CheckpointError) as info:
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path)
    assert str(info.value) == (
        f"{tmp_path} holds only pickle weights ({expected}); dsmoe reads safetensors only — convert them "
        "first (e.g. with safetensors' convert script)"
    )


def test_resolve_dtype_names_and_refusals(tmp_path):
    from dsmoe.checkpoint import _resolve_dtype

    for name in ("torch.bfloat16", "BF16", "torch.float16", "double"):
        assert _resolve_dtype(name, str(tmp_path)).is_floating_point
    assert _resolve_dtype("torch.bfloat16", str(tmp_path)) == torch.bfloat16
    assert _resolve_dtype("torch.float16", str(tmp_path)) == torch.float16
    for bad in (torch.int64, 3):
        with pytest.raises(ValueError) as info:
            _resolve_dtype(bad, str(tmp_path))
        assert str(info.value) == f"from_pretrained: dtype must be a floating torch.dtype, a name or 'auto', got {bad!r}"


def test_from_pretrained_defaults_and_unknown_arguments(tmp_path):
    config = tiny()
    model = DeepSeekMoEForCausalLM(config)
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    stored["dtype"] = "float32"  # what newer transformers write beside torch_dtype
    (tmp_path / "config.json").write_text(json.dumps(stored))
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path)
    assert loaded.moe_impl == "dsmoe" and not loaded.training
    assert "torch_dtype" not in loaded.config.extra and "dtype" not in loaded.config.extra  # rewritten at save
    assert DeepSeekMoEForCausalLM.from_pretrained(tmp_path, moe_impl="reference").moe_impl == "reference"
    with pytest.raises(TypeError) as info:
        DeepSeekMoEForCausalLM.from_pretrained(tmp_path, flavour=1, aroma=2)
    assert str(info.value) == (
        "from_pretrained: unexpected keyword argument(s) aroma, flavour (accepted: dtype, device, "
        "device_map, moe_impl and config fields to override)"
    )


def test_save_stages_beside_the_target_and_publishes_config_last(tmp_path, monkeypatch):
    from dsmoe.checkpoint import SaveError

    model = DeepSeekMoEForCausalLM(tiny())
    renamed, replaced = [], []
    real_rename, real_replace = os.rename, os.replace
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append((a, b)), real_rename(a, b))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b))[1])
    target = tmp_path / "run"
    model.save_pretrained(target, max_shard_size=20_000)
    ((src, dst),) = renamed  # a new target: the staging folder renamed
    assert dst == str(target) and os.path.dirname(src) == str(tmp_path)
    assert os.path.basename(src).startswith(".run.saving-")
    model.save_pretrained(target, max_shard_size=20_000)  # an existing one: file by file, config.json last
    assert [os.path.basename(b) for a, b in replaced][-1] == "config.json" and len(replaced) > 2
    assert all(os.path.basename(os.path.dirname(a)).startswith(".run.saving-") for a, b in replaced)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaveError) as info:
        model.save_pretrained(tmp_path / "file")
    assert str(info.value) == f"cannot save to {tmp_path / 'file'}: it exists and is not a directory"


def test_save_error_names_the_path_and_the_cause(tmp_path, monkeypatch):
    import dsmoe.checkpoint as ckpt

    model = DeepSeekMoEForCausalLM(tiny())
    target = str(tmp_path / "out")

    class SafetensorError(Exception):  # safetensors' error type is matched by name
        pass

    def fails_with(error):
        def write(*args):
            raise error
        monkeypatch.setattr(ckpt, "_write_checkpoint", write)
        with pytest.raises(ckpt.SaveError) as info:
            model.save_pretrained(target)
        assert not os.path.exists(target) and os.listdir(tmp_path) == []  # the staging folder is gone
        return str(info.value)

    assert fails_with(OSError(28, "No space left on device", "/some/file")) == (
        f"cannot save the model to {target}: /some/file: No space left on device"
    )
    text = fails_with(OSError(28, "No space left on device"))  # no file name: the staging folder
    staging = text.split(": ")[1]
    assert text.startswith(f"cannot save the model to {target}: {tmp_path}/.out.saving-") and text.endswith(
        ": No space left on device"
    ) and os.path.dirname(staging) == str(tmp_path)
    assert fails_with(SafetensorError("header too large\nmore detail")).endswith(": header too large")
    assert fails_with(SafetensorError()).endswith(": SafetensorError")
    monkeypatch.setattr(ckpt, "_write_checkpoint", lambda *a: (_ for _ in ()).throw(KeyError("not an I/O error")))
    with pytest.raises(KeyError):
        model.save_pretrained(target)  # other errors pass through unchanged
