"""dsmoe/cli/generate.py and the command line's entry point (dsmoe/cli/__init__.py) in-process:
the prompt's start token, the limits refused in full, greedy output equal to the model's own
greedy generate, stopping at end-of-text, the speed measurement's arithmetic, and how main()
turns each kind of failure into one line and an exit status."""
from __future__ import annotations

import argparse
import io
import json
import sys

import pytest
import torch

from dsmoe.cli import generate as gen
from dsmoe.cli import main
from dsmoe.cli.common import CLIError
from dsmoe.cli.data import BOS_ID, EOS_ID, ByteTokenizer
from dsmoe.config import get_preset
from dsmoe.model import DeepSeekMoEForCausalLM

from conftest import save_word_level_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=259, bos_token_id=BOS_ID, eos_token_id=EOS_ID, max_position_embeddings=40)
    return DeepSeekMoEForCausalLM(cfg).eval()


class _WordTokenizer:
    """A non-byte-level tokenizer: one id per character code, optional start and end tokens."""
    byte_level = False

    def __init__(self, bos_id=None, eos_id=None):
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text):
        return [ord(c) for c in text]

    def stream_decoder(self, prefix=()):
        class D:
            def push(self, t):
                return f"<{t}>"

            def flush(self):
                return "|"

        return D()


def _greedy(model, ids, n, eos=EOS_ID):
    return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos)[0, len(ids):].tolist()


def test_greedy_stream_is_the_model_s_greedy_generate(model):
    tok = ByteTokenizer()
    out = io.StringIO()
    new = gen.stream(model, tok, "ab", 12, temperature=0, top_k=40, top_p=None, seed=0, out=out, stop_at_eos=False)
    assert new == _greedy(model, [97, 98], 12, eos=None) and len(new) == 12
    decoder = tok.stream_decoder(prefix=[97, 98])
    text = "".join(decoder.push(t) for t in new) + decoder.flush()
    assert out.getvalue() == "ab" + text + "\n"


def test_an_empty_prompt_starts_from_the_start_token(model):
    out = io.StringIO()
    # byte-level models saw <|eos|> before every document: that is their start token
    new = gen.stream(model, ByteTokenizer(), "", 5, temperature=0, top_k=None, top_p=None, seed=0, out=out,
                     stop_at_eos=False)
    assert new == _greedy(model, [EOS_ID], 5, eos=None)
    # other tokenizers: <|bos|> first, before any prompt
    new = gen.stream(model, _WordTokenizer(bos_id=3, eos_id=4), "", 4, temperature=0, top_k=None, top_p=None, seed=0,
                     out=io.StringIO(), stop_at_eos=False)
    assert new == _greedy(model, [3], 4, eos=None)
    new = gen.stream(model, _WordTokenizer(bos_id=3), "ab", 4, temperature=0, top_k=None, top_p=None, seed=0,
                     out=io.StringIO(), stop_at_eos=False)
    assert new == _greedy(model, [3, 97, 98], 4, eos=None)
    # no <|bos|>: the end-of-text token starts
    new = gen.stream(model, _WordTokenizer(eos_id=5), "", 3, temperature=0, top_k=None, top_p=None, seed=0,
                     out=io.StringIO(), stop_at_eos=False)
    assert new == _greedy(model, [5], 3, eos=None)
    with pytest.raises(CLIError) as e:
        gen.stream(model, _WordTokenizer(), "", 3, temperature=0, top_k=None, top_p=None, seed=0, out=io.StringIO())
    assert str(e.value) == "--prompt is empty and the tokenizer has no start token; give a prompt"


