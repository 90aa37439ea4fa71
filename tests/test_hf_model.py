"""dsmoe's DeepSeekMoE as a transformers model (dsmoe.hf.modeling): Auto classes on a released-layout
checkpoint and on a dsmoe-saved one, generate (greedy, sampling, beam, streaming, left padding,
static cache), pipeline, PEFT LoRA, accelerate's device_map/dtype "auto", gradient checkpointing,
router logits and aux loss, lm-evaluation-harness's HFLM. Every checkpoint is written by the test
from a tiny random model (no downloads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dsmoe  # noqa: E402  (registers the classes)
from dsmoe import DeepSeekMoEBlock, DeepSeekMoEForCausalLM, get_preset  # noqa: E402
from dsmoe.tokenizer import ByteTokenizer  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dsmoe.hf.modeling import DeepseekConfig, DeepseekForCausalLM  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, BOS, PAD = 257, 256, 258  # the byte tokenizer's specials

# What a released deepseek-moe checkpoint's config.json carries besides the architecture.
RELEASED_META = {
    "architectures": ["DeepseekForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "model_type": "deepseek",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
}


def tiny_config(**changes):
    # byte vocabulary (+ specials), dense first layer, GQA, shared + routed experts
    base = dict(vocab_size=320, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2)
    base.update(changes)
    return get_preset("tiny", **base)


def dsmoe_model(dtype=torch.float32, **changes) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    return DeepSeekMoEForCausalLM(tiny_config(**changes)).to(dtype).eval()


def write_released_layout(model: DeepSeekMoEForCausalLM, directory) -> str:
    """A directory laid out as a released deepseek-moe checkpoint: config.json with auto_map,
    sharded safetensors with an index, tokenizer.json + tokenizer_config.json, and remote-code
    files (which must never be imported: they raise)."""
    directory = str(directory)
    model.save_pretrained(directory, max_shard_size=60_000)
    assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config.update(RELEASED_META)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        with open(os.path.join(directory, name), "w") as f:
            f.write("raise RuntimeError('remote code was imported')\n")
    ByteTokenizer().save(directory)
    return directory


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    model = dsmoe_model(torch.bfloat16)
    return model, write_released_layout(model, tmp_path_factory.mktemp("released"))


@pytest.fixture(scope="module")
def hf_model(released):
    _, directory = released
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(released):
    tok = AutoTokenizer.from_pretrained(released[1])
    tok.padding_side = "left"
    return tok


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


# ------------------------------------------------------------------ import and registration


def test_import_dsmoe_without_transformers_and_lazily_with_it():
    blocked = (
        "import sys; sys.modules['transformers'] = None\n"
        "import dsmoe, torch\n"
        "m = dsmoe.DeepSeekMoEForCausalLM(dsmoe.get_preset('tiny'))\n"
        "print(m(torch.zeros(1, 3, dtype=torch.long))['logits'].shape)\n"
    )
    lazy = (
        "import sys, dsmoe\n"
        "assert 'transformers' not in sys.modules, 'import dsmoe imported transformers'\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('deepseek', vocab_size=64, hidden_size=32, num_attention_heads=4)).__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    direct = (
        "import warnings; warnings.simplefilter('error')\n"
        "from dsmoe.hf.modeling import DeepseekForCausalLM\n"
        "from transformers import AutoModelForCausalLM, AutoConfig\n"
        "print(AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model('deepseek'))].__name__)\n"
    )
    cases = ((blocked, "torch.Size([1, 3, 64])"), (lazy, "DeepseekConfig"), (direct, "DeepseekForCausalLM"))
    for code, expected in cases:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().endswith(expected), run.stdout


# ------------------------------------------------------------------ loading and saving


def test_released_layout_loads_with_auto_classes(released, hf_model, tokenizer):
    ours, directory = released
    config = AutoConfig.from_pretrained(directory)
    assert type(config) is DeepseekConfig and not hasattr(config, "auto_map")
    assert type(hf_model) is DeepseekForCausalLM
    # one implementation: the parameters are dsmoe's, under the same names, with the same numbers
    assert isinstance(hf_model.model, dsmoe.DeepSeekMoEBackbone)
    loaded = DeepSeekMoEForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert_same_state(hf_model, loaded)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, loaded(ids)["logits"], rtol=0, atol=0)
    # the stored dtype with dtype="auto"
    auto = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
    assert auto.dtype == torch.bfloat16
    assert_same_state(auto, ours)
    # the tokenizer: AutoTokenizer finds tokenizer.json and tokenises as dsmoe's tokenizer does
    text = "def f(x):\n    return 'héllo'"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == dsmoe.load_tokenizer(directory).encode(text)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_dsmoe_saved_directory_opens_in_transformers_and_back(released, tmp_path):
    ours, directory = released
    loaded = DeepSeekMoEForCausalLM.from_pretrained(directory)
    saved = tmp_path / "saved"
    loaded.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "deepseek"
    for name in ("tokenizer.json", "tokenizer_config.json"):  # carried over from the source
        assert (saved / name).read_bytes() == open(os.path.join(directory, name), "rb").read()
    assert not (saved / "modeling_deepseek.py").exists()
    hf = AutoModelForCausalLM.from_pretrained(saved)
    assert hf.dtype == torch.bfloat16
    assert_same_state(hf, ours)
    assert AutoTokenizer.from_pretrained(saved).decode([104, 105]) == "hi"
    # transformers' save writes the released (per-expert) layout, which dsmoe re-loads bit-exactly
    again = tmp_path / "again"
    hf.save_pretrained(again)
    names = set()
    from safetensors import safe_open

    for f in again.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert not any("w_gate_up" in n for n in names)
    assert_same_state(DeepSeekMoEForCausalLM.from_pretrained(again), ours)


def test_faces_share_weights():
    ours = dsmoe_model()
    hf = DeepseekForCausalLM.from_dsmoe(ours)
    assert hf.lm_head.weight is ours.lm_head.weight
    back = hf.to_dsmoe()
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)["logits"], rtol=0, atol=0)
        torch.testing.assert_close(back(ids)["logits"], ours(ids)["logits"], rtol=0, atol=0)


def test_device_map_and_dtype_auto(released):
    pytest.importorskip("accelerate")
    ours, directory = released
    from accelerate import infer_auto_device_map

    model = AutoModelForCausalLM.from_pretrained(directory, device_map="auto", dtype="auto")
    assert model.dtype == torch.bfloat16
    assert_same_state(model.to("cpu"), ours)
    # a map over small devices places whole decoder blocks (_no_split_modules), never half a layer
    budget = {0: 60_000, 1: 60_000, "cpu": 10**9}
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules)
    assert len(set(device_map.values())) > 1
    assert all(not key.startswith("model.layers.") or key.count(".") == 2 for key in device_map), device_map


# ------------------------------------------------------------------ generate and pipeline


def prompts(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_generate_greedy_equals_dsmoe_and_stops_at_eos(hf_model, released):
    ours = DeepSeekMoEForCausalLM.from_pretrained(released[1], dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 5))
    hf_out = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(hf_out, ours.generate(ids, max_new_tokens=12, eos_token_id=None))
    no_cache = hf_model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(hf_out, no_cache)
    static = hf_model.generate(
        ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD, cache_implementation="static"
    )
    assert torch.equal(hf_out, static)
    # with the first generated token as EOS, both faces stop there
    eos = int(hf_out[0, 5])
    hf_eos = hf_model.generate(ids[:1], max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert hf_eos.shape[1] == 6 and torch.equal(hf_eos, ours.generate(ids[:1], max_new_tokens=12, eos_token_id=eos))


def test_forward_takes_the_cache_by_either_name(hf_model):
    # transformers 5.24 renamed past_key_values to cache (its generate passes cache=); 5.23 and
    # user code pass past_key_values: both continue the sequence exactly, and a cache given
    # twice or not a Cache is refused by name
    from transformers.cache_utils import DynamicCache

    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        full = hf_model(ids, use_cache=False).logits[:, 4:]
        for name in ("cache", "past_key_values"):
            cache = DynamicCache(config=hf_model.config)
            first = hf_model(ids[:, :4], use_cache=True, **{name: cache})
            assert _returned_cache(first) is cache and cache.get_seq_length() == 4
            rest = hf_model(ids[:, 4:], use_cache=True, **{name: cache}).logits
            torch.testing.assert_close(rest, full, rtol=1e-4, atol=1e-4, msg=name)
        with pytest.raises(ValueError, match="cache or past_key_values, not both"):
            hf_model(ids, cache=DynamicCache(), past_key_values=DynamicCache())
        for name in ("cache", "past_key_values"):
            with pytest.raises(TypeError, match=f"^{name} must be a transformers Cache, got tuple"):
                hf_model(ids, **{name: ()})


def test_generate_left_padding_equals_one_by_one(hf_model, tokenizer):
    texts = ["def main():", "x", "import os\nimport sys"]
    batch = prompts(tokenizer, texts)
    out = hf_model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    for i, text in enumerate(texts):
        alone = prompts(tokenizer, [text])
        one = hf_model.generate(**alone, max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None)
        assert torch.equal(out[i, -8:], one[0, -8:]), f"row {i}"


def test_generate_sampling_beam_and_streaming(hf_model):
    ids = torch.randint(0, 256, (1, 6))
    kw = dict(max_new_tokens=10, pad_token_id=PAD, eos_token_id=None)
    torch.manual_seed(1)
    a = hf_model.generate(ids, do_sample=True, temperature=1.3, top_k=50, top_p=0.95, **kw)
    torch.manual_seed(1)
    b = hf_model.generate(ids, do_sample=True, temperature=1.3, top_k=50, top_p=0.95, **kw)
    assert torch.equal(a, b) and a.shape == (1, 16)

    def logprob(seq):
        with torch.no_grad():
            logits = hf_model(seq).logits[0, 5:-1].log_softmax(-1)
        return float(logits.gather(-1, seq[0, 6:, None]).sum())

    greedy = hf_model.generate(ids, do_sample=False, **kw)
    beam = hf_model.generate(ids, do_sample=False, num_beams=4, length_penalty=0.0, **kw)
    assert beam.shape == greedy.shape
    assert logprob(beam) >= logprob(greedy) - 1e-4  # beam search finds a sequence at least as likely

    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.pieces, self.ended = [], False

        def put(self, value):
            self.pieces.append(value.reshape(-1))

        def end(self):
            self.ended = True

    streamer = Collect()
    out = hf_model.generate(ids, do_sample=False, streamer=streamer, **kw)
    assert streamer.ended and torch.equal(torch.cat(streamer.pieces), out[0])


def test_pipeline_text_generation(hf_model, tokenizer):
    generator = transformers.pipeline("text-generation", model=hf_model, tokenizer=tokenizer, device="cpu")
    result = generator("def f(x):", max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    text = result[0]["generated_text"]
    ids = tokenizer("def f(x):", return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = hf_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)


# ------------------------------------------------------------------ training faces


def test_router_logits_and_aux_loss(released):
    hf = AutoModelForCausalLM.from_pretrained(released[1], dtype=torch.float64)
    ours = DeepSeekMoEForCausalLM.from_pretrained(released[1], dtype=torch.float64)
    ids = torch.randint(0, 256, (2, 9))
    hf.train(), ours.train()
    out = hf(ids, labels=ids, output_router_logits=True, output_hidden_states=True)
    ref = ours(ids, labels=ids)
    n_moe = len(ours.moe_layers())
    assert len(out.router_logits) == n_moe and out.router_logits[0].shape == (18, 8)
    # the router logits are the gate's: [B*L, h] inputs of the first MoE layer times its weight
    moe_input = hf.model.layers[1].post_attention_layernorm(
        out.hidden_states[1] + hf.model.layers[1].self_attn(
            hf.model.layers[1].input_layernorm(out.hidden_states[1]),
            *hf.model.rotary_emb(torch.arange(9).expand(2, 9), torch.float64),
        )
    )
    torch.testing.assert_close(out.router_logits[0], moe_input.reshape(18, -1) @ hf.model.layers[1].mlp.gate.weight.T)
    assert len(out.hidden_states) == hf.config.num_hidden_layers + 1
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    torch.testing.assert_close(out.loss, ref.loss.float())
    out.loss.backward()
    assert hf.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    # the balance losses rebuilt from the router logits are the layers' own
    torch.testing.assert_close(hf.balance_loss(out.router_logits, 2), out.aux_loss)
    assert hf(ids, output_router_logits=False).router_logits is None
    hf.eval()
    assert hf(ids).aux_loss is None  # as the released code: balance losses in training only
    # ... unless router logits are asked for, as in transformers' MoE models (then in the loss too)
    with torch.no_grad():
        evaluated = hf(ids, labels=ids, output_router_logits=True)
        plain = hf(ids, labels=ids)
    torch.testing.assert_close(evaluated.aux_loss, hf.balance_loss(evaluated.router_logits, 2))
    torch.testing.assert_close(evaluated.loss, plain.loss + evaluated.aux_loss.float())


def test_gradient_checkpointing_gives_the_same_gradients(released):
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(released[1], dtype=torch.float64).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.gradient_checkpointing
        calls = []
        block_forward = DeepSeekMoEBlock.forward

        def counted(self, *args):
            calls.append(self.layer_idx)
            return block_forward(self, *args)

        ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DeepSeekMoEBlock, "forward", counted)
            model(ids, labels=ids).loss.backward()
        assert calls.count(1) == (2 if checkpointing else 1)  # the block ran again in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_peft_lora_on_attention_and_shared_experts(released, tmp_path):
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(released[1], dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=8,
        target_modules=r".*\.(self_attn\.(q|k|v|o)_proj|mlp\.shared_experts\.(gate|up|down)_proj)",
    )
    lora = peft.get_peft_model(model, config)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("shared_experts.gate_proj.lora_A" in n for n in trainable)
    assert any("self_attn.q_proj.lora_B" in n for n in trainable)
    assert not any("experts.w_" in n for n in trainable)  # the routed experts stay frozen
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    lora.train()
    losses = []
    for _ in range(4):
        loss = lora(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in lora.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        # the adapter saves and loads back onto a fresh base model
        lora.save_pretrained(tmp_path / "adapter")
        base = AutoModelForCausalLM.from_pretrained(released[1], dtype=torch.float32)
        reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted)
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_lm_eval_harness_hflm(hf_model, tokenizer):
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    lm = huggingface.HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=2, max_length=64)
    context, continuation = "def f(x):", "\n    return x"
    request = Instance("loglikelihood", {}, (context, continuation), 0)
    (logprob, greedy), = lm.loglikelihood([request])
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(ctx) - 1 : -1].log_softmax(-1)
    expected = float(logits.gather(-1, torch.tensor(cont)[:, None]).sum())
    assert abs(logprob - expected) < 1e-4
    assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    (text,) = lm.generate_until([Instance("generate_until", {}, ("x = ", {"until": ["\n\n"], "max_gen_toks": 5, "do_sample": False}), 0)])
    assert isinstance(text, str)


@pytest.mark.parametrize(
    "changes",
    [
        dict(rope_scaling={"type": "linear", "factor": 2.0}),
        dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
        dict(tie_word_embeddings=True, pad_token_id=0),
        dict(use_selection_bias=True),
        dict(router_type="noisy_topk", seq_aux=False, norm_topk_prob=True),
    ],
    ids=["linear-rope", "dynamic-rope", "tied", "selection-bias", "noisy-router"],
)
def test_config_variants_load_and_save_both_ways(tmp_path, changes):
    torch.manual_seed(0)
    ours = DeepSeekMoEForCausalLM(get_preset("tiny", **changes)).eval()
    for layer in ours.moe_layers():
        if layer.gate.e_score_correction_bias is not None:
            layer.gate.e_score_correction_bias.normal_()
    ours.save_pretrained(tmp_path / "dsmoe")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "dsmoe").eval()
    assert_same_state(hf, ours)
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)["logits"], rtol=0, atol=0)
    hf.save_pretrained(tmp_path / "hf")
    assert_same_state(DeepSeekMoEForCausalLM.from_pretrained(tmp_path / "hf"), ours)


def test_config_validation_and_refusals():
    with pytest.raises(ValueError, match="num_experts_per_tok=9 must be <= n_routed_experts=8"):
        DeepseekConfig(n_routed_experts=8, num_experts_per_tok=9)
    model = DeepseekForCausalLM.from_dsmoe(dsmoe_model())
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="2-d padding mask"):
        model(ids, attention_mask=torch.ones(1, 1, 4, 4))
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="max_position_embeddings is 128"):
        model.generate(torch.randint(0, 256, (1, 120)), max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    assert calls == []  # refused before the first forward
    with pytest.raises(ValueError, match="needs 129 positions"):
        model(torch.randint(0, 256, (1, 129)))


# ---------------------------------------------------------------- mutation-pass tests (dsmoe/hf/modeling.py)


def _hf(**changes):
    return DeepseekForCausalLM.from_dsmoe(dsmoe_model(**changes))


def _returned_cache(out):
    """The cache an output carries, under the installed transformers' field name."""
    return getattr(out, "cache" if "cache" in out.__dataclass_fields__ else "past_key_values")


