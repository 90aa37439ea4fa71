"""Text data for the command line: the embedded default corpus (the Python standard library's
source files, present on every machine), text files and folders, byte-level tokenisation and the
``tokenizers``-package tokenizer of released checkpoints, and deterministic batches.

Batches are a pure function of (seed, step): resuming at step s draws exactly the batches an
uninterrupted run would have drawn, with no sampler state to save.
"""
from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..tokenizer import (  # noqa: F401  (the CLI's names; the tokenizers live in the library)
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    load_tokenizer,
)
from .common import CLIError

VAL_BUCKETS = 20  # one document in 20 (by a hash of its name) goes to validation: 5 %
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}

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
