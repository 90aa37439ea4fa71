"""Text data for the command line: the embedded default corpus (the Python standard library's
source files, present on every machine), text files and folders, byte-level tokenisation and the
``tokenizers``-package tokenizer of released checkpoints, and deterministic batches.

Batches are a pure function of (seed, step): resuming at step s draws exactly the batches an
uninterrupted run would have drawn, with no sampler state to save.
"""
from __future__ import annotations

import codecs
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .common import CLIError

# Byte-level vocabulary: ids 0..255 are bytes, then the special tokens.
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
BYTE_VOCAB_SIZE = 259

VAL_BUCKETS = 20  # one document in 20 (by a hash of its name) goes to validation: 5 %
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


# --------------------------------------------------------------------------- tokenizers


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
        self.to_tokenizers().save(str(Path(directory) / "tokenizer.json"))


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
            raise CLIError(f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
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


def load_tokenizer(model_dir: Path, vocab_size: int, bos_id=None, eos_id=None):
    """The tokenizer of a checkpoint directory: its tokenizer.json if it has one, else the byte
    tokenizer when the vocabulary is byte-sized."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        if _is_byte_tokenizer_json(path):
            return ByteTokenizer()
        tok = HFTokenizer(path, bos_id=bos_id, eos_id=eos_id)
        if tok.vocab_size > vocab_size:
            raise CLIError(
                f"{path} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}"
            )
        return tok
    if 256 <= vocab_size <= BYTE_VOCAB_SIZE + 64:
        return ByteTokenizer()
    raise CLIError(
        f"{model_dir} has no tokenizer.json and its vocab_size {vocab_size} is not byte-level"
    )


# --------------------------------------------------------------------------- corpora


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk_files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    files = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for p in entries:
            if p.name.startswith(".") or p.name in _SKIP_DIRS:
                continue
            if p.is_dir() and not p.is_symlink():
                stack.append(p)
            elif p.is_file() and (suffixes is None or p.suffix in suffixes):
                files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_val(name: str) -> bool:
    return zlib.crc32(name.encode("utf-8")) % VAL_BUCKETS == 0


@dataclass
class Document:
    name: str
    data: bytes


def iter_documents(data: str | None) -> tuple[str, list[Document]]:
    """(description, documents) of ``data``: None = the standard library's .py files; a file;
    or a folder (every non-hidden text file under it, binary files skipped)."""
    if data is None:
        root = stdlib_root()
        if not root.is_dir():
            raise CLIError(f"the default corpus needs the standard library sources, not found at {root}; pass --data")
        files = _walk_files(root, (".py",))
        desc = f"python stdlib sources ({root})"
    else:
        root = Path(data).expanduser()
        if not root.exists():
            raise CLIError(f"--data: {data} does not exist")
        if root.is_file():
            files = [root]
            root = root.parent
        elif root.is_dir():
            files = _walk_files(root, None)
        else:
            raise CLIError(f"--data: {data} is neither a file nor a folder")
        desc = str(data)
    docs = []
    for f in files:
        try:
            blob = f.read_bytes()
        except OSError as e:
            if data is not None and len(files) == 1:
                raise CLIError(f"--data: cannot read {f}: {e.strerror or e}") from None
            continue
        if b"\x00" in blob[:8192] or not blob:
            continue  # binary or empty
        docs.append(Document(f.relative_to(root).as_posix(), blob))
    if not docs:
        raise CLIError(f"--data: no text found in {data if data is not None else root}")
    return desc, docs


@dataclass
class TokenData:
    train: torch.Tensor  # 1-D token ids (int16 for small vocabularies, else int32)
    val: torch.Tensor
    description: str
    num_docs: int

    def summary(self) -> str:
        return (f"{self.description}: {self.num_docs} documents, "
                f"{len(self.train):,} train / {len(self.val):,} val tokens")


def split_documents(docs: list[Document]) -> tuple[list[bytes], list[bytes]]:
    """Deterministic train/val split: by a hash of the document name when there are enough
    documents, else the last 5 % of each document is validation."""
    if len(docs) >= 2 * VAL_BUCKETS:
        train = [d.data for d in docs if not _is_val(d.name)]
        val = [d.data for d in docs if _is_val(d.name)]
        if train and val:
            return train, val
    train, val = [], []
    for d in docs:
        cut = len(d.data) - max(1, len(d.data) // VAL_BUCKETS)
        train.append(d.data[:cut])
        val.append(d.data[cut:])
    return train, val


def tokenize_documents(blobs: list[bytes], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenates the documents' tokens, an end-of-text token after each (when the tokenizer
    has one)."""
    eos = getattr(tokenizer, "eos_id", None)
    parts, total = [], 0
    for blob in blobs:
        ids = tokenizer.encode_bytes(blob)
        parts.append(ids)
        total += len(ids)
        if eos is not None:
            parts.append(np.array([eos], dtype=np.int32))
            total += 1
        if max_tokens is not None and total >= max_tokens:
            break
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    dtype = np.int16 if tokenizer.vocab_size < 2**15 else np.int32
    return torch.from_numpy(ids.astype(dtype))


def load_token_data(data: str | None, tokenizer, max_tokens: int | None = None) -> TokenData:
    desc, docs = iter_documents(data)
    train, val = split_documents(docs)
    return TokenData(
        train=tokenize_documents(train, tokenizer, max_tokens),
        val=tokenize_documents(val, tokenizer, max_tokens),
        description=desc,
        num_docs=len(docs),
    )


# --------------------------------------------------------------------------- batches


def _check_len(tokens: torch.Tensor, seq_len: int, split: str) -> None:
    if len(tokens) < seq_len + 1:
        raise CLIError(
            f"the {split} split has {len(tokens)} tokens, fewer than --seq-len + 1 = {seq_len + 1}; "
            "use more data or a shorter --seq-len"
        )


def train_batch(tokens: torch.Tensor, step: int, seed: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for ``step``: inputs [B, L] and next-token targets [B, L] (int64)."""
    _check_len(tokens, seq_len, "train")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)
    return _windows(tokens, starts, seq_len)


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed windows spread evenly over the split (the same every evaluation)."""
    _check_len(tokens, seq_len, "validation")
    n = batch_size * num_batches
    starts = torch.linspace(0, len(tokens) - seq_len - 1, n).long()
    for i in range(num_batches):
        yield _windows(tokens, starts[i * batch_size:(i + 1) * batch_size], seq_len)


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    w = tokens[idx].long()
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()
