"""What a training loop does differently on several ranks, in one object the command line calls.

    dist = DistributedTraining.from_env(ep=...)        # None when not launched distributed
    model, optimizer = dist.wrap(model, optimizer)      # EP + FSDP2; optimizer state carried over
    x, y = dist.local_batch(x, y)                       # this rank's rows of the global batch
    loss.backward(); dist.clip_grad_norm_(model.parameters(), 1.0); optimizer.step()
    dist.mean(loss)                                     # the global batch's loss, on every rank
    dist.save(path, model, optimizer, trainer_state)    # DCP checkpoint (+ trainer_state.json)
    dist.load(path, model, optimizer)                   # any rank count that wrote it
    dist.export_hf(model, run_dir)                      # Hugging Face layout, written by rank 0

A distributed run's batch of step s is the same global batch a single process would draw, split
by rows over the ranks, so its loss curve is the single-process one (up to float rounding).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...distributed import checkpoint as dcp_ckpt
from ...distributed.fsdp import clip_grad_norm_, full_state_dict, unwrapped_copy, wrap_model
from ...distributed.mesh import DistContext, check_experts_fit, setup_from_env, shutdown
from ...fileio import fsync_dir, fsync_tree

TRAINER_STATE = "trainer_state.json"


class DistributedTraining:
    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    @classmethod
    def from_env(cls, ep: Optional[int] = None, device: Optional[str] = None,
                 timeout_s: float = 1800.0) -> Optional["DistributedTraining"]:
        """Joins the run torchrun (or ``--nproc``) started; None when this process runs alone.
        ``ep`` defaults to the world size (experts spread over every rank, dp = 1)."""
        ctx = setup_from_env(ep=ep, device=device, timeout_s=timeout_s)
        return None if ctx is None else cls(ctx)

    # ------------------------------------------------------------ facts
    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def describe(self) -> str:
        return (f"{self.world_size} processes ({dist.get_backend()}), mesh dp {self.ctx.dp} x ep {self.ctx.ep}")

    def check_config(self, config) -> None:
        check_experts_fit(config.n_routed_experts, self.ctx.ep)

    # ------------------------------------------------------------ model and optimizer
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[nn.Module, torch.optim.Optimizer]:
        """Expert parallelism + FSDP2 on ``model`` (same weights on every rank, e.g. the same
        seed); returns it with a new optimizer of the same class, parameter groups and
        hyperparameters over the sharded parameters, holding ``optimizer``'s state if it has one
        (a single-process checkpoint resumed on several ranks)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        names = {id(p): n for n, p in model.named_parameters()}
        groups: List[Dict[str, Any]] = []
        for group in optimizer.param_groups:
            spec = {k: v for k, v in group.items() if k != "params"}
            spec["params"] = [names[id(p)] for p in group["params"]]
            groups.append(spec)
        full_state = get_optimizer_state_dict(model, optimizer) if optimizer.state else None
        model = wrap_model(model.to(self.device), self.ctx.mesh)
        params = dict(model.named_parameters())
        # every hyperparameter is in each group, so the class's defaults never apply
        new = type(optimizer)([{**g, "params": [params[n] for n in g["params"]]} for g in groups])
        if full_state is not None:
            set_optimizer_state_dict(model, new, full_state, options=StateDictOptions(full_state_dict=True))
            for group, spec in zip(new.param_groups, groups):  # as given (the state dict turns betas into lists)
                group.update({k: v for k, v in spec.items() if k != "params"})
        return model, new

    def local_batch(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        """This rank's rows of each global-batch tensor (the batch size must divide evenly)."""
        out = []
        for t in tensors:
            if t.shape[0] % self.world_size:
                raise ValueError(
                    f"the batch size {t.shape[0]} is not divisible by the {self.world_size} processes "
                    "(--batch-size is the global batch)"
                )
            per = t.shape[0] // self.world_size
            out.append(t[self.rank * per:(self.rank + 1) * per])
        return tuple(out) if len(out) != 1 else out[0]

    def clip_grad_norm_(self, parameters, max_norm: float) -> Tensor:
        return clip_grad_norm_(parameters, max_norm)

    def mean(self, value):
        """Mean over ranks of a scalar (a float back) or a 1-D tensor (a list of floats back)."""
        t = torch.as_tensor(value).detach().to(torch.float64).reshape(-1).cpu()
        t = t.to(self.device) if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
        out = (t / self.world_size).tolist()
        return out[0] if torch.as_tensor(value).dim() == 0 else out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (e.g. a run directory named after the clock)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (e.g. Ctrl-C seen by some ranks only)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        t = t.to(self.device) if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def should_stop(self, requested: bool) -> bool:
        """Whether to stop after this step, the same answer on every rank: ``requested`` here
        (Ctrl-C seen by this process), on any other rank, or from the ``--nproc`` launcher."""
        from .launch import stop_requested

        return self.any(requested or stop_requested())

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------ checkpoints
    def save(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any],
             extra_files=None) -> Path:
        """A DCP checkpoint of model and optimizer in ``path`` plus ``trainer_state.json``
        (``state``, written by rank 0), built in ``<path>.tmp-<tag>``, fsynced and renamed when
        complete; a checkpoint already at ``path`` is moved aside (``<path>.old-<tag>``) first
        and removed only after the new one is in place: a crash leaves a complete checkpoint at
        ``path`` or, in the instant between the two renames, at ``<path>.old-<tag>``, never a
        half-written one. The names are those :func:`dsmoe.cli.checkpoint.clean_partial_saves`
        knows: resuming the run removes what a killed save left and puts a moved-aside
        checkpoint back. ``extra_files(dir)``, if given, runs on rank 0 to add files
        (tokenizer, RNG state)."""
        path = Path(path)
        tag = self.broadcast(secrets.token_hex(6) if self.is_main else None)  # one name on every rank
        tmp, old = (path.with_name(f"{path.name}.{kind}-{tag}") for kind in ("tmp", "old"))
        dcp_ckpt.save(tmp, model, optimizer, extra={"step": state.get("step")})
        dist.barrier()  # every rank's shards are written
        if self.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
            if extra_files is not None:
                extra_files(tmp)
            fsync_tree(tmp)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            if old.exists():
                shutil.rmtree(old)
        dist.barrier()
        return path

    def load(self, path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
        """Fills the wrapped model (and optimizer) from a DCP checkpoint written by any number
        of ranks; returns its dsmoe_dcp.json."""
        return dcp_ckpt.load(path, model, optimizer)

    def export_hf(self, model: nn.Module, directory: Path) -> Optional[nn.Module]:
        """Gathers the model and writes it in the Hugging Face layout (rank 0). Returns the
        unwrapped single-process copy on rank 0 (for generation), None elsewhere."""
        state = full_state_dict(model, rank0_only=True)
        plain = None
        if self.is_main:
            plain = unwrapped_copy(model, state)
            plain.save_pretrained(directory)
        dist.barrier()
        return plain

    def close(self) -> None:
        shutdown()


is_dcp_checkpoint = dcp_ckpt.is_dcp_checkpoint

__all__ = ["DistributedTraining", "is_dcp_checkpoint", "TRAINER_STATE"]
