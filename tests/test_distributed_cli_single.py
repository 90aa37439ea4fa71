"""dsmoe/cli/distributed (--nproc / --ep glue and the torchrun launcher) in the pytest process:
the launch command and environment, thread shares, the stop file, argument pass-through,
joining, a distributed checkpoint's training state, rank-0-only output. Real multi-process runs
are test_distributed_cli.py's."""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmoe.cli import train as train_mod
from dsmoe.cli.distributed import launch as launch_mod
from dsmoe.cli.distributed import options


# ---- launch

def test_cpu_threads_per_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [launch_mod.cpu_threads_per_process(n) for n in (1, 2, 3, 8, 9, 0)] == [8, 4, 2, 1, 1, 8]

    def no_affinity(pid):
        raise AttributeError

    monkeypatch.setattr(os, "sched_getaffinity", no_affinity)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert launch_mod.cpu_threads_per_process(4) == 1 and launch_mod.cpu_threads_per_process(2) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert launch_mod.cpu_threads_per_process(1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: (_ for _ in ()).throw(OSError()))
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert launch_mod.cpu_threads_per_process(1) == 5


def test_launch_command_and_environment():
    assert launch_mod.launch_command(3, ["train", "--ep", "3"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "dsmoe",
        "train", "--ep", "3"]
    assert launch_mod.launch_command(1, [], module="x.y")[-2:] == ["-m", "x.y"]
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError) as e:
            launch_mod.launch_command(bad, [])
        assert str(e.value) == f"--nproc must be a positive integer, got {bad!r}"
    env = launch_mod.launch_env(2, base={"A": "1"})
    assert env == {"A": "1", "OMP_NUM_THREADS": str(launch_mod.cpu_threads_per_process(2))}
    assert launch_mod.launch_env(2, base={"OMP_NUM_THREADS": "7"}) == {"OMP_NUM_THREADS": "7"}  # the user's choice
    assert launch_mod.launch_env(1)["PATH"] == os.environ["PATH"]


def test_stop_requested(tmp_path, monkeypatch):
    monkeypatch.delenv(launch_mod.STOP_FILE_ENV, raising=False)
    assert launch_mod.stop_requested() is False
    monkeypatch.setenv(launch_mod.STOP_FILE_ENV, "")
    assert launch_mod.stop_requested() is False
    monkeypatch.setenv(launch_mod.STOP_FILE_ENV, str(tmp_path / "stop"))
    assert launch_mod.stop_requested() is False
    (tmp_path / "stop").write_text("")
    assert launch_mod.stop_requested() is True


def test_strip_launch_args():
    strip = launch_mod.strip_launch_args
    assert strip(["train", "--nproc", "4", "--ep", "2"]) == ["train", "--ep", "2"]
    assert strip(["--nproc=4", "train", "--nprocx", "1"]) == ["train", "--nprocx", "1"]
    assert strip(["a", "--x", "1", "--y=2", "b"], names=("--x", "--y")) == ["a", "b"]
    assert strip(["--nproc"]) == [] and strip([]) == []


def _timeit(*statement: str) -> list:
    return ["-n", "1", "-r", "1", *statement]


def test_launch_runs_the_module_under_torchrun(monkeypatch, tmp_path):
    seen = {}
    real = subprocess.Popen

    def popen(cmd, env=None, **kw):
        seen.update(cmd=cmd, env=env, **kw)
        return real(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)

    monkeypatch.setattr(launch_mod.subprocess, "Popen", popen)
    assert launch_mod.launch(1, _timeit("pass"), module="timeit") == 0
    assert seen["cmd"] == launch_mod.launch_command(1, _timeit("pass"), "timeit")
    assert seen["start_new_session"] is True  # Ctrl-C reaches the launcher only
    stop = seen["env"][launch_mod.STOP_FILE_ENV]
    assert stop and not os.path.exists(stop) and "OMP_NUM_THREADS" in seen["env"]
    assert launch_mod.launch(1, _timeit("raise SystemExit(3)"), module="timeit") != 0  # a failed process
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        launch_mod.launch(1, _timeit("import time; time.sleep(60)"), module="timeit", timeout=3)
    assert time.monotonic() - t0 < 30  # the processes were stopped, not waited for
    assert not os.path.exists(seen["env"][launch_mod.STOP_FILE_ENV])