def _message(fn) -> str:
    with pytest.raises((ValueError, TypeError)) as e:
        fn()
    return str(e.value)


def test_refusals_in_full():
    model = _hf()
    ids = torch.randint(0, 256, (1, 4))
    embeds = model.get_input_embeddings()(ids)
    one_of = "DeepseekForCausalLM.forward: pass exactly one of input_ids and inputs_embeds"
    assert _message(lambda: model()) == one_of
    assert _message(lambda: model(ids, inputs_embeds=embeds)) == one_of
    assert _message(lambda: model(ids, output_attentions=True)) == (
        "DeepseekForCausalLM: output_attentions is not supported (attention runs through "
        "scaled_dot_product_attention, which returns no weights)")
    cache = transformers.DynamicCache(config=model.config)
    assert _message(lambda: model(ids, cache=cache, past_key_values=cache)) == (
        "DeepseekForCausalLM.forward: pass the KV cache as cache or past_key_values, not both")
    assert _message(lambda: model(torch.randint(0, 256, (1, 129)))) == (
        "forward needs 129 positions but the model's max_position_embeddings is 128; "
        "shorten the input (or the number of new tokens)")
    assert _message(lambda: model.generate(torch.randint(0, 256, (1, 120)), max_new_tokens=20, do_sample=False,
                                           pad_token_id=PAD)) == (
        "generate (a prompt of 120 tokens, max_length=140) needs 140 positions but the model's "
        "max_position_embeddings is 128; shorten the input (or the number of new tokens)")
    assert _message(lambda: DeepseekConfig.from_dsmoe({"hidden_size": 8})) == (
        "from_dsmoe: config must be a DeepSeekMoEConfig, got dict")


