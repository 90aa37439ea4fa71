"""Launching a distributed run on this machine: ``launch(nproc, argv)`` runs
``torchrun --standalone --nproc-per-node nproc -m dsmoe <argv>`` (PyTorch's own launcher: it
sets RANK / WORLD_SIZE / MASTER_ADDR / ..., forwards signals, and stops every process when one
fails), with each process's CPU threads set to its share of the cores."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

# Ctrl-C under --nproc: the launcher creates this file; the processes see it at the end of a
# step, finish together and save a checkpoint (see DistributedTraining.should_stop).
STOP_FILE_ENV = "DSMOE_STOP_FILE"


def cpu_threads_per_process(nproc: int) -> int:
    """Cores of this process's CPU set divided among ``nproc`` processes (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, nproc))


def launch_command(nproc: int, argv: Sequence[str], module: str = "dsmoe") -> List[str]:
    """The torchrun command line that :func:`launch` runs."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *argv]


def launch_env(nproc: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ if base is None else base)
    # torchrun would pin every process to 1 thread; give each its share of the cores instead
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_process(nproc)))
    return env


def launch(nproc: int, argv: Sequence[str], module: str = "dsmoe", timeout: Optional[float] = None) -> int:
    """Runs ``python -m <module> <argv>`` in ``nproc`` processes under torchrun and returns its
    exit status (0 when every process succeeded, 130 when interrupted).

    The processes run in their own session, so Ctrl-C reaches only this launcher, which asks
    them (through a stop file) to finish the current step and save a checkpoint; a second
    Ctrl-C terminates them. (Sent to torchrun and its workers at once, Ctrl-C would make
    torchrun signal the workers a second time, which stops them without saving.)"""
    cmd = launch_command(nproc, argv, module)
    fd, stop_file = tempfile.mkstemp(prefix="dsmoe-stop-")
    os.close(fd)
    os.unlink(stop_file)  # its existence is the signal
    env = launch_env(nproc)
    env[STOP_FILE_ENV] = stop_file
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    interrupted = False
    try:
        while True:
            try:
                code = proc.wait(timeout=timeout)
                break
            except KeyboardInterrupt:
                if interrupted:  # second Ctrl-C: stop now
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait()
                    return 130
                interrupted = True
                open(stop_file, "w").close()
                print("\ninterrupt: the processes finish this step and save a checkpoint "
                      "(Ctrl-C again to stop them without saving)", file=sys.stderr, flush=True)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise
    finally:
        if os.path.exists(stop_file):
            os.unlink(stop_file)
    return 130 if interrupted else code


def stop_requested() -> bool:
    """True once the launcher of this process (``--nproc``) was interrupted."""
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)


def strip_launch_args(argv: Sequence[str], names: Sequence[str] = ("--nproc",)) -> List[str]:
    """``argv`` without the launcher's own options (``--nproc N`` / ``--nproc=N``), for the
    command each process runs."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in names:
            skip = True
            continue
        if any(arg.startswith(name + "=") for name in names):
            continue
        out.append(arg)
    return out


__all__ = ["STOP_FILE_ENV", "cpu_threads_per_process", "launch", "launch_command", "launch_env", "stop_requested",
           "strip_launch_args"]