def test_first_interrupt_asks_to_save_second_stops(monkeypatch, capsys):
    class Proc:
        pid = 12345

        def __init__(self, events):
            self.events = events

        def wait(self, timeout=None):
            event = self.events.pop(0)
            if isinstance(event, BaseException):
                raise event
            return event

    killed = []
    monkeypatch.setattr(launch_mod.os, "killpg", lambda pid, sig: killed.append((pid, sig)))
    stop_files = []

    def popen_with(events):
        def popen(cmd, env=None, **kw):
            stop_files.append(env[launch_mod.STOP_FILE_ENV])
            return Proc(events)
        return popen

    # one Ctrl-C: the stop file appears, the processes save and exit; the launcher says 130
    def exit_after_checking():
        assert os.path.exists(stop_files[-1])  # what the processes look for
        return 0

    class Checking(Proc):
        def wait(self, timeout=None):
            event = self.events.pop(0)
            if isinstance(event, BaseException):
                raise event
            return event() if callable(event) else event

    monkeypatch.setattr(launch_mod.subprocess, "Popen", lambda cmd, env=None, **kw: (
        stop_files.append(env[launch_mod.STOP_FILE_ENV]), Checking([KeyboardInterrupt(), exit_after_checking]))[1])
    assert launch_mod.launch(2, ["train"]) == 130
    assert killed == [] and not os.path.exists(stop_files[-1])
    assert capsys.readouterr().err == ("\ninterrupt: the processes finish this step and save a checkpoint "
                                       "(Ctrl-C again to stop them without saving)\n")
    # two: terminated at once
    import signal

    monkeypatch.setattr(launch_mod.subprocess, "Popen", popen_with([KeyboardInterrupt(), KeyboardInterrupt(), 0]))
    assert launch_mod.launch(2, ["train"]) == 130
    assert killed == [(12345, signal.SIGTERM)] and not os.path.exists(stop_files[-1])
    # none: the processes' own status
    monkeypatch.setattr(launch_mod.subprocess, "Popen", popen_with([7]))
    assert launch_mod.launch(2, ["train"]) == 7
    # what runs: `python -m dsmoe ...` under torchrun; the stop file is recognisably dsmoe's
    commands = []
    monkeypatch.setattr(launch_mod.subprocess, "Popen", lambda cmd, env=None, **kw: (
        commands.append((cmd, env[launch_mod.STOP_FILE_ENV], kw)), Proc([0]))[1])
    assert launch_mod.launch(3, ["generate", "--x"]) == 0
    (cmd, stop_file, kw), = commands
    assert cmd[-4:] == ["-m", "dsmoe", "generate", "--x"] and "--nproc-per-node=3" in cmd
    assert os.path.basename(stop_file).startswith("dsmoe-stop-") and kw == {"start_new_session": True}
    # the notice is flushed at once (stderr may be a pipe the launcher's caller reads)
    flushed = []

    class Stderr(io.StringIO):
        def flush(self):
            flushed.append(self.getvalue())

    monkeypatch.setattr(launch_mod.sys, "stderr", Stderr())
    monkeypatch.setattr(launch_mod.subprocess, "Popen", popen_with([KeyboardInterrupt(), 0]))
    assert launch_mod.launch(2, ["train"]) == 130
    assert flushed and "interrupt: the processes finish this step" in flushed[0]


# ---- options

def _train_ns(*argv):
    p = argparse.ArgumentParser()
    train_mod.add_arguments(p)
    return p.parse_args(list(argv))


def test_argv_from_namespace_skips_defaults_and_the_launcher_option():
    ns = _train_ns("--preset", "tiny", "--bf16", "--nproc", "2", "--ep", "2", "--lr", "0.5")
    argv = options.argv_from_namespace(ns, train_mod.add_arguments)
    assert argv == ["--preset", "tiny", "--lr", "0.5", "--bf16", "--ep", "2"]
    assert "--nproc" in options.argv_from_namespace(ns, train_mod.add_arguments, skip=())
    assert options.argv_from_namespace(_train_ns(), train_mod.add_arguments) == []


def test_argv_from_namespace_of_fewer_options_and_aliases():
    def add(p):
        p.add_argument("-n", "--num", type=int)
        p.add_argument("--name")
        p.add_argument("--nproc", type=int)

    # the long form of an option with a short alias; options the namespace lacks are unset
    assert options.argv_from_namespace(argparse.Namespace(num=3), add) == ["--num", "3"]