def test_positions_past_the_limit_count_the_cache():
    """120 cached positions and 10 new tokens need 130: refused at max_position_embeddings 128."""
    model = _hf()
    with torch.no_grad():
        cache = _returned_cache(model(torch.randint(0, 256, (1, 120))))
        assert cache.get_seq_length() == 120
        with pytest.raises(ValueError, match="forward needs 130 positions"):
            model(torch.randint(0, 256, (1, 10)), cache=cache)
        # a static cache longer than the model's limit, positions given as generate gives them
        static = transformers.StaticCache(config=model.config, max_cache_len=160)
        model(torch.randint(0, 256, (1, 120)), cache=static, cache_position=torch.arange(120))
        with pytest.raises(ValueError, match="forward needs 130 positions"):
            model(torch.randint(0, 256, (1, 10)), cache=static, cache_position=torch.arange(120, 130))


def test_config_defaults_decide_what_forward_returns():
    """Unset arguments take the config's output_hidden_states, output_router_logits and
    use_cache (a cache by default); gradient checkpointing drops the cache in training only."""
    model = _hf()
    model.config.output_hidden_states = model.config.output_router_logits = True
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        out = model(ids)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.router_logits) == sum(layer.is_moe for layer in model.model.layers)
    assert _returned_cache(out).get_seq_length() == 5
    model.config.use_cache = False
    with torch.no_grad():
        assert _returned_cache(model(ids)) is None
    model = _hf()
    model.activation_checkpointing_enable()
    with torch.no_grad():
        assert _returned_cache(model(ids)).get_seq_length() == 5  # eval: the cache is kept
    model.train()
    assert _returned_cache(model(ids)) is None


