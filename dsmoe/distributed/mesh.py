"""Process groups and the 2-D device mesh of dsmoe's scale-out: ``dp`` x ``ep``.

World rank r sits at mesh coordinate (r // ep, r % ep): the ranks of one expert-parallel group
are neighbours (on GPUs, one node's NVLink island carries the all-to-all), the data-parallel
replicas of one expert shard are ``ep`` ranks apart.

* ``ep`` (expert parallel): the routed experts of every MoE layer are split into ``ep``
  contiguous blocks of E/ep; tokens travel to their experts' ranks and back (all-to-all).
* ``dp`` (data parallel): replicas of one expert block; every rank of the world reads its own
  batch, so non-expert parameters are data-parallel over all dp*ep ranks.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEFAULT_TIMEOUT_S = 600.0


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def resolve_dims(world_size: int, dp: Optional[int] = None, ep: Optional[int] = None) -> tuple[int, int]:
    """(dp, ep) with dp * ep == world_size; a missing one is derived from the other (both
    missing: ep = world_size, i.e. all ranks share the experts). Raises ValueError naming the
    setting that does not fit."""
    _positive_int("world size", world_size)
    if ep is not None:
        _positive_int("ep (expert-parallel size)", ep)
    if dp is not None:
        _positive_int("dp (data-parallel size)", dp)
    if ep is None and dp is None:
        ep = world_size
    if ep is None:
        if world_size % dp:
            raise ValueError(f"dp={dp} does not divide the world size {world_size}")
        ep = world_size // dp
    if dp is None:
        if world_size % ep:
            raise ValueError(f"ep={ep} does not divide the world size {world_size}")
        dp = world_size // ep
    if dp * ep != world_size:
        raise ValueError(f"dp x ep = {dp} x {ep} = {dp * ep} does not match the world size {world_size}")
    return dp, ep


def check_experts_fit(num_experts: Optional[int], ep: int) -> None:
    """E must split evenly over the expert-parallel ranks."""
    if num_experts is not None and num_experts % ep:
        raise ValueError(
            f"n_routed_experts={num_experts} is not divisible by ep={ep}: every expert-parallel rank "
            "must hold the same number of experts"
        )


def backend_for(device_type: str) -> str:
    """NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def make_mesh(dp: Optional[int] = None, ep: Optional[int] = None, device_type: Optional[str] = None) -> DeviceMesh:
    """The ("dp", "ep") DeviceMesh over the initialised world (see the module docstring)."""
    if not dist.is_initialized():
        raise RuntimeError("make_mesh: torch.distributed is not initialised (call init_distributed first)")
    dp, ep = resolve_dims(dist.get_world_size(), dp, ep)
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dp, ep), mesh_dim_names=("dp", "ep"))


def mesh_dims(mesh: DeviceMesh) -> tuple[int, int]:
    """(dp, ep) of a mesh made by :func:`make_mesh`."""
    if mesh.mesh_dim_names != ("dp", "ep"):
        raise ValueError(f"expected a ('dp', 'ep') device mesh, got dims {mesh.mesh_dim_names}")
    return mesh.size(0), mesh.size(1)


@dataclass
class DistContext:
    """What a process of a distributed run needs to know about itself."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    dp: int
    ep: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return dist.get_backend()


def init_distributed(
    rank: int,
    world_size: int,
    *,
    local_rank: Optional[int] = None,
    dp: Optional[int] = None,
    ep: Optional[int] = None,
    device: Optional[str] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: Optional[str] = None,
) -> DistContext:
    """Initialises the default process group (gloo on CPU, NCCL on CUDA, chosen from
    ``device``: "cpu", "cuda" or None = CUDA if present) with a timeout on every collective,
    and builds the mesh. The mesh shape is checked before any process group is made, so a bad
    set-up fails at once on every rank with the same message."""
    dp, ep = resolve_dims(world_size, dp, ep)
    local_rank = rank if local_rank is None else local_rank
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: this torch sees no CUDA device")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if not dist.is_initialized():
        dist.init_process_group(
            backend_for(dev.type),
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError("init_distributed: a process group with another rank/world size already exists")
    mesh = make_mesh(dp, ep, dev.type)
    return DistContext(rank, world_size, local_rank, dev, mesh, dp, ep)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched distributed)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def setup_from_env(
    ep: Optional[int] = None,
    dp: Optional[int] = None,
    device: Optional[str] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Optional[DistContext]:
    """Under ``torchrun`` (or :func:`dsmoe.distributed.launch`): reads RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT and calls :func:`init_distributed`. Returns None
    when the process was not launched distributed (WORLD_SIZE unset)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    world = env_world_size()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not (launch with torchrun or --nproc)")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return init_distributed(rank, world, local_rank=local_rank, dp=dp, ep=ep, device=device,
                            timeout_s=timeout_s, init_method="env://")


def shutdown() -> None:
    """Destroys the default process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "backend_for",
    "check_experts_fit",
    "env_world_size",
    "init_distributed",
    "make_mesh",
    "mesh_dims",
    "resolve_dims",
    "setup_from_env",
    "shutdown",
]