def test_maybe_launch_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    monkeypatch.setattr(options, "launch", lambda nproc, argv: calls.append((nproc, argv)) or 0)
    assert options.maybe_launch(argparse.Namespace(), train_mod.add_arguments) is None  # a command without --nproc
    assert options.join(argparse.Namespace()) is None
    assert options.maybe_launch(_train_ns("--nproc", "1"), train_mod.add_arguments) == 0  # one process is allowed
    assert calls == [(1, ["train"])]  # the command defaults to train
    assert options.maybe_launch(argparse.Namespace(nproc=2), lambda p: None) == 0  # a command without --ep
    assert calls[-1] == (2, ["train"])


def test_maybe_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    monkeypatch.setattr(options, "launch", lambda nproc, argv: calls.append((nproc, argv)) or 0)
    assert options.maybe_launch(_train_ns("--steps", "3"), train_mod.add_arguments) is None and calls == []
    assert options.maybe_launch(_train_ns("--nproc", "4", "--ep", "2", "--steps", "3"), train_mod.add_arguments,
                                command="compare") == 0
    assert calls == [(4, ["compare", "--steps", "3", "--ep", "2"])]
    for argv, message in [(["--nproc", "0"], "--nproc must be a positive integer, got 0"),
                          (["--nproc", "4", "--ep", "3"], "ep=3 does not divide the world size 4")]:
        with pytest.raises(ValueError) as e:
            options.maybe_launch(_train_ns(*argv), train_mod.add_arguments)
        assert str(e.value) == message
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as e:
        options.maybe_launch(_train_ns("--nproc", "2"), train_mod.add_arguments)
    assert str(e.value) == "--nproc: this process was already started by torchrun; drop --nproc"
    assert len(calls) == 1


def test_join(monkeypatch):
    seen = []
    monkeypatch.setattr(options.DistributedTraining, "from_env",
                        classmethod(lambda cls, ep=None, device=None: seen.append((ep, device))))
    assert options.join(_train_ns(), device="auto") is None
    assert options.join(_train_ns("--ep", "1"), device="cpu") is None
    assert seen == [(None, None), (1, "cpu")]
    with pytest.raises(ValueError) as e:
        options.join(_train_ns("--ep", "2"))
    assert str(e.value) == "--ep 2 needs several processes: add --nproc N or start with torchrun"


def test_read_training_state(tmp_path):
    with pytest.raises(ValueError) as e:
        options.read_training_state(tmp_path)
    assert str(e.value).startswith(f"checkpoint {tmp_path}: unreadable trainer_state.json (")
    (tmp_path / "trainer_state.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"unreadable trainer_state.json \(Expecting"):
        options.read_training_state(tmp_path)
    good = {"step": 3, "args": {"lr": 1}, "param_names": ["a"]}
    for key in good:
        (tmp_path / "trainer_state.json").write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        with pytest.raises(ValueError) as e:
            options.read_training_state(tmp_path)
        assert str(e.value) == f"checkpoint {tmp_path}: trainer_state.json lacks '{key}'"
    (tmp_path / "trainer_state.json").write_text(json.dumps(good))
    with pytest.raises(ValueError) as e:
        options.read_training_state(str(tmp_path))
    assert str(e.value).startswith(f"checkpoint {tmp_path}: unreadable rng.safetensors (")
    save_file({"cpu": torch.get_rng_state()}, str(tmp_path / "rng.safetensors"))
    state, opt, rng = options.read_training_state(str(tmp_path))
    assert state == good and opt is None and torch.equal(rng["cpu"], torch.get_rng_state())


def test_extra_files_and_the_null_log(tmp_path):
    from dsmoe.cli.data import ByteTokenizer

    write = options.extra_files(ByteTokenizer(), lambda: {"cpu": torch.arange(3, dtype=torch.uint8)})
    write(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert torch.equal(load_file(str(tmp_path / "rng.safetensors"))["cpu"], torch.arange(3, dtype=torch.uint8))
    log = options.NullLog()
    log.add(step=1, loss=2.0)
    assert log.rows == [{"step": 1, "loss": 2.0}]


def test_only_rank_0_prints():
    class Run:
        def __init__(self, main):
            self.is_main = main

    for run, shown in ((None, "x\n"), (Run(True), "x\n"), (Run(False), "")):
        out = io.StringIO()
        with redirect_stdout(out):
            with options.quiet_unless_main(run):
                print("x")
        assert out.getvalue() == shown