def test_stream_refusals(model):
    with pytest.raises(CLIError) as e:
        gen.stream(model, _WordTokenizer(), "a\u0103", 3, 0, None, None, 0, out=io.StringIO())
    assert str(e.value) == "the prompt has token id 259, beyond the model's vocab_size 259"
    assert gen.stream(model, _WordTokenizer(), "a\u0102", 1, 0, None, None, 0, out=io.StringIO()) is not None
    with pytest.raises(CLIError) as e:
        gen.stream(model, ByteTokenizer(), "abc", 38, 0, None, None, 0, out=io.StringIO())
    assert str(e.value) == ("prompt (3 tokens) + --max-new-tokens 38 exceeds the model's max_position_embeddings 40")
    assert len(gen.stream(model, ByteTokenizer(), "abc", 37, 0, None, None, 0, out=io.StringIO(),
                          stop_at_eos=False)) == 37  # exactly at the limit


def test_stops_at_the_end_of_text_token(model, monkeypatch):
    seen = {}
    real = model.generate

    def generate(*a, **kw):
        seen.clear()
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(model, "generate", generate)
    gen.stream(model, ByteTokenizer(), "x", 2, 0.7, 0, 0.9, 1, out=io.StringIO())
    assert seen["eos_token_id"] == EOS_ID and seen["top_k"] is None and seen["top_p"] == 0.9
    assert seen["temperature"] == 0.7 and "do_sample" not in seen
    gen.stream(model, ByteTokenizer(), "x", 2, 0, 7, None, 1, out=io.StringIO(), stop_at_eos=False)
    assert seen["eos_token_id"] is None and seen["do_sample"] is False and "temperature" not in seen
    gen.stream(model, _WordTokenizer(eos_id=9), "x", 2, 0.5, 3, None, 1, out=io.StringIO())
    assert seen["eos_token_id"] == EOS_ID  # the model's own end-of-text token first
    monkeypatch.setattr(model.config, "eos_token_id", None)
    gen.stream(model, _WordTokenizer(eos_id=9), "x", 2, 0.5, 3, None, 1, out=io.StringIO())
    assert seen["eos_token_id"] == 9 and seen["top_k"] == 3  # the tokenizer's, when the config has none


def test_sampling_follows_the_seed(model):
    def sample(seed):
        return gen.stream(model, ByteTokenizer(), "q", 10, 1.0, None, None, seed, out=io.StringIO(), stop_at_eos=False)

    assert sample(1) == sample(1) and sample(1) != sample(2)


