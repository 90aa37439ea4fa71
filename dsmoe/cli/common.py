"""Pieces shared by the subcommands: the one-line error type, device choice, run directories,
CSV/JSON logs, progress output and matplotlib set-up."""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable

import torch


class CLIError(Exception):
    """An error the user can fix; main() prints it as one line ``dsmoe: error: ...``."""


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given (checked), else the GPU when there is one, else the CPU."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name}: only cpu and cuda are supported")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_run_dir(kind: str, root: str | Path = "runs") -> Path:
    """runs/<kind>-<date>-<time>, with a suffix when that name is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{kind}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_run_dir(path: str | Path, overwrite: bool, what: str = "run directory") -> Path:
    """Refuses an existing non-empty ``path`` unless ``overwrite`` (nothing is created yet, so a
    run that fails while starting leaves nothing behind)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{what} {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CLIError(
            f"{what} {path} already exists and is not empty; choose another --out, "
            "pass --overwrite to write into it, or --resume to continue it"
        )
    return path


def prepare_run_dir(path: str | Path, overwrite: bool, what: str = "run directory") -> Path:
    """Creates ``path`` after :func:`check_run_dir`; with ``overwrite`` an existing folder's
    known outputs are replaced, nothing else in it is deleted."""
    path = check_run_dir(path, overwrite, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create {what} {path}: {e.strerror or e}") from None
    return path


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise CLIError(f"{what}: {path} does not exist") from None
    except OSError as e:
        raise CLIError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"{what}: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise CLIError(f"{what}: {path} must hold a JSON object, got {type(obj).__name__}")
    return obj


class MetricsLog:
    """Rows of metrics written both as CSV (fixed columns) and JSON lines (the whole row).

    ``keep_until`` (on resume) drops the rows of steps after the checkpoint, so a resumed run's
    log reads like an uninterrupted one.
    """

    COLUMNS = ("step", "split", "loss", "aux_loss", "lr", "tokens", "tokens_per_s", "elapsed_s")

    def __init__(self, run_dir: Path, keep_until: int | None = None):
        self.csv_path = run_dir / "log.csv"
        self.json_path = run_dir / "log.jsonl"
        rows: list[dict] = []
        if keep_until is not None and self.json_path.is_file():
            for line in self.json_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("step", 0) <= keep_until:
                        rows.append(row)
        self.rows = rows
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        with open(self.json_path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def add(self, **row) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore").writerow(row)
        with open(self.json_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def use_agg():
    """matplotlib with the Agg backend (no display needed), imported lazily."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def format_table(headers: Iterable[str], rows: Iterable[Iterable]) -> str:
    """A plain-text table with right-aligned numbers."""
    headers = [str(h) for h in headers]
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        if not math.isfinite(c):
            return "-"
        if c == 0 or 1e-3 <= abs(c) < 1e5:
            return f"{c:.4f}" if abs(c) < 10 else f"{c:.1f}"
        return f"{c:.3e}"
    return str(c)


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