def test_inputs_embeds_and_position_ids_reach_the_backbone():
    """inputs_embeds give the logits of the ids they embed, with and without a cache;
    logits_to_keep (a count or indices) keeps those positions; explicit position_ids are the ones
    the backbone uses (as dsmoe's own model given the same)."""
    ours = dsmoe_model()
    model = DeepseekForCausalLM.from_dsmoe(ours)
    ids = torch.randint(0, 256, (2, 6))
    positions = torch.arange(10, 16).expand(2, 6)
    with torch.no_grad():
        by_ids = model(ids).logits
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, by_ids, rtol=0, atol=0)
        torch.testing.assert_close(model(inputs_embeds=embeds, use_cache=False).logits, by_ids, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, logits_to_keep=2).logits, by_ids[:, -2:], rtol=0, atol=0)
        torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([1, 3])).logits, by_ids[:, [1, 3]], rtol=0, atol=0)
        shifted = model(ids, position_ids=positions).logits
        torch.testing.assert_close(shifted, ours(ids, position_ids=positions)["logits"], rtol=0, atol=0)
        assert not torch.allclose(shifted, by_ids)


@pytest.mark.parametrize(
    "changes",
    [dict(num_hidden_layers=3), dict(seq_aux=False), dict(use_selection_bias=True),
     dict(aux_loss_alpha=0.0, device_aux_loss_alpha=0.05, num_expert_devices=2)],
    ids=["two-moe-layers", "token-level", "selection-bias", "device-loss-only"],
)
def test_balance_loss_from_router_logits_is_the_layers_own(changes):
    """Rebuilt from the router logits, the balance losses are what the MoE layers computed in
    their training forward: summed over layers, per sequence or over the batch, routed with the
    selection bias, the device-level loss alone."""
    model = _hf(**changes).train()
    for layer in model.model.layers:
        if layer.is_moe and layer.mlp.gate.e_score_correction_bias is not None:
            with torch.no_grad():
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    out = model(ids, output_router_logits=True)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(model.balance_loss(out.router_logits, 3), out.aux_loss)


