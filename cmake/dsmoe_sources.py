"""Reads csrc/sources.txt, the one list of compiled sources (shared by setup.py, CMake and tests)."""
from __future__ import annotations

from pathlib import Path

KINDS = ("ops", "cuda", "python", "simt")


def read_sources(root: str | Path) -> dict[str, list[str]]:
    """Return {kind: [paths relative to root]} for every kind in KINDS."""
    root = Path(root)
    sources: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for number, line in enumerate((root / "csrc" / "sources.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in KINDS:
            raise ValueError(f"csrc/sources.txt:{number}: expected '<{'|'.join(KINDS)}> <path>', got {line!r}")
        if not (root / parts[1]).is_file():
            raise ValueError(f"csrc/sources.txt:{number}: {parts[1]} does not exist")
        sources[parts[0]].append(parts[1])
    return sources
