"""dsmoe/cli/common.py in-process: device choice, run directories and their locks, the one-line
refusals in full, JSON/CSV logs and the plain-text table. The subcommand tests reach these only
through whole runs, where a changed message or a lost log line goes unseen."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.cli import common
from dsmoe.cli.common import CLIError

REPO = Path(__file__).resolve().parents[1]


# ---- devices

def test_pick_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.pick_device() == torch.device("cpu")
    assert common.pick_device("auto") == torch.device("cpu")
    assert common.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(CLIError) as e:
        common.pick_device("cuda")
    assert str(e.value) == "--device cuda: this torch sees no CUDA device"
    with pytest.raises(CLIError) as e:
        common.pick_device("meta")
    assert str(e.value) == "--device meta: only cpu and cuda are supported"
    with pytest.raises(CLIError) as e:
        common.pick_device("gpu0")
    assert str(e.value).startswith("--device: ") and "gpu0" in str(e.value)


def test_pick_device_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.pick_device() == torch.device("cuda")
    assert common.pick_device("auto") == torch.device("cuda")
    assert common.pick_device("cuda:1") == torch.device("cuda", 1)
    assert common.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(CLIError, match="only cpu and cuda"):
        common.pick_device("meta")


def test_synchronize_waits_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    common.synchronize(torch.device("cpu"))
    assert calls == []
    common.synchronize(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


# ---- run directories

def test_check_run_dir_messages(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(CLIError) as e:
        common.check_run_dir(afile, overwrite=False)
    assert str(e.value) == f"run directory {afile} exists and is not a directory"
    full = tmp_path / "d"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(CLIError) as e:
        common.check_run_dir(full, overwrite=False, what="output folder")
    assert str(e.value) == (f"output folder {full} already exists and is not empty; choose another --out, "
                            "pass --overwrite to replace it, or --resume to continue it")
    assert common.check_run_dir(full, overwrite=True) == full
    only_lock = tmp_path / "l"
    only_lock.mkdir()
    (only_lock / common.LOCK_FILE).write_text("1\n")
    assert common.check_run_dir(only_lock, overwrite=False) == only_lock  # a lock alone is not content


def test_release_twice_is_harmless(tmp_path):
    run = common.claim_run_dir(tmp_path / "r", "train")
    run.release()
    run.release()


def test_new_run_names_and_the_lock_file(tmp_path, monkeypatch):
    monkeypatch.setattr(common.time, "strftime", lambda fmt, *a: fmt)  # the format itself, to check it
    root = tmp_path / "deep" / "runs"  # parents created too
    first = common.claim_run_dir(None, "train", root=root)
    second = common.claim_run_dir(None, "train", root=root)
    assert first.path == root / "train-%Y%m%d-%H%M%S"
    assert second.path == root / "train-%Y%m%d-%H%M%S-2"
    lock = first.path / common.LOCK_FILE
    assert lock.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o644 & ~_umask()
    with pytest.raises(CLIError) as e:  # the new directory is held until released
        common.claim_run_dir(first.path, "train", existing=True)
    assert str(e.value) == (f"run directory {first.path} is in use by another dsmoe process (pid {os.getpid()}); "
                            "wait for it to finish or choose another --out")
    first.release()
    common.claim_run_dir(first.path, "train", existing=True).release()
    second.release()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_no_free_run_name_after_9999_tries(tmp_path, monkeypatch):
    monkeypatch.setattr(common.time, "strftime", lambda fmt, *a: "S")
    (tmp_path / "train-S").mkdir()
    for n in range(2, 10_000):
        (tmp_path / f"train-S-{n}").mkdir()
    with pytest.raises(CLIError) as e:
        common.claim_run_dir(None, "train", root=tmp_path, what="output folder")
    assert str(e.value) == f"cannot find a free output folder name under {tmp_path}"


def _mkdir_failing_for(monkeypatch, victim: Path):
    real = Path.mkdir

    def mkdir(self, *a, **kw):
        if self == victim:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_os_errors_become_one_line_refusals(tmp_path, monkeypatch):
    monkeypatch.setattr(common.time, "strftime", lambda fmt, *a: "S")
    _mkdir_failing_for(monkeypatch, tmp_path / "runs")
    with pytest.raises(CLIError) as e:
        common.claim_run_dir(None, "train", root=tmp_path / "runs", what="output folder")
    assert str(e.value) == f"cannot create output folder {tmp_path / 'runs'}: No space left on device"
    (tmp_path / "ok").mkdir()
    _mkdir_failing_for(monkeypatch, tmp_path / "ok" / "train-S")
    with pytest.raises(CLIError) as e:
        common.claim_run_dir(None, "train", root=tmp_path / "ok", what="output folder")
    assert str(e.value) == f"cannot create output folder {tmp_path / 'ok' / 'train-S'}: No space left on device"
    _mkdir_failing_for(monkeypatch, tmp_path / "given")
    with pytest.raises(CLIError) as e:
        common.claim_run_dir(tmp_path / "given", "train", what="output folder")
    assert str(e.value) == f"cannot create output folder {tmp_path / 'given'}: No space left on device"


def test_a_lock_that_cannot_be_written(tmp_path, monkeypatch):
    def no_open(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(common.time, "strftime", lambda fmt, *a: "S")
    monkeypatch.setattr(common.os, "open", no_open)
    with pytest.raises(CLIError) as e:
        common.claim_run_dir(None, "train", root=tmp_path, what="output folder")
    assert str(e.value) == f"cannot write into output folder {tmp_path / 'train-S'}: Read-only file system"


@pytest.mark.parametrize("content, shown", [(b"", "?"), (b"\xff\xfe7\n", "\ufffd\ufffd7")])
def test_the_holder_is_shown_whatever_its_lock_file_holds(tmp_path, content, shown):
    run = tmp_path / "r"
    run.mkdir()
    (run / common.LOCK_FILE).write_bytes(content)
    fd = os.open(run / common.LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: conflicts as another process would
    try:
        with pytest.raises(CLIError) as e:
            common.claim_run_dir(run, "train", existing=True)
        assert f"is in use by another dsmoe process (pid {shown});" in str(e.value)
    finally:
        os.close(fd)


def test_claiming_a_given_path(tmp_path, capsys):
    nested = tmp_path / "a" / "b"
    run = common.claim_run_dir(nested, "train")
    assert nested.is_dir() and run._fd is not None
    run.release()
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(CLIError) as e:
        common.claim_run_dir(afile, "train", what="output folder")
    assert str(e.value) == f"output folder {afile} exists and is not a directory"

    full = tmp_path / "full"
    (full / "checkpoints" / "step-1").mkdir(parents=True)
    (full / "log.csv").write_text("x")
    (full / "notes.txt").write_text("mine")
    with pytest.raises(CLIError) as e:
        common.claim_run_dir(full, "train", outputs=["log.csv"], what="output folder")
    assert str(e.value).startswith(f"output folder {full} already exists and is not empty; choose another --out")
    assert (full / "log.csv").exists()  # a refusal removes nothing
    # ... and releases its lock: the same process may claim it right away
    run = common.claim_run_dir(full, "train", overwrite=True, outputs=["log.*", "checkpoints"])
    out = capsys.readouterr().out
    assert out == f"--overwrite: removed log.csv, checkpoints/ from {full}\n"
    assert sorted(p.name for p in full.iterdir()) == [common.LOCK_FILE, "notes.txt"]
    run.release()


def test_the_overwrite_notice_is_flushed_before_a_hard_exit(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "log.csv").write_text("x")
    code = ("import os, sys; from dsmoe.cli import common; "
            "common.claim_run_dir(sys.argv[1], 'train', overwrite=True, outputs=['log.csv']); os._exit(0)")
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # a pipe buffers
                               "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"--overwrite: removed log.csv from {run}\n"


def test_remove_outputs_marks_directories_and_leaves_symlinked_trees(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x").write_text("x")
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events").write_text("e")
    (run / "a.json").write_text("{}")
    (run / "link").symlink_to(keep)
    assert common.remove_outputs(run, ["*.json", "tb", "link"]) == ["a.json", "tb/", "link"]
    assert list(run.iterdir()) == []
    assert (keep / "x").read_text() == "x"  # the link went, not what it points to


# ---- JSON, text, numbers

def test_write_json_layout(tmp_path):
    common.write_json(tmp_path / "a.json", {"b": 1, "a": [1]})
    assert (tmp_path / "a.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1\n  ]\n}\n'


def test_check_text_names_the_bad_character():
    assert common.check_text("--prompt", None) is None
    assert common.check_text("--prompt", "héllo") == "héllo"
    cases = {"ab\udc80": "byte 0x80 at character 2", "\udcff": "byte 0xff at character 0",
             "a\udc7f": "U+DC7F at character 1", "\udd00": "U+DD00 at character 0",
             "\ud800x": "U+D800 at character 0"}
    for text, where in cases.items():
        with pytest.raises(CLIError) as e:
            common.check_text("--prompt", text)
        assert str(e.value) == f"--prompt must be UTF-8 text; it has {where}"


def test_check_seed_bounds():
    assert common.check_seed("--seed", 0) == 0
    assert common.check_seed("--seed", 2**63 - 1) == 2**63 - 1
    for bad in (True, False, -1, 2**63, 1.0, "1"):
        with pytest.raises(CLIError) as e:
            common.check_seed("--seed", bad)
        assert str(e.value) == f"--seed must be an integer from 0 to 2**63 - 1, got {bad}"


def test_check_number_bounds_and_messages():
    def refused(value, **kw):
        with pytest.raises(CLIError) as e:
            common.check_number("--x", value, **kw)
        return str(e.value)

    assert common.check_number("--x", 0.0) == 0.0
    assert common.check_number("--x", 7) == 7
    assert refused(-0.5) == "--x must be a finite number >= 0, got -0.5"
    assert refused(0.0, low_open=True) == "--x must be a finite number > 0, got 0.0"
    assert common.check_number("--x", 1e-9, low_open=True) == 1e-9
    assert refused(float("inf")) == "--x must be a finite number >= 0, got inf"
    assert refused(float("nan")) == "--x must be a finite number >= 0, got nan"
    assert refused("1") == "--x must be a finite number >= 0, got 1"
    assert common.check_number("--x", 1.0, high=1.0) == 1.0
    assert refused(1.5, high=1.0) == "--x must be a number in [0, 1], got 1.5"
    assert refused(1.0, high=1.0, high_open=True) == "--x must be a number in [0, 1), got 1.0"
    assert common.check_number("--x", 0.999, high=1.0, high_open=True) == 0.999
    assert refused(0.0, low_open=True, high=2.5) == "--x must be a number in (0, 2.5], got 0.0"
    assert refused(3, low=1, low_open=True, high=2.5, high_open=True) == "--x must be a number in (1, 2.5), got 3"


def test_read_json_refusals(tmp_path):
    assert common.read_json(_write(tmp_path / "ok.json", '{"a": 1}'), "config") == {"a": 1}
    cases = [
        (tmp_path / "missing.json", f"config: {tmp_path / 'missing.json'} does not exist"),
        (tmp_path, f"config: cannot read {tmp_path}: Is a directory"),
        (_write(tmp_path / "bad.json", '{"a":\n'), f"config: {tmp_path / 'bad.json'} is not valid JSON "
                                                    "(Expecting value at line 2)"),
        (_write(tmp_path / "list.json", "[1]"), f"config: {tmp_path / 'list.json'} must hold a JSON object, got list"),
    ]
    for path, message in cases:
        with pytest.raises(CLIError) as e:
            common.read_json(path, "config")
        assert str(e.value) == message


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- metrics logs

def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_fresh_log_forgets_the_old_one(tmp_path):
    _jsonl(tmp_path / "log.jsonl", [{"step": 1, "loss": 2.0}])
    log = common.MetricsLog(tmp_path)
    assert log.rows == []
    assert (tmp_path / "log.jsonl").read_text() == ""
    assert (tmp_path / "log.csv").read_bytes() == (",".join(common.MetricsLog.COLUMNS) + "\r\n").encode()


def test_a_resumed_log_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    rows = [{"step": 1, "split": "train", "loss": 2.0, "extra": 1}, {"split": "eval", "loss": 3.0},
            {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    _jsonl(tmp_path / "log.jsonl", rows)
    log = common.MetricsLog(tmp_path, keep_until=1)
    assert log.rows == rows[:2]  # a row without a step counts as step 0
    log.add(step=2, split="train", loss=float("nan"), aux_loss=float("inf"), lr=0.5, other="ignored in the CSV")
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert strict == rows[:2] + [{"step": 2, "split": "train", "loss": None, "aux_loss": None, "lr": 0.5,
                                  "other": "ignored in the CSV"}]
    assert log.rows[-1]["loss"] is None
    csv_bytes = (tmp_path / "log.csv").read_bytes()
    assert csv_bytes == ("step,split,loss,aux_loss,lr,tokens,tokens_per_s,elapsed_s\r\n"
                         "1,train,2.0,,,,,\r\n,eval,3.0,,,,,\r\n2,train,,,0.5,,,\r\n").encode()
    assert common.MetricsLog(tmp_path, keep_until=0).rows == [rows[1]]


def test_read_metrics_skips_damaged_lines_only(tmp_path):
    assert common.read_metrics(tmp_path) == []
    (tmp_path / "log.jsonl").write_bytes(b'{"step": 1}\n{"st\xff\n[1]\n{"step": 2}\n{"step": 3, "lo')
    assert common.read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]


# ---- output

def test_use_agg_selects_agg():
    import matplotlib

    plt = common.use_agg()
    assert matplotlib.get_backend().lower() == "agg" and plt.__name__ == "matplotlib.pyplot"


def test_format_table_layout():
    table = common.format_table(["id", 2], [["a", 1.5], ["bbb", 12345.0], ["c", float("nan")]])
    assert table == ("id         2\n"
                     "---  -------\n"
                     "a     1.5000\n"
                     "bbb  12345.0\n"
                     "c          -")


@pytest.mark.parametrize("value, shown", [
    (float("nan"), "-"), (float("-inf"), "-"), (0.0, "0.0000"), (1e-3, "0.0010"), (9.99e-4, "9.990e-04"),
    (-0.5, "-0.5000"), (1.0, "1.0000"), (9.99, "9.9900"), (10.0, "10.0"), (99999.0, "99999.0"),
    (1e5, "1.000e+05"), (-2e6, "-2.000e+06"), (3, "3"), ("x", "x"),
])
def test_cell_format(value, shown):
    assert common._fmt(value) == shown


def test_stderr_is_tty_on_odd_streams(monkeypatch):
    monkeypatch.setattr(sys, "stderr", object())
    assert common.stderr_is_tty() is False

    class Closed:
        def isatty(self):
            raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(sys, "stderr", Closed())
    assert common.stderr_is_tty() is False

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert common.stderr_is_tty() is True
