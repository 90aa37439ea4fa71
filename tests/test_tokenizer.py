"""The library's tokenizer API: dsmoe.load_tokenizer(dir) reads a checkpoint directory's
tokenizer (the byte-level one dsmoe trains with, or the checkpoint's own tokenizer.json)."""
from __future__ import annotations

import json

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
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
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
