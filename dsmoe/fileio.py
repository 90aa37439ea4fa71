"""Durable file writes shared by the library and the command line: a file or folder is published
by a rename only after its bytes are on disk (fsync), and the rename itself is made durable by an
fsync of the folder. Nothing here imports torch."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Makes a rename or a new file in ``path`` durable (a no-op where directories cannot be
    opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsyncs every file under ``path`` and the folders themselves (before a rename publishes
    them), whoever wrote them."""
    for p in sorted(Path(path).rglob("*"), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes ``path`` as a whole or not at all: a temporary file beside it, fsync, rename,
    fsync of the folder. A failure removes the temporary file."""
    import uuid

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
