"""The library's tokenizer API: dsmoe.load_tokenizer(dir) reads a checkpoint directory's
tokenizer (the byte-level one dsmoe trains with, or the checkpoint's own tokenizer.json)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import dsmoe
from dsmoe.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, HFTokenizer, TokenizerError


def test_load_tokenizer_reads_vocab_and_specials_from_config(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|eos|>"
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": BYTE_VOCAB_SIZE}))
    tok = dsmoe.load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode("héllo")) == "héllo"


def test_load_tokenizer_foreign_tokenizer_json(tmp_path):
    word_level_json(tmp_path / "tokenizer.json", specials=())
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8, "bos_token_id": None, "eos_token_id": 3}))
    tok = dsmoe.load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 3 and tok.encode("hello world") == [1, 2]


def test_load_tokenizer_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        dsmoe.load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="pass vocab_size"):
        dsmoe.load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        dsmoe.load_tokenizer(tmp_path)


# ---------------------------------------------------------------- each piece, exactly


def word_level_json(path, specials=("</s>",)):
    """A tiny non-byte tokenizer.json (whitespace words; decode joins them with spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(list(specials))
    t.save(str(path))
    return path


def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.byte_level) == (259, 256, 257, 258, True)
    assert tok.encode("hé€") == [104, 195, 169, 226, 130, 172]
    # specials and out-of-range ids are dropped; broken UTF-8 becomes U+FFFD; numpy ints work
    assert tok.decode([256, 104, 257, 258, 259, -1, 105]) == "hi"
    assert tok.decode([104, 195, 105]) == "h\ufffdi"
    assert tok.decode(np.array([0, 255, 104], dtype=np.int64)) == "\x00\ufffdh"
    ids = tok.encode_bytes("aé".encode())
    assert ids.dtype == np.int32 and ids.tolist() == [97, 195, 169]
    assert tok.encode_bytes(b"").tolist() == []


def test_byte_stream_decoder_holds_back_incomplete_characters():
    tok = ByteTokenizer()
    stream = tok.stream_decoder(prefix=[1, 2, 3])  # the byte stream needs no prefix
    assert [stream.push(i) for i in tok.encode("hé€") + [257]] == ["h", "", "é", "", "", "€", ""]
    assert stream.flush() == ""
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in [104, 226, 130]] == ["h", "", ""]
    assert stream.flush() == "\ufffd"  # an unfinished character at the end is shown as such
    # bytes 0 and 255 are bytes; 256 is not
    stream = tok.stream_decoder()
    assert stream.push(0) == "\x00" and stream.push(256) == "" and stream.push(255) == "\ufffd"
    from dsmoe.tokenizer import StreamDecoder

    assert StreamDecoder().flush() == ""  # the interface's default: nothing held back


def test_byte_tokenizer_as_tokenizers_json_and_saved(tmp_path):
    tok = ByteTokenizer()
    fast = tok.to_tokenizers()
    probe = "def f(x):\n\t return 'é€' \x00  two  spaces"
    assert fast.encode(probe, add_special_tokens=False).ids == tok.encode(probe)
    assert fast.decode(tok.encode(probe)) == probe
    assert [fast.token_to_id(s) for s in ("<|bos|>", "<|eos|>", "<|pad|>")] == [256, 257, 258]
    assert fast.get_vocab_size() == BYTE_VOCAB_SIZE
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8")) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
    }
    assert (tmp_path / "tokenizer_config.json").read_text().endswith("}\n")
    saved = HFTokenizer(tmp_path / "tokenizer.json")
    assert saved.encode(probe) == tok.encode(probe) and saved.decode(tok.encode(probe) + [257]) == probe


def test_hf_tokenizer_reads_encodes_decodes(tmp_path):
    tok = HFTokenizer(word_level_json(tmp_path / "tokenizer.json"), bos_id=5, eos_id=3)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.byte_level) == (4, 5, 3, None, False)
    assert tok.encode("hello world </s>") == [1, 2, 3]  # specials in the text are not added ones
    assert tok.decode(np.array([1, 3, 2])) == "hello world"  # specials skipped
    ids = tok.encode_bytes(b"world hello \xff")
    assert ids.dtype == np.int32 and ids.tolist() == [2, 1, 0]  # a broken byte becomes U+FFFD, unknown
    assert HFTokenizer(tmp_path / "tokenizer.json").bos_id is None


