"""Runs and checkpoints through the command line, as a user types it: every run gets a
directory of its own, a checkpoint knows its run and its parent, resuming never writes into a
checkpoint nor mixes runs or branches, --overwrite leaves nothing of the run it replaces; bad
values are refused in one line before any work; the set-up's promises (fast --help, one
parameter count)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.cli import common, main
from dsmoe.cli import train as train_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BASE = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--eval-batches", "1",
        "--no-progress", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def six(tmp_path_factory, corpus) -> Path:
    """A 6-step run with checkpoints at steps 2, 4 and 6 (never modified by the tests)."""
    out = tmp_path_factory.mktemp("six") / "run"
    assert main(["train", *BASE, "--data", str(corpus), "--out", str(out), "--steps", "6", "--save-every", "2"]) == 0
    return out


def _losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {(r["step"], r["split"]): r["loss"] for r in rows}


def _state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("dsmoe: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))


# ------------------------------------------------------------------- identity and lineage


def test_checkpoints_record_their_run_and_parent(six):
    run_id = json.loads((six / "run.json").read_text())["run_id"]
    s2, s4, s6 = (_state(six / "checkpoints" / f"step-00000{s}") for s in (2, 4, 6))
    assert s2["run_id"] == s4["run_id"] == s6["run_id"] == run_id
    assert s2["parent"] is None  # the run started from scratch
    assert s4["parent"]["checkpoint_id"] == s2["checkpoint_id"] and s4["parent"]["step"] == 2
    assert s6["parent"]["checkpoint_id"] == s4["checkpoint_id"]
    assert len({s2["checkpoint_id"], s4["checkpoint_id"], s6["checkpoint_id"]}) == 3


# 1. a checkpoint outside a run's checkpoints/ (a copy) is never written into
def test_resuming_a_copied_checkpoint_starts_a_new_run_and_leaves_it_alone(six, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "saved" / "my-checkpoint"
    shutil.copytree(six / "checkpoints" / "step-000002", copy)
    before = _digest(copy)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(copy), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "into this new run directory (the checkpoint is left as it is)" in out
    assert _digest(copy) == before
    (new,) = (tmp_path / "runs").iterdir()
    assert _losses(new) == {k: v for k, v in _losses(six).items() if k[0] > 2}  # continued exactly
    assert _state(new / "checkpoints" / "step-000006")["parent"]["step"] == 4
    branched = json.loads((new / "run.json").read_text())["branched_from"]
    assert branched["checkpoint_id"] == _state(copy)["checkpoint_id"] and branched["step"] == 2
    # again: the copy still holds step 2 and resumes the same way, into yet another run
    assert main(["train", "--resume", str(copy), "--no-progress"]) == 0
    assert _digest(copy) == before and len(list((tmp_path / "runs").iterdir())) == 2
    code = main(["train", "--resume", str(copy), "--out", str(copy / "inside")])
    _one_line_error(capsys, code, "inside the checkpoint", "never written into")
    assert _digest(copy) == before


# 2. --overwrite leaves nothing of the run it replaces
def test_overwrite_removes_the_replaced_run_and_resume_takes_the_new_one(six, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(six, run)
    (run / "notes.txt").write_text("mine")
    small = tmp_path / "other.json"
    cfg = json.loads((six / "config.json").read_text())
    small.write_text(json.dumps({**cfg, "hidden_size": 16, "intermediate_size": 32, "moe_intermediate_size": 8}))
    assert main(["train", *[a for a in BASE if a not in ("--preset", "tiny")], "--config", str(small),
                 "--data", str(corpus), "--out", str(run), "--overwrite", "--steps", "3", "--save-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "--overwrite: removed" in out and "checkpoints/" in out
    assert _steps(run) == [2, 3] and (run / "notes.txt").read_text() == "mine"
    assert [k[0] for k in _losses(run) if k[1] == "train"] == [1, 2, 3]  # no rows of the old run
    assert json.loads((run / "config.json").read_text())["hidden_size"] == 16
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress"]) == 0
    assert f"resuming from {run / 'checkpoints' / 'step-000003'}" in capsys.readouterr().out


def test_resume_in_place_refuses_a_checkpoint_of_another_run_or_architecture(six, corpus, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", *BASE, "--data", str(corpus), "--out", str(other), "--steps", "2", "--seed", "1"]) == 0
    capsys.readouterr()
    stray = other / "checkpoints" / "step-000004"
    shutil.copytree(six / "checkpoints" / "step-000004", stray)
    log_before, model_before = (other / "log.jsonl").read_text(), _digest(other)["model.safetensors"]
    code = main(["train", "--resume", str(other), "--steps", "8"])
    mine, theirs = json.loads((other / "run.json").read_text())["run_id"], _state(stray)["run_id"]
    _one_line_error(capsys, code, str(stray), theirs, mine, "--out")
    # a run of an older dsmoe (no run ids): the architecture still has to match
    for p in (other / "run.json", *other.rglob("trainer_state.json")):
        if p.name == "run.json":
            p.unlink()
        else:
            state = json.loads(p.read_text())
            state.pop("run_id", None)
            p.write_text(json.dumps(state))
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    code = main(["train", "--resume", str(other), "--steps", "8"])
    _one_line_error(capsys, code, "another architecture", "hidden_size")
    assert _steps(other) == [2, 4] and not list((other / "checkpoints").glob("abandoned-*"))  # nothing moved
    assert (other / "log.jsonl").read_text() == log_before and _digest(other)["model.safetensors"] == model_before


# 3. resuming an earlier checkpoint retires the abandoned branch's later ones
def test_resuming_an_earlier_checkpoint_moves_the_abandoned_branch_aside(six, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(six, run)
    old4 = _digest(run / "checkpoints" / "step-000004")
    original = train_mod.Trainer.train_step

    def interrupt_at_step_3(self, step):
        result = original(self, step)
        if step == 2:
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train_mod.Trainer, "train_step", interrupt_at_step_3)
    assert main(["train", "--resume", str(run / "checkpoints" / "step-000002"), "--no-progress"]) == 130
    out = capsys.readouterr().out
    assert "later checkpoints of the abandoned branch" in out
    (abandoned,) = (run / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == ["final", "step-000004", "step-000006"]
    assert _digest(abandoned / "step-000004") == old4  # moved, not deleted
    assert (abandoned / "final" / "model.safetensors").is_file() and not (run / "model.safetensors").exists()
    assert _steps(run) == [2, 3]
    monkeypatch.setattr(train_mod.Trainer, "train_step", original)
    # resuming the run now continues the new branch (step 3), not the abandoned step 6
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert f"resuming from {run / 'checkpoints' / 'step-000003'} at step 3" in capsys.readouterr().out
    assert _losses(run) == _losses(six)  # the same curve as the uninterrupted run
    assert _state(run / "checkpoints" / "step-000004")["parent"]["step"] == 3


# 4. two runs started in the same second never share a directory
def test_runs_started_in_the_same_second_get_directories_of_their_own(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common.time, "strftime", lambda fmt, *a: "20260101-000000")
    for seed in ("1", "2"):
        assert main(["train", *BASE, "--data", str(corpus), "--steps", "2", "--seed", seed]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == ["train-20260101-000000", "train-20260101-000000-2"]
    ids = {json.loads((p / "run.json").read_text())["run_id"] for p in runs}
    assert len(ids) == 2
    for p, seed in zip(runs, (1, 2)):
        assert json.loads((p / "train_args.json").read_text())["seed"] == seed
        assert [k[0] for k in _losses(p) if k[1] == "train"] == [1, 2]


def test_two_processes_with_the_same_out_never_mix(corpus, tmp_path):
    """Started together into one --out: one trains, the other is refused in one line."""
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "dsmoe", "train", *BASE, "--data", str(corpus), "--out", str(out), "--steps", "30"]
    procs = [subprocess.Popen(cmd + ["--seed", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    refused = next(r for r in results if r[0] == 2)[2].strip().splitlines()
    assert len(refused) == 1 and ("in use by another dsmoe process" in refused[0] or "already exists" in refused[0])
    winner = next(i for i, r in enumerate(results) if r[0] == 0)
    assert json.loads((out / "train_args.json").read_text())["seed"] == winner
    assert [k[0] for k in _losses(out) if k[1] == "train"] == list(range(1, 31))


def test_a_run_in_progress_cannot_be_resumed_or_overwritten_meanwhile(six, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(six, run)
    held = common.claim_run_dir(run, "train", existing=True)  # as a training process holds it
    try:
        before = _digest(run)
        code = main(["train", "--resume", str(run), "--steps", "8"])
        _one_line_error(capsys, code, str(run), "in use by another dsmoe process", f"pid {os.getpid()}")
        code = main(["train", *BASE, "--data", str(corpus), "--out", str(run), "--overwrite", "--steps", "2"])
        _one_line_error(capsys, code, "in use by another dsmoe process")
        assert _digest(run) == before
    finally:
        held.release()
    assert main(["train", "--resume", str(run), "--steps", "8", "--no-progress"]) == 0  # free again


def test_keep_last_keeps_the_latest_checkpoints(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *BASE, "--data", str(corpus), "--out", str(run), "--steps", "8", "--save-every", "2",
                 "--keep-last", "2"]) == 0
    assert _steps(run) == [6, 8]
    _one_line_error(capsys, main(["train", *BASE, "--keep-last", "0", "--out", str(tmp_path / "x")]), "--keep-last")


# 7. expert analysis of folders with the same name
def test_experts_labels_of_same_named_folders(six, corpus, tmp_path, capsys):
    for sub in ("a", "b"):
        shutil.copytree(six, tmp_path / "x" / sub / "model", ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "ex"
    code = main(["experts", "--model", str(tmp_path / "x/a/model"), str(tmp_path / "x/b/model"), "--data", str(corpus),
                 "--tokens", "256", "--seq-len", "32", "--ratios", "0", "0.125", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert set(json.loads((out / "experts.json").read_text())) == {"a_model", "b_model"}
    assert (out / "load_a_model.png").is_file() and (out / "load_b_model.csv").is_file()
    from dsmoe.cli.experts import _label

    assert _label(["p/m", "p/m", "q/m"]) == ["p_m", "p_m_2", "q_m"]
    assert _label(["runs/deepseekmoe", "runs/gshard"]) == ["deepseekmoe", "gshard"]


# ------------------------------------------------------------------- 8. bad values, refused first


@pytest.mark.parametrize("argv,needles", [
    (["generate", "--prompt", "def \udcff", "--model", "MODEL"], ["--prompt must be UTF-8", "0xff", "character 4"]),
    (["generate", "--temperature", "nan", "--model", "MODEL"], ["--temperature", "finite", "nan"]),
    (["generate", "--temperature", "inf", "--model", "MODEL"], ["--temperature", "inf"]),
    (["generate", "--top-p", "nan", "--model", "MODEL"], ["--top-p", "(0, 1]"]),
    (["generate", "--seed", str(2**70), "--model", "MODEL"], ["--seed", "2**63 - 1", str(2**70)]),
    (["generate", "--seed", "-1", "--model", "MODEL"], ["--seed", "-1"]),
    (["train", "--sample-prompt", "\udce9t\udce9", "--out", "OUT"], ["--sample-prompt must be UTF-8", "0xe9"]),
    (["train", "--seed", str(2**64), "--out", "OUT"], ["--seed", "2**63 - 1"]),
    (["train", "--lr", "inf", "--out", "OUT"], ["--lr", "finite", "inf"]),
    (["train", "--grad-clip", "nan", "--out", "OUT"], ["--grad-clip", "nan"]),
    (["train", "--weight-decay=-inf", "--out", "OUT"], ["--weight-decay", "-inf"]),
    (["train", "--config", "CONFIG", "--out", "OUT"], ["aux_loss_alpha", "finite", "inf"]),
    (["compare", "--seed", str(2**70), "--out", "OUT"], ["--seed"]),
    (["compare", "--lr", "nan", "--out", "OUT"], ["--lr", "nan"]),
    (["bench", "--seed", str(2**70)], ["--seed"]),
    (["experts", "--model", "MODEL", "--ratios", "nan", "--out", "OUT"], ["--ratios", "nan"]),
])
def test_bad_values_are_refused_before_any_work(argv, needles, six, tmp_path, capsys):
    cfg = json.loads((six / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "aux_loss_alpha": float("inf")}))  # JSON Infinity
    subst = {"MODEL": str(six), "OUT": str(tmp_path / "out"), "CONFIG": str(tmp_path / "config.json")}
    code = main([subst.get(a, a) for a in argv])
    _one_line_error(capsys, code, *needles)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_non_utf8_prompt_from_a_real_command_line(six, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "dsmoe", "generate", "--model", str(six), "--prompt", b"caf\xe9"],
                       capture_output=True, env=env, timeout=300)
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines() == [
        "dsmoe: error: --prompt must be UTF-8 text; it has byte 0xe9 at character 3"]


# ------------------------------------------------------------------- 10. set-up


def test_help_imports_no_torch():
    """`dsmoe --help` answers without importing torch (seconds on a busy machine)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "dsmoe", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "generate" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "dsmoe.cli" in imported and "torch" not in imported and "numpy" not in imported


def test_one_parameter_count_for_the_default_model(corpus, tmp_path, capsys):
    assert main(["info", "--presets"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("small "))
    params, activated = row.split()[-2:]
    assert main(["train", "--data", str(corpus), "--steps", "1", "--batch-size", "1", "--seq-len", "8",
                 "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    assert f"{params} parameters, {activated} activated per token" in capsys.readouterr().out
    root = Path(__file__).resolve().parents[1]
    for doc in (root / "README.md", root / "docs" / "cli.md"):
        assert f"{params} parameters" in doc.read_text().replace("\n", " "), doc
