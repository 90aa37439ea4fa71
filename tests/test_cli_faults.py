"""`dsmoe train` under faults: kill -9 in the middle of every kind of save, a full disk while
saving, SIGTERM. After each, nothing the user had is lost or mixed: every checkpoint left is
complete, the previous one resumes, and the resumed run ends bit-identical to one never
disturbed."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsmoe.cli import checkpoint as ckpt_mod
from dsmoe.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BASE = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--eval-batches", "1",
        "--no-progress", "--sample-tokens", "0"]
TINY = [*BASE, "--steps", "4", "--save-every", "2"]
RUNNER = Path(__file__).with_name("fault_runner.py")
CKPT_FILES = {"config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "tokenizer.json",
              "tokenizer_config.json", "trainer_state.json"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    """The same run, never disturbed."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *TINY, "--data", str(corpus), "--out", str(out)]) == 0
    return out


def _losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {(r["step"], r["split"]): r["loss"] for r in rows}


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _run_cli(*argv: str, fault: str | None = None, cwd: Path | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if fault:
        env["DSMOE_TEST_FAULT"] = fault
    cmd = [sys.executable, str(RUNNER)] if fault else [sys.executable, "-m", "dsmoe"]
    return subprocess.Popen([*cmd, *argv], env=env, cwd=cwd, **popen)


def _complete_checkpoints(run: Path) -> list[int]:
    """Steps of the checkpoints in run/checkpoints; fails if anything there is partial."""
    steps = []
    for p in sorted((run / "checkpoints").iterdir()):
        assert p.name.startswith("step-") and "." not in p.name, f"left behind: {p.name}"
        assert {f.name for f in p.iterdir()} == CKPT_FILES, p
        load_file(str(p / "model.safetensors")), load_file(str(p / "optimizer.safetensors"))
        steps.append(int(p.name[5:]))
    return steps


def _error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("dsmoe: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# (fault, whether the checkpoint of step 4 is complete after the kill)
KILLS = [
    # (save_pretrained writes the weights in a staging folder beside its target: ".<target>.saving-*")
    ("half-write@*step-000004.tmp-*/model.safetensors", False),  # the weights, half written
    ("half-write@step-000004.tmp-*/optimizer.safetensors", False),
    ("half-write@step-000004.tmp-*/rng.safetensors", False),
    ("rename@step-000004.tmp-*/trainer_state.json.tmp-*", False),  # the JSON, before its rename
    ("rename@checkpoints/step-000004.tmp-*", False),              # all written, before the rename
    ("renamed@checkpoints/step-000004.tmp-*", True),              # right after it
    ("half-write@*.publish.tmp-*/model.safetensors", True),       # the run's final model
    ("rename@.publish.tmp-*/model.safetensors", True),
]


@pytest.mark.parametrize("fault,saved", KILLS, ids=[k[0].split("@")[0] + ":" + k[0].split("/")[-1] for k in KILLS])
def test_kill_9_during_a_save_loses_and_mixes_nothing(fault, saved, tmp_path, corpus, reference, capsys):
    run = tmp_path / "run"
    proc = _run_cli("train", *TINY, "--data", str(corpus), "--out", str(run), fault=fault,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    partial = [p for p in run.rglob("*") if ".tmp-" in p.name]
    assert partial or saved, "the fault should have struck in the middle of a save"
    assert not (run / "model.safetensors").exists()  # the final model never appears half-written
    if not saved:
        # step 2 survives; resuming the run cleans up and ends exactly like the undisturbed run
        assert main(["train", "--resume", str(run), "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "resuming from" in out and "step-000002" in out and "removed the unfinished" in out
        assert _complete_checkpoints(run) == [2, 4]
        assert _losses(run) == _losses(reference)
        assert _same_weights(run, reference) and _same_weights(run / "checkpoints" / "step-000004", reference)
    else:
        # the finished checkpoint holds the final weights; nothing half-written anywhere
        code = main(["train", "--resume", str(run), "--no-progress"])
        assert "nothing left to do" in _error_line(capsys, code)
        assert _same_weights(run / "checkpoints" / "step-000004", reference)
        assert main(["train", "--resume", str(run), "--steps", "5", "--no-progress"]) == 0
        capsys.readouterr()
        assert 4 in _complete_checkpoints(run) and 5 in _complete_checkpoints(run)
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("error", ["enospc", "safetensors"])
def test_disk_full_while_saving_is_one_line_and_keeps_the_last_checkpoint(error, tmp_path, corpus, reference,
                                                                          monkeypatch, capsys):
    from safetensors import SafetensorError

    original = ckpt_mod.save_file

    def full_disk(tensors, filename, metadata=None):
        if "step-000004" in str(filename) and filename.endswith("optimizer.safetensors"):
            with open(filename, "wb") as f:  # some bytes made it before the disk filled up
                f.write(b"\0" * 100)
            if error == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    run = tmp_path / "run"
    line = _error_line(capsys, main(["train", *TINY, "--data", str(corpus), "--out", str(run)]))
    assert "No space left on device" in line and "step-000004" in line and "step-000002 is intact" in line
    assert _complete_checkpoints(run) == [2]  # no partial step-000004(.tmp)
    monkeypatch.setattr(ckpt_mod, "save_file", original)  # space freed
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert _losses(run) == _losses(reference) and _same_weights(run, reference)


def test_disk_full_while_writing_the_final_model(tmp_path, corpus, reference, monkeypatch, capsys):
    import dsmoe.checkpoint as dc

    original = dc._fsync_write  # save_pretrained's fsynced writer

    def full_disk(path, data):
        if ".publish.tmp-" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return original(path, data)

    monkeypatch.setattr(dc, "_fsync_write", full_disk)
    run = tmp_path / "run"
    line = _error_line(capsys, main(["train", *TINY, "--data", str(corpus), "--out", str(run)]))
    assert "the final model" in line and "No space left on device" in line
    assert not (run / "model.safetensors").exists() and not list(run.glob(".publish.tmp-*"))
    assert _complete_checkpoints(run) == [2, 4]
    assert _same_weights(run / "checkpoints" / "step-000004", reference)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    proc = _run_cli("train", *BASE, "--data", str(corpus), "--out", str(run), "--steps", "100000", "--log-every", "1",
                    "--eval-every", "0", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # training has started
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM: finishing this step and saving a checkpoint" in err
    assert "interrupted at step" in out and "(SIGTERM); checkpoint saved to" in out
    steps = _complete_checkpoints(run)
    assert len(steps) == 1
    assert main(["train", "--resume", str(run), "--steps", str(steps[0] + 2), "--no-progress"]) == 0
    assert f"resuming from {run / 'checkpoints' / f'step-{steps[0]:06d}'} at step {steps[0]}" in capsys.readouterr().out
    assert _complete_checkpoints(run) == [steps[0], steps[0] + 2]
