"""`dsmoe train` on several processes: --nproc (torchrun underneath, gloo on CPU), the same loss
curve as one process, and a distributed checkpoint resumed by one process; bad set-ups refused
in one line before anything starts."""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsmoe.cli import main
from dsmoe.cli.train import add_arguments
from dsmoe.cli.distributed.options import argv_from_namespace
from dsmoe.distributed.checkpoint import is_dcp_checkpoint, load_model

ARGS = ["--preset", "tiny", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
        "--save-every", "3", "--sample-tokens", "0", "--log-every", "1", "--no-progress"]


def losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return {(r["split"], r["step"]): r["loss"] for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcli")
    rnd = random.Random(0)
    data = tmp / "data.txt"
    data.write_text("".join(rnd.choice("abcdefgh \n") for _ in range(100_000)))
    common = ARGS + ["--data", str(data)]
    assert main(["train", *common, "--out", str(tmp / "single")]) == 0
    assert main(["train", *common, "--out", str(tmp / "dist"), "--nproc", "2"]) == 0
    return tmp


def test_nproc_run_matches_single_process(runs):
    single, dist = losses(runs / "single"), losses(runs / "dist")
    assert set(single) == set(dist) and len(single) >= 8  # 6 train steps + 2 validations
    for key in single:
        assert dist[key] == pytest.approx(single[key], abs=2e-5), key
    ckpt = runs / "dist" / "checkpoints" / "step-000003"
    assert is_dcp_checkpoint(ckpt) and (ckpt / "trainer_state.json").is_file()
    # the final model is written in the Hugging Face layout, loadable by one process: the weights
    # of the last checkpoint, gathered
    from dsmoe import DeepSeekMoEForCausalLM

    exported = DeepSeekMoEForCausalLM.from_pretrained(runs / "dist").state_dict()
    final = load_model(runs / "dist" / "checkpoints" / "step-000006").state_dict()
    assert exported.keys() == final.keys()
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor), name


def test_distributed_checkpoint_resumes_in_one_process(runs):
    out = runs / "resumed"
    ckpt = runs / "dist" / "checkpoints" / "step-000003"
    assert main(["train", "--resume", str(ckpt), "--out", str(out), "--log-every", "1",
                 "--sample-tokens", "0", "--no-progress"]) == 0
    full, resumed = losses(runs / "dist"), losses(out)
    for step in (4, 5, 6):
        assert resumed[("train", step)] == pytest.approx(full[("train", step)], abs=2e-5), step
    final = load_model(runs / "dist" / "checkpoints" / "step-000006")
    from dsmoe import DeepSeekMoEForCausalLM

    again = DeepSeekMoEForCausalLM.from_pretrained(out)
    for (name, a), b in zip(final.state_dict().items(), again.state_dict().values()):
        assert (a - b).abs().max().item() < 1e-5, name


def test_ctrl_c_saves_a_checkpoint(runs):
    """Ctrl-C reaches the --nproc launcher (the processes run in their own session); they finish
    the step together and save, and the launcher exits 130."""
    out, log = runs / "interrupted", runs / "interrupted.log"
    cmd = [sys.executable, "-m", "dsmoe", "train", *ARGS, "--steps", "1000", "--eval-every", "0", "--save-every", "0",
           "--data", str(runs / "data.txt"), "--out", str(out), "--nproc", "2"]
    with open(log, "w") as f:
        # as from a terminal: a test run started in the background (`cmd &` in a script) has
        # SIGINT ignored, which the launcher would inherit and Python keep
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 180
        while "step     2/1000" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    step = int(re.search(r"interrupted at step (\d+)/1000", text).group(1))
    ckpt = out / "checkpoints" / f"step-{step:06d}"
    assert is_dcp_checkpoint(ckpt)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step


@pytest.mark.parametrize("extra, message", [
    (["--nproc", "2", "--ep", "3"], "ep=3 does not divide the world size 2"),
    (["--ep", "2"], "--ep 2 needs several processes"),
    (["--nproc", "0"], "--nproc must be a positive integer"),
])
def test_bad_setups_refused(tmp_path, capsys, extra, message):
    assert main(["train", *ARGS, "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_argv_from_namespace_round_trip():
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--preset", "tiny", "--lr", "0.002", "--bf16", "--steps", "7", "--ep", "2", "--nproc", "4"]
    ns = p.parse_args(argv)
    again = p.parse_args(argv_from_namespace(ns, add_arguments))
    assert vars(again) == {**vars(ns), "nproc": None}
