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
from typing import TYPE_CHECKING, Iterable

from ..fileio import fsync_dir, fsync_tree, write_bytes_atomic  # noqa: F401  (the CLI uses them from here)

if TYPE_CHECKING:
    import torch


class CLIError(Exception):
    """An error the user can fix; main() prints it as one line ``dsmoe: error: ...``."""


def pick_device(name: str | None = None) -> "torch.device":
    """``name`` if given (checked), else the GPU when there is one, else the CPU."""
    import torch

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


def synchronize(device: "torch.device") -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_run_dir(path: str | Path, overwrite: bool, what: str = "run directory") -> Path:
    """Refuses an existing non-empty ``path`` unless ``overwrite``; creates nothing, so a command
    can check its output folder before any work and a failed start leaves nothing behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{what} {path} exists and is not a directory")
    if path.is_dir() and _has_content(path) and not overwrite:
        raise CLIError(
            f"{what} {path} already exists and is not empty; choose another --out, "
            "pass --overwrite to replace it, or --resume to continue it"
        )
    return path


LOCK_FILE = ".dsmoe.lock"


def _has_content(path: Path) -> bool:
    return any(p.name != LOCK_FILE for p in path.iterdir())


class RunDir:
    """An output directory this process owns: created atomically (``mkdir`` fails if it exists,
    so two commands started in the same second never share one) and locked (``flock``) until
    :meth:`release`, so a second process can neither write into it nor resume it meanwhile."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def claim_run_dir(path: str | Path | None, kind: str, overwrite: bool = False, outputs: Iterable[str] = (),
                  what: str = "run directory", existing: bool = False, root: str | Path = "runs") -> RunDir:
    """Creates and locks ``path`` (None: a new ``runs/<kind>-<date>-<time>[-N]``).

    An existing ``path`` must be empty, or with ``overwrite`` its ``outputs`` (names or glob
    patterns of what this command writes) are removed first, so nothing of the replaced run
    survives to be mixed with the new one; other files are left alone. ``existing`` (resuming
    in place) only locks the directory."""
    if path is None:
        parent = Path(root)
        _mkdir(parent, what, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1, 10_000):
            candidate = parent / (f"{kind}-{stamp}" if n == 1 else f"{kind}-{stamp}-{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise CLIError(f"cannot create {what} {candidate}: {e.strerror or e}") from None
            return RunDir(candidate, _lock(candidate, what))
        raise CLIError(f"cannot find a free {what} name under {parent}")
    path = Path(path)
    created = False
    if not existing:
        if path.exists() and not path.is_dir():
            raise CLIError(f"{what} {path} exists and is not a directory")
        try:
            path.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise CLIError(f"cannot create {what} {path}: {e.strerror or e}") from None
    claimed = RunDir(path, _lock(path, what))
    if not created and not existing and _has_content(path):  # checked under the lock: no race
        if not overwrite:
            claimed.release()
            check_run_dir(path, overwrite=False, what=what)  # raises the one-line refusal
        removed = remove_outputs(path, outputs)
        if removed:
            print(f"--overwrite: removed {', '.join(removed)} from {path}", flush=True)
    return claimed


def remove_outputs(path: Path, patterns: Iterable[str]) -> list[str]:
    """Deletes what matches ``patterns`` in ``path``; returns the names removed."""
    import shutil

    removed = []
    for pattern in patterns:
        for p in sorted(path.glob(pattern)):
            tree = p.is_dir() and not p.is_symlink()  # asked before removing: afterwards nothing is a dir
            if tree:
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name + ("/" if tree else ""))
    return removed


def _mkdir(path: Path, what: str, **kw) -> None:
    try:
        path.mkdir(**kw)
    except OSError as e:
        raise CLIError(f"cannot create {what} {path}: {e.strerror or e}") from None


def _lock(path: Path, what: str) -> int | None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the exclusive mkdir still keeps new runs apart
        return None
    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CLIError(f"cannot write into {what} {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CLIError(f"{what} {path} is in use by another dsmoe process (pid {holder}); "
                       "wait for it to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def write_json(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_text(option: str, value: str | None) -> str | None:
    """``value`` (a command-line string) if it is valid UTF-8 text. Python hands undecodable
    argv bytes over as lone surrogates; they would fail only when the text is encoded."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        shown = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise CLIError(f"{option} must be UTF-8 text; it has {shown} at character {e.start}") from None
    return value


MAX_SEED = 2**63 - 1


def check_seed(option: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise CLIError(f"{option} must be an integer from 0 to 2**63 - 1, got {value}")
    return value


def check_number(option: str, value: float, low: float = 0.0, low_open: bool = False,
                 high: float | None = None, high_open: bool = False) -> float:
    """A finite ``value`` in the given range, or a one-line error saying what is allowed."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'>' if low_open else '>='} {low:g}"
        allowed = f"a finite number {lo}" if high is None else \
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise CLIError(f"{option} must be {allowed}, got {value}")
    return value


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
        rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= keep_until] if keep_until is not None else []
        self.rows = rows
        import io

        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        # rewritten as a whole: a kill while starting leaves the previous log, never half of it
        write_bytes_atomic(self.csv_path, text.getvalue().encode())
        write_bytes_atomic(self.json_path, "".join(json.dumps(row) + "\n" for row in rows).encode())

    def add(self, **row) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore").writerow(row)
        with open(self.json_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``log.jsonl``; a last line cut short (the process was killed while appending
    it) is left out."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


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