def test_single_layer_model_generates_as_dsmoe():
    """One decoder layer: the cache's mask sizes are read from its only layer."""
    ours = dsmoe_model(num_hidden_layers=1, first_k_dense_replace=0)
    model = DeepseekForCausalLM.from_dsmoe(ours)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD)
        want = ours.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(out, want)


def test_config_round_trip_and_defaults():
    """from_dsmoe carries every field and the keyword arguments given; num_key_value_heads
    defaults to num_attention_heads (multi-head attention), as the released config."""
    cfg = tiny_config(n_routed_experts=6, num_experts_per_tok=3, seq_aux=False, rope_theta=5e4)
    hf_cfg = DeepseekConfig.from_dsmoe(cfg, output_router_logits=True)
    assert hf_cfg.to_dsmoe() == cfg and hf_cfg.output_router_logits is True
    assert DeepseekConfig(num_attention_heads=8, num_key_value_heads=None).num_key_value_heads == 8


def test_init_weights_and_embedding_setters():
    """A model built from a config is initialised as the released code does: normal(0,
    initializer_range) weights; the embedding setters replace what the getters return."""
    config = DeepseekConfig(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                            n_shared_experts=1, first_k_dense_replace=1, initializer_range=0.5)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(config)
    for weight in (model.lm_head.weight, model.model.embed_tokens.weight):
        assert abs(weight.float().std().item() - 0.5) < 0.02 and abs(weight.float().mean().item()) < 0.02
    embed, head = torch.nn.Embedding(300, 64), torch.nn.Linear(64, 300, bias=False)
    model.set_input_embeddings(embed)
    model.set_output_embeddings(head)
    assert model.get_input_embeddings() is embed and model.get_output_embeddings() is head
    reference = DeepseekForCausalLM(config, moe_impl="reference")
    assert {layer.mlp.impl for layer in reference.model.layers if layer.is_moe} == {"reference"}


