"""The glue between ``dsmoe train`` and torch.distributed: the ``--nproc`` / ``--ep`` options,
launching, joining a run, and reading a distributed checkpoint's training state.

``dsmoe train --nproc 4 --ep 2 ...`` re-runs itself under torchrun in 4 processes (2 x 2 mesh);
``torchrun --nproc-per-node 4 -m dsmoe train --ep 2 ...`` does the same by hand (and across
nodes). Inside, :func:`join` returns a :class:`DistributedTraining` (None in a plain run).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .launch import launch, stop_requested
from .training import TRAINER_STATE, DistributedTraining, is_dcp_checkpoint

RNG_FILE = "rng.safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (torch.distributed: gloo on CPU, NCCL on GPU)")
    g.add_argument("--nproc", type=int, metavar="N",
                   help="train in N processes on this machine (runs torchrun); same as "
                        "`torchrun --nproc-per-node N -m dsmoe train ...`")
    g.add_argument("--ep", type=int, metavar="N",
                   help="expert-parallel size: each process holds 1/N of the routed experts "
                        "(default: all processes; the rest of the world size is data parallel)")


def argv_from_namespace(ns: argparse.Namespace, add_arguments_fn: Callable[[argparse.ArgumentParser], None],
                        skip: Tuple[str, ...] = ("nproc",)) -> list:
    """The command-line options that reproduce ``ns`` (for the processes --nproc starts)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments_fn(parser)
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip:
            continue
        value = getattr(ns, action.dest, None)
        if value is None or value is False:
            continue
        option = max(action.option_strings, key=len)
        if action.nargs == 0:  # a flag
            argv.append(option)
        else:
            argv += [option, str(value)]
    return argv


def maybe_launch(ns: argparse.Namespace, add_arguments_fn, command: str = "train") -> Optional[int]:
    """With ``--nproc N``: runs ``dsmoe <command>`` with the same options in N processes under
    torchrun and returns its exit status; None without ``--nproc``."""
    nproc = getattr(ns, "nproc", None)
    if nproc is None:
        return None
    if nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc: this process was already started by torchrun; drop --nproc")
    ep = getattr(ns, "ep", None)
    if ep is not None:
        from ...distributed.mesh import resolve_dims

        resolve_dims(nproc, ep=ep)  # refuse a bad mesh before starting anything
    sys.stdout.flush()
    return launch(nproc, [command, *argv_from_namespace(ns, add_arguments_fn)])


def join(ns: argparse.Namespace, device: Optional[str] = None) -> Optional[DistributedTraining]:
    """The run this process belongs to (torchrun's environment), or None when alone."""
    ep = getattr(ns, "ep", None)
    if device == "auto":
        device = None
    run = DistributedTraining.from_env(ep=ep, device=device)
    if run is None and ep not in (None, 1):
        raise ValueError(f"--ep {ep} needs several processes: add --nproc N or start with torchrun")
    return run


def read_training_state(path: Path) -> Tuple[Dict[str, Any], None, Dict[str, torch.Tensor]]:
    """(trainer state, None, RNG tensors) of a distributed checkpoint; the optimizer state stays
    in the DCP shards (load it with :meth:`DistributedTraining.load` or
    :func:`dsmoe.distributed.checkpoint.load`)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path}: unreadable {TRAINER_STATE} ({e})") from None
    for key in ("step", "args", "param_names"):
        if key not in state:
            raise ValueError(f"checkpoint {path}: {TRAINER_STATE} lacks {key!r}")
    try:
        rng = load_file(str(path / RNG_FILE))
    except Exception as e:
        raise ValueError(f"checkpoint {path}: unreadable {RNG_FILE} ({e})") from None
    return state, None, rng


def extra_files(tokenizer, rng_tensors: Callable[[], Dict[str, torch.Tensor]]):
    """What :meth:`DistributedTraining.save` adds to a checkpoint besides the DCP shards."""
    from safetensors.torch import save_file

    def write(directory: Path) -> None:
        tokenizer.save(directory)
        save_file(rng_tensors(), str(Path(directory) / RNG_FILE))

    return write


class NullLog:
    """Stands in for the metrics log on ranks other than 0 (one rank writes the files)."""

    def __init__(self) -> None:
        self.rows: list = []

    def add(self, **row) -> None:
        self.rows.append(row)


@contextlib.contextmanager
def quiet_unless_main(run: Optional[DistributedTraining]):
    """Only rank 0 prints to stdout (the other ranks' output would repeat it)."""
    if run is None or run.is_main:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


__all__ = [
    "NullLog",
    "add_arguments",
    "argv_from_namespace",
    "extra_files",
    "is_dcp_checkpoint",
    "join",
    "maybe_launch",
    "quiet_unless_main",
    "read_training_state",
    "stop_requested",
]
