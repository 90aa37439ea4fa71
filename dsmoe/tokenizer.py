"""Tokenizers of dsmoe checkpoints: the byte-level one `dsmoe train` uses (UTF-8 bytes + three
special tokens, saved as a ``tokenizers`` tokenizer.json) and a checkpoint's own tokenizer.json
(released DeepSeekMoE checkpoints), read with the ``tokenizers`` package.

    tokenizer = dsmoe.load_tokenizer("path/to/checkpoint")
    ids = tokenizer.encode("def f(x):"); text = tokenizer.decode(ids)

With transformers installed, ``AutoTokenizer.from_pretrained(dir)`` reads the same tokenizer.json.
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .fileio import write_bytes_atomic


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (names the file and why)."""


# Byte-level vocabulary: ids 0..255 are bytes, then the special tokens.
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
BYTE_VOCAB_SIZE = 259



def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ByteTokenizer:
    """UTF-8 bytes are the tokens (ids 0..255); <|bos|>=256, <|eos|>=257, <|pad|>=258."""

    vocab_size = BYTE_VOCAB_SIZE
    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID
    byte_level = True

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def stream_decoder(self, prefix: Sequence[int] = ()) -> "StreamDecoder":
        return _ByteStream()

    def to_tokenizers(self):
        """The same tokenisation as a ``tokenizers.Tokenizer`` (saved as tokenizer.json beside
        trained checkpoints, so Hugging Face tooling reads them too)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        to_char = _bytes_to_unicode()
        tok = Tokenizer(models.BPE(vocab={to_char[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        return tok

    def save(self, directory: Path) -> None:
        """tokenizer.json, and tokenizer_config.json naming the special tokens, so that
        transformers' AutoTokenizer reads the directory as it is. Each file is written
        atomically (a previous one stays whole if writing fails)."""
        write_bytes_atomic(Path(directory) / "tokenizer.json", self.to_tokenizers().to_str(pretty=True).encode("utf-8"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[2],
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        }
        write_bytes_atomic(Path(directory) / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode("utf-8"))


class StreamDecoder:
    """Turns ids arriving one by one into text, holding back incomplete characters."""

    def push(self, token_id: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def flush(self) -> str:
        return ""


class _ByteStream(StreamDecoder):
    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if 0 <= token_id < 256:
            return self._dec.decode(bytes([token_id]))
        return ""

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class _DiffStream(StreamDecoder):
    """Decodes the whole id list and emits what is new; a trailing replacement character means
    a multi-token character is not complete yet, so it waits. The prompt's ids (``prefix``) are
    decoded with the rest, so word boundaries (leading spaces) come out as in one decode."""

    def __init__(self, tokenizer: "HFTokenizer", prefix: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = [int(i) for i in prefix]
        self.emitted = len(tokenizer.decode(self.ids)) if self.ids else 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


class HFTokenizer:
    """A checkpoint's tokenizer.json, read with the ``tokenizers`` package."""

    byte_level = False

    def __init__(self, path: Path, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises its own Exception type
            raise TokenizerError(f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.vocab_size = self.tok.get_vocab_size()
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.asarray(self.encode(data.decode("utf-8", errors="replace")), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream_decoder(self, prefix: Sequence[int] = ()) -> StreamDecoder:
        return _DiffStream(self, prefix)


def _is_byte_tokenizer_json(path: Path) -> bool:
    """True when tokenizer.json is the byte-level one `dsmoe train` writes (then the fast
    native byte tokenizer is used instead)."""
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    except Exception:
        return False
    probe = "def f(x):\n\t return 'é€' \x00"
    return (
        tok.get_vocab_size() == BYTE_VOCAB_SIZE
        and tok.encode(probe, add_special_tokens=False).ids == list(probe.encode("utf-8"))
        and [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [BOS_ID, EOS_ID, PAD_ID]
    )


def load_tokenizer(model_dir: Union[str, Path], vocab_size: Optional[int] = None, bos_id=None, eos_id=None):
    """The tokenizer of a checkpoint directory: its tokenizer.json if it has one, else the byte
    tokenizer when the vocabulary is byte-sized. ``vocab_size``, ``bos_id`` and ``eos_id``
    default to the directory's config.json."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"load_tokenizer: {model_dir} is not a directory")
    if vocab_size is None:
        config_path = model_dir / "config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            vocab_size = int(config["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"load_tokenizer: pass vocab_size, or a directory whose config.json has it ({config_path}: {e})") from None
        bos_id = config.get("bos_token_id") if bos_id is None else bos_id
        eos_id = config.get("eos_token_id") if eos_id is None else eos_id
    path = model_dir / "tokenizer.json"
    if path.is_file():
        if _is_byte_tokenizer_json(path):
            return ByteTokenizer()
        tok = HFTokenizer(path, bos_id=bos_id, eos_id=eos_id)
        if tok.vocab_size > vocab_size:
            raise TokenizerError(
                f"{path} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}"
            )
        return tok
    if 256 <= vocab_size <= BYTE_VOCAB_SIZE + 64:
        return ByteTokenizer()
    raise TokenizerError(
        f"{model_dir} has no tokenizer.json and its vocab_size {vocab_size} is not byte-level"
    )


__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_TOKENS", "BYTE_VOCAB_SIZE",
    "TokenizerError", "ByteTokenizer", "HFTokenizer", "StreamDecoder", "load_tokenizer",
]