def test_training_loss_carries_the_balance_losses_and_transformers_loss_arguments():
    """In training (no router logits asked for) aux_loss is the layers' balance losses and the
    loss includes it, as dsmoe's model computes; without labels there is no loss; the loss
    takes transformers' keyword arguments (num_items_in_batch: a sum over the tokens divided by
    it, as gradient accumulation asks)."""
    ours = dsmoe_model().train()
    model = DeepseekForCausalLM.from_dsmoe(ours)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    out, ref = model(ids, labels=ids), ours(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.aux_loss, ref["aux_loss"])
    torch.testing.assert_close(out.loss, ref["loss"].float())
    model.eval()
    with torch.no_grad():
        assert model(ids).loss is None
        logits = model(ids).logits
        summed = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   reduction="sum")
        torch.testing.assert_close(model(ids, labels=ids, num_items_in_batch=5).loss, summed / 5)


def test_auto_tokenizer_opens_a_directory_with_only_tokenizer_json(released, tmp_path):
    """A checkpoint directory with tokenizer.json and no tokenizer_config.json naming a class
    opens with AutoTokenizer (registered for the deepseek config)."""
    import shutil

    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(released[1], name), tmp_path / name)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert tok("hi")["input_ids"][-2:] == AutoTokenizer.from_pretrained(released[1])("hi")["input_ids"][-2:]