def test_random_model(monkeypatch):
    a = gen.random_model("tiny", None, "reference", seed=3)
    b = gen.random_model("tiny", None, "reference", seed=3)
    assert not a.training and a.moe_impl == "reference"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert next(a.parameters()).dtype == torch.float32
    c = gen.random_model("tiny", torch.bfloat16, "dsmoe", seed=3)
    assert {p.dtype for p in c.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    with pytest.raises(CLIError) as e:
        gen.random_model("nope", None, "dsmoe", 0)
    assert str(e.value).startswith("--random: ") and "nope" in str(e.value)

    def broken(*a, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(DeepSeekMoEForCausalLM, "__init__", broken)
    with pytest.raises(RuntimeError):
        gen.random_model("tiny", torch.bfloat16, "dsmoe", 0)
    assert torch.get_default_dtype() == torch.float32  # restored on failure too


def test_measure_arithmetic(model, monkeypatch):
    clock = iter([10.0, 10.5, 10.75, 11.0, 11.25])
    monkeypatch.setattr(gen.time, "perf_counter", lambda: next(clock))
    stats = gen.measure(model, batch=2, prompt_tokens=4, new_tokens=4, seed=0)
    cfg = model.config
    assert stats["kv_cache_bytes_per_token"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert stats["new_tokens"] == 4 and stats["batch"] == 2 and stats["prompt_tokens"] == 4
    assert stats["time_to_first_token_s"] == 0.5  # start 10.0, first token 10.5
    assert stats["decode_tokens_per_s"] == pytest.approx(2 * 3 / 0.75)
    assert stats["decode_step_ms"] == pytest.approx(250.0)
    assert stats["dtype"] == "float32" and stats["threads"] == torch.get_num_threads()
    monkeypatch.setattr(gen.time, "perf_counter", iter([1.0, 1.25, 1.75]).__next__)
    two = gen.measure(model, batch=1, prompt_tokens=2, new_tokens=2, seed=0)  # one decode step: a rate
    assert two["decode_tokens_per_s"] == pytest.approx(1 / 0.5) and two["decode_step_ms"] == pytest.approx(500.0)
    monkeypatch.setattr(gen.time, "perf_counter", iter([1.0, 1.25]).__next__)
    one = gen.measure(model, batch=1, prompt_tokens=2, new_tokens=1, seed=0)
    assert one["time_to_first_token_s"] == 0.25 and "decode_tokens_per_s" not in one and "decode_step_ms" not in one
    monkeypatch.setattr(gen.time, "perf_counter", iter([1.0]).__next__)
    none = gen.measure(model, batch=1, prompt_tokens=2, new_tokens=0, seed=0)
    assert none["new_tokens"] == 0 and none["time_to_first_token_s"] is None


def test_measure_prompts_follow_the_seed(model, monkeypatch):
    prompts = []
    real = model.generate
    calls = []
    monkeypatch.setattr(model, "generate",
                        lambda ids, **kw: (prompts.append(ids.clone()), calls.append(kw), real(ids, **kw))[2])
    gen.measure(model, 3, 5, 1, seed=4)
    # greedy, and never stopped early by an end-of-text token the random prompt happens to produce
    assert calls[0]["do_sample"] is False and "eos_token_id" in calls[0] and calls[0]["eos_token_id"] is None
    gen.measure(model, 3, 5, 1, seed=4)
    assert prompts[0].shape == (3, 5) and torch.equal(prompts[0], prompts[1])
    assert int(prompts[0].max()) < model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    assert torch.equal(prompts[0], torch.randint(0, model.config.vocab_size, (3, 5), generator=g))


def _generate_ns(*argv):
    p = argparse.ArgumentParser()
    gen.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--random", "tiny", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--model", "M", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--random", "tiny", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["--random", "tiny", "--prompt-tokens", "0"], "--prompt-tokens must be >= 1, got 0"),
    (["--random", "tiny", "--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1, got -1"),
    (["--random", "tiny", "--device", "meta"], "--device meta: only cpu and cuda are supported"),
    (["--model", "M", "--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
    (["--model", "M", "--top-k", "-1"], "--top-k must be >= 0, got -1"),
    (["--model", "M", "--top-p", "0"], "--top-p must be a number in (0, 1], got 0.0"),
    (["--model", "M", "--top-p", "1.5"], "--top-p must be a number in (0, 1], got 1.5"),
    (["--model", "M", "--seed", "-2"], "--seed must be an integer from 0 to 2**63 - 1, got -2"),
    (["--model", "M", "--prompt", "\udc80"], "--prompt must be UTF-8 text; it has byte 0x80 at character 0"),
    (["--model", "M", "--device", "meta"], "--device meta: only cpu and cuda are supported"),
])
def test_run_refusals(argv, message, tmp_path):
    ns = _generate_ns(*[str(tmp_path / "none") if a == "M" else a for a in argv])
    with pytest.raises(CLIError) as e:
        gen.run(ns)
    assert str(e.value) == message


def test_random_measures_on_the_cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(CLIError) as e:
        gen.run(_generate_ns("--random", "tiny", "--device", "cuda"))
    assert str(e.value) == "--random measures on the CPU only; use --device cpu"


def test_random_run_prints_one_json_line(capsys):
    assert gen.run(_generate_ns("--random", "tiny", "--max-new-tokens", "3", "--batch", "2", "--prompt-tokens", "4",
                                "--impl", "reference", "--bf16")) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["preset"] == "tiny" and stats["impl"] == "reference" and stats["weights"] == "random"
    assert stats["decode_path"] is False and stats["dtype"] == "bfloat16" and stats["new_tokens"] == 3
    assert stats["batch"] == 2 and stats["prompt_tokens"] == 4 and stats["prepack_s"] >= 0


def test_the_default_prompt(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=259, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    DeepSeekMoEForCausalLM(cfg).save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    prompts = []
    real = gen.stream
    monkeypatch.setattr(gen, "stream", lambda m, t, prompt, *a, **kw: (prompts.append((prompt, kw)), real(m, t, prompt, *a, **kw))[1])
    assert gen.run(_generate_ns("--model", str(tmp_path), "--max-new-tokens", "2", "--no-stop")) == 0
    assert prompts[-1] == ("", {"stop_at_eos": False})  # a start token exists: nothing prepended as text
    cfg2 = get_preset("tiny", vocab_size=64, bos_token_id=None, eos_token_id=None)
    DeepSeekMoEForCausalLM(cfg2).save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "tokenizer.json").unlink(missing_ok=True)
    monkeypatch.setattr(gen, "load_tokenizer", lambda *a, **kw: _WordTokenizer())
    assert gen.run(_generate_ns("--model", str(tmp_path / "plain"), "--max-new-tokens", "2")) == 0
    assert prompts[-1] == ("\n", {"stop_at_eos": True})


def test_the_options_and_their_defaults():
    assert vars(_generate_ns("--model", "M")) == dict(
        model="M", random=None, batch=1, prompt_tokens=32, prompt=None, max_new_tokens=200, temperature=0.8, top_k=40,
        top_p=None, seed=0, device="auto", bf16=False, impl="dsmoe", no_stop=False)
    p = argparse.ArgumentParser(prog="g")
    gen.add_arguments(p)
    assert "(--model DIR | --random PRESET)" in p.format_usage()
    for argv in ([], ["--model", "M", "--random", "tiny"]):  # exactly one of the two
        with pytest.raises(SystemExit):
            p.parse_args(argv)


def test_random_run_on_the_decode_path(monkeypatch, capsys):
    import itertools

    from dsmoe import decode

    assert decode.enabled()  # the default
    clock = itertools.count(100.0, 1.0)
    monkeypatch.setattr(gen.time, "perf_counter", lambda: next(clock))
    # a one-token prompt is allowed
    assert gen.run(_generate_ns("--random", "tiny", "--max-new-tokens", "2", "--prompt-tokens", "1", "--device", "cpu")) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["decode_path"] is True and stats["impl"] == "dsmoe" and stats["dtype"] == "float32"
    assert stats["prepack_s"] == 1.0  # one tick of the stand-in clock between the two readings
    assert stats["prompt_tokens"] == 1 and stats["new_tokens"] == 2


@pytest.fixture
def byte_model_dir(tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=259, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    DeepSeekMoEForCausalLM(cfg).save_pretrained(tmp_path / "m")
    ByteTokenizer().save(tmp_path / "m")
    return tmp_path / "m"


def test_run_passes_the_options_on(byte_model_dir, monkeypatch, capsys):
    from dsmoe import decode

    calls, packed = [], []
    monkeypatch.setattr(gen, "stream", lambda *a, **kw: calls.append((a, kw)) or [])
    monkeypatch.setattr(decode, "prepack", lambda m: packed.append(m) or 1)
    assert gen.run(_generate_ns("--model", str(byte_model_dir), "--prompt", "ab", "--temperature", "0.5", "--top-k", "7",
                                "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "5", "--device", "cpu")) == 0
    (model, tok, *args), kw = calls[-1]
    assert args == ["ab", 5, 0.5, 7, 0.9, 3] and kw == {"stop_at_eos": True}
    assert next(model.parameters()).dtype == torch.float32 and model.moe_impl == "dsmoe" and tok.byte_level
    assert packed == [model]  # packed before the first token is timed
    assert gen.run(_generate_ns("--model", str(byte_model_dir), "--bf16", "--impl", "reference", "--no-stop")) == 0
    (model, _, *args), kw = calls[-1]
    assert next(model.parameters()).dtype == torch.bfloat16 and model.moe_impl == "reference"
    assert args == ["", 200, 0.8, 40, None, 0] and kw == {"stop_at_eos": False}
    assert len(packed) == 1  # the reference layers have nothing to pack
    assert gen.run(_generate_ns("--model", str(byte_model_dir), "--top-k", "0")) == 0  # 0 = all tokens
    assert calls[-1][0][5] == 0


def test_no_new_tokens_prints_the_prompt(byte_model_dir, capsys):
    assert gen.run(_generate_ns("--model", str(byte_model_dir), "--prompt", "ab", "--max-new-tokens", "0")) == 0
    assert capsys.readouterr().out == "ab\n"


def _word_level_model(path, bos_id, eos_id):
    """A model with a word-level tokenizer.json (<unk> <s> </s> w0 ... w60): not byte-level."""
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(get_preset("tiny", bos_token_id=bos_id, eos_token_id=eos_id)).eval()
    model.save_pretrained(path)
    words = save_word_level_tokenizer(path, [f"w{i}" for i in range(61)], special_tokens=["<s>", "</s>"])
    return model, words


def test_a_word_level_tokenizer(tmp_path, capsys, monkeypatch):
    # the start token <s> (from config.json) before the prompt; continuations spaced as one decode
    model, words = _word_level_model(tmp_path / "a", bos_id=1, eos_id=2)
    assert gen.run(_generate_ns("--model", str(tmp_path / "a"), "--prompt", "w1 w2", "--temperature", "0",
                                "--max-new-tokens", "4", "--no-stop", "--device", "cpu")) == 0
    new = _greedy(model, [1, 4, 5], 4, eos=None)
    assert capsys.readouterr().out == " ".join(["w1", "w2"] + [words[t] for t in new if t not in (1, 2)]) + "\n"
    # no <s>: an empty prompt starts from the end-of-text token </s> (config.json's)
    model, words = _word_level_model(tmp_path / "b", bos_id=None, eos_id=2)
    assert gen.run(_generate_ns("--model", str(tmp_path / "b"), "--temperature", "0", "--max-new-tokens", "3",
                                "--no-stop", "--device", "cpu")) == 0
    new = _greedy(model, [2], 3, eos=None)
    assert capsys.readouterr().out == " ".join(words[t] for t in new if t not in (1, 2)) + "\n"
    # the tokenizer takes its special tokens from config.json
    seen = []
    monkeypatch.setattr(gen, "stream", lambda m, tok, *a, **kw: seen.append(tok) or [])
    gen.run(_generate_ns("--model", str(tmp_path / "a")))
    assert (seen[0].byte_level, seen[0].bos_id, seen[0].eos_id) == (False, 1, 2)


# ---- main(): one line and an exit status for every kind of failure

def test_main_turns_failures_into_one_line(monkeypatch, capsys):
    from dsmoe import cli

    def raising(exc):
        def run(ns):
            raise exc
        return run

    info = cli._module("info")
    cases = [
        (CLIError("bad thing"), 2, "dsmoe: error: bad thing\n"),
        (OSError(28, "No space left on device", "/x/y"), 2,
         "dsmoe: error: /x/y: No space left on device (DSMOE_DEBUG=1 shows the traceback)\n"),
        (ValueError("first line\nsecond"), 2, "dsmoe: error: first line (DSMOE_DEBUG=1 shows the traceback)\n"),
        (RuntimeError(""), 2, "dsmoe: error: RuntimeError (DSMOE_DEBUG=1 shows the traceback)\n"),
        (json.JSONDecodeError("Expecting value", "x", 0), 2,
         "dsmoe: error: Expecting value: line 1 column 1 (char 0) (DSMOE_DEBUG=1 shows the traceback)\n"),
        (TypeError("t"), 2, "dsmoe: error: t (DSMOE_DEBUG=1 shows the traceback)\n"),
        (KeyboardInterrupt(), 130, "\ndsmoe: interrupted\n"),
        (SystemExit(3), 3, ""),
        (SystemExit(None), 0, ""),
        (SystemExit("why"), 2, "dsmoe: error: why\n"),
    ]
    monkeypatch.delenv("DSMOE_DEBUG", raising=False)
    for exc, code, err in cases:
        monkeypatch.setattr(info, "run", raising(exc))
        assert main(["info"]) == code, exc
        assert capsys.readouterr().err == err
    monkeypatch.setattr(info, "run", lambda ns: None)
    assert main(["info"]) == 0
    monkeypatch.setattr(info, "run", lambda ns: 5)
    assert main(["info"]) == 5


def test_debug_shows_the_traceback(monkeypatch):
    from dsmoe import cli

    info = cli._module("info")
    for value in ("1", "yes"):
        monkeypatch.setenv("DSMOE_DEBUG", value)
        for exc in (CLIError("c"), ValueError("v")):
            monkeypatch.setattr(info, "run", lambda ns, exc=exc: (_ for _ in ()).throw(exc))
            with pytest.raises(type(exc)):
                main(["info"])
    monkeypatch.setenv("DSMOE_DEBUG", "0")
    monkeypatch.setattr(info, "run", lambda ns: (_ for _ in ()).throw(CLIError("c")))
    assert main(["info"]) == 2


def test_no_command_prints_help_and_usage_errors_are_one_line(capsys):
    assert main([]) == 2
    assert "usage: dsmoe" in capsys.readouterr().out
    assert main(["--version"]) == 0
    import dsmoe

    assert capsys.readouterr().out == f"dsmoe {dsmoe.__version__}\n"
    assert main(["generate", "--model", "m", "--top-k", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "dsmoe: error: generate: argument --top-k: invalid int value: 'x'"
    assert main(["nonsense"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("dsmoe: error: argument COMMAND: invalid choice: 'nonsense'")
    # the usage goes with the error, to stderr: stdout may be a pipe of generated text
    assert main(["generate", "--model", "m", "--top-k", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: dsmoe generate ")


def test_errors_are_flushed_at_once(monkeypatch):
    class Stderr(io.StringIO):
        flushes = 0

        def flush(self):
            Stderr.flushes += 1

    monkeypatch.setattr("sys.stderr", Stderr())
    assert main(["train", "--lr", "nan", "--out", "x"]) == 2
    assert Stderr.flushes >= 1 and "dsmoe: error: --lr" in sys.stderr.getvalue()


def test_help_describes_every_command(capsys):
    from dsmoe import cli

    assert main(["--help"]) == 0
    raw = capsys.readouterr().out
    assert "DeepSeekMoE on fast fine-grained MoE operators." in raw.splitlines()
    text = " ".join(raw.split())  # argparse wraps lines at the terminal's width
    assert "DeepSeekMoE on fast fine-grained MoE operators." in text and "--version print the version and exit" in text
    for name, (help_text, _) in cli.COMMANDS.items():
        assert f"{name} {help_text}" in text
    assert main(["info", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: dsmoe info ") and cli.COMMANDS["info"][0] in text


def test_only_the_named_command_is_imported(monkeypatch):
    from dsmoe import cli

    loaded = []
    real = cli._module
    monkeypatch.setattr(cli, "_module", lambda name: (loaded.append(name), real(name))[1])
    cli.build_parser(only="info")
    assert loaded == ["info"]
    loaded.clear()
    assert main(["info"]) == 0  # parses with the info command's options alone, then runs it
    assert set(loaded) == {"info"}
    loaded.clear()
    cli.build_parser()
    assert loaded == list(cli.COMMANDS)
    assert cli._command_in(["--version", "train", "--out", "x"]) == "train"
    assert cli._command_in(["-h"]) == "" and cli._command_in([]) == ""