def test_hf_tokenizer_unreadable_file_names_it(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ not json")
    with pytest.raises(TokenizerError, match=f"^cannot read tokenizer {bad}: ") as info:
        HFTokenizer(bad)
    assert "\n" not in str(info.value)  # the first line of the package's message only
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_hf_stream_decoder_keeps_word_boundaries_and_waits_for_characters(tmp_path):
    words = HFTokenizer(word_level_json(tmp_path / "words.json"))
    stream = words.stream_decoder(prefix=[1])  # "hello" was the prompt
    assert stream.push(2) == " world"  # the space a single decode puts between them
    assert stream.push(3) == "" and stream.flush() == ""
    assert words.stream_decoder().push(1) == "hello"  # no prefix: from the start
    ByteTokenizer().to_tokenizers().save(str(tmp_path / "bytes.json"))
    byte_level = HFTokenizer(tmp_path / "bytes.json")
    ids = ByteTokenizer().encode("hé€")
    stream = byte_level.stream_decoder(prefix=ByteTokenizer().encode("a "))
    assert [stream.push(i) for i in ids] == ["h", "", "é", "", "", "€"] and stream.flush() == ""
    stream = byte_level.stream_decoder()
    assert [stream.push(i) for i in ids[:4]] == ["h", "", "é", ""]
    assert stream.flush() == "\ufffd" and stream.flush() == ""  # flushed text is not emitted twice


def test_load_tokenizer_choices_and_messages(tmp_path):
    from dsmoe.tokenizer import _is_byte_tokenizer_json

    byte_dir = tmp_path / "bytes"
    byte_dir.mkdir()
    ByteTokenizer().save(byte_dir)
    assert _is_byte_tokenizer_json(byte_dir / "tokenizer.json")
    # a byte tokenizer.json gives the native byte tokenizer whatever the config says
    assert isinstance(dsmoe.load_tokenizer(byte_dir, vocab_size=100000), ByteTokenizer)
    (tmp_path / "words").mkdir()
    words = word_level_json(tmp_path / "words" / "tokenizer.json")
    assert not _is_byte_tokenizer_json(words) and not _is_byte_tokenizer_json(tmp_path / "missing.json")
    # explicit arguments: no config.json needed, ids as given
    tok = dsmoe.load_tokenizer(str(words.parent), vocab_size=4, bos_id=1, eos_id=2)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (1, 2)
    with pytest.raises(TokenizerError, match=f"^{words} has 4 tokens but the model's vocab_size is 3$"):
        dsmoe.load_tokenizer(words.parent, vocab_size=3)
    # config.json's ids unless given
    (words.parent / "config.json").write_text(json.dumps({"vocab_size": 4, "bos_token_id": 1, "eos_token_id": 3}))
    tok = dsmoe.load_tokenizer(words.parent)
    assert (tok.bos_id, tok.eos_id) == (1, 3)
    assert dsmoe.load_tokenizer(words.parent, eos_id=2).eos_id == 2
    assert dsmoe.load_tokenizer(words.parent, bos_id=2).bos_id == 2
    # no tokenizer.json: bytes for a vocabulary of 256..323 ids, refused outside it
    empty = tmp_path / "empty"
    empty.mkdir()
    for size in (256, BYTE_VOCAB_SIZE, BYTE_VOCAB_SIZE + 64):
        assert isinstance(dsmoe.load_tokenizer(empty, vocab_size=size), ByteTokenizer)
    for size in (255, BYTE_VOCAB_SIZE + 65):
        with pytest.raises(TokenizerError, match=f"^{empty} has no tokenizer.json and its vocab_size {size} is not byte-level$"):
            dsmoe.load_tokenizer(empty, vocab_size=size)
    # a config.json without a usable vocab_size
    for text in ("{ broken", json.dumps({"hidden_size": 8}), json.dumps({"vocab_size": None}), json.dumps({"vocab_size": "x"})):
        (empty / "config.json").write_text(text)
        with pytest.raises(TokenizerError, match=r"^load_tokenizer: pass vocab_size, or a directory whose config.json has it \(") as info:
            dsmoe.load_tokenizer(empty)
        assert str(empty / "config.json") in str(info.value) and info.value.__suppress_context__
    with pytest.raises(FileNotFoundError, match=f"^load_tokenizer: {tmp_path / 'nope'} is not a directory$"):
        dsmoe.load_tokenizer(tmp_path / "nope")
    assert issubclass(TokenizerError, ValueError)


def test_byte_map_is_gpt2s_the_one_tokenizers_byte_level_uses():
    from tokenizers import pre_tokenizers

    from dsmoe.tokenizer import _bytes_to_unicode

    to_char = _bytes_to_unicode()
    assert sorted(to_char) == list(range(256))
    assert set(to_char.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    # printable bytes map to themselves; the others, in byte order, to U+0100 onwards
    assert (to_char[ord("!")], to_char[ord("~")], to_char[0xA1], to_char[0xAC], to_char[0xAE], to_char[0xFF]) == (
        "!", "~", "\xa1", "\xac", "\xae", "\xff"
    )
    assert (to_char[0], to_char[0x20], to_char[0x7F], to_char[0xA0], to_char[0xAD]) == (
        chr(256), chr(256 + 32), chr(256 + 33), chr(256 + 66), chr(256 + 67)
    )


def test_saved_tokenizer_config_is_indented_json(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert (tmp_path / "tokenizer_config.json").read_text(encoding="utf-8").startswith('{\n  "tokenizer_class": ')


def test_hf_tokenizer_unreadable_file_message_when_the_package_says_little(tmp_path, monkeypatch):
    import tokenizers

    class Refusing:
        @staticmethod
        def from_file(path):
            raise error

    monkeypatch.setattr(tokenizers, "Tokenizer", Refusing)
    path = tmp_path / "tokenizer.json"
    for error, said in ((Exception("first line\nsecond line"), "first line"), (RuntimeError(), "RuntimeError")):
        with pytest.raises(TokenizerError) as info:
            HFTokenizer(path)
        assert str(info.value) == f"cannot read tokenizer {path}: {said}"


def test_post_processors_add_nothing_and_do_not_hide_a_byte_tokenizer(tmp_path):
    from tokenizers import processors

    from dsmoe.tokenizer import _is_byte_tokenizer_json

    # a tokenizer.json whose post-processor adds a BOS: encode gives the text's ids only
    words = HFTokenizer(word_level_json(tmp_path / "words.json"))
    words.tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 3)])
    assert words.tok.encode("hello").ids == [3, 1] and words.encode("hello") == [1]
    assert words.encode_bytes(b"world").tolist() == [2]
    # the byte tokenizer with such a post-processor is still recognised
    fast = ByteTokenizer().to_tokenizers()
    fast.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 256)])
    fast.save(str(tmp_path / "tokenizer.json"))
    assert _is_byte_tokenizer_json(tmp_path / "tokenizer.json")


def test_a_byte_sized_vocabulary_with_the_byte_specials_is_not_enough(tmp_path):
    # 259 ids with <|bos|> <|eos|> <|pad|> at 256..258, but words, not bytes: not the byte tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dsmoe.tokenizer import _is_byte_tokenizer_json

    vocab = {f"w{i}": i for i in range(256)}
    vocab.update({"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258})
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])
    t.save(str(tmp_path / "tokenizer.json"))
    assert t.get_vocab_size() == BYTE_VOCAB_SIZE
    assert not _is_byte_tokenizer_json(tmp_path / "tokenizer.json")
    assert isinstance(dsmoe.load_tokenizer(tmp_path, vocab_size=BYTE_VOCAB_SIZE), HFTokenizer)


def test_byte_tokenizer_save_is_atomic(tmp_path, monkeypatch):
    import os

    ByteTokenizer().save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads(before["tokenizer.json"])["added_tokens"][0]["content"] == "<|bos|>"
    assert before["tokenizer.json"].startswith(b'{\n  "version": ')  # pretty-printed, as tokenizers saves it

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        ByteTokenizer().save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # whole, no temporaries
