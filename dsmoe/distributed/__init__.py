"""dsmoe on torch.distributed: expert parallelism over an ``ep`` process group, FSDP2 over a
("dp", "ep") DeviceMesh, distributed checkpoints (DCP) and their conversion to and from the
Hugging Face layout, and the glue that runs `dsmoe train` under torchrun. See docs/distributed.md.

Submodules: ``mesh`` (process groups, mesh), ``comm`` (the differentiable all-to-all),
``expert_parallel`` (the EP experts module), ``fsdp`` (wrapping, clipping, gathering),
``checkpoint`` (DCP save/load/convert), ``training`` and ``cli`` (what `dsmoe train` calls),
``launch`` (torchrun for --nproc).
"""
from .comm import CommStats, all_to_all, exchange_counts
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel
from .fsdp import clip_grad_norm_, dense_mesh, full_state_dict, grad_norm, unwrapped_copy, wrap_model
from .mesh import DistContext, init_distributed, make_mesh, resolve_dims, setup_from_env, shutdown
from .training import DistributedTraining

__all__ = [
    "CommStats",
    "all_to_all",
    "exchange_counts",
    "ExpertParallelExperts",
    "apply_expert_parallel",
    "wrap_model",
    "dense_mesh",
    "clip_grad_norm_",
    "grad_norm",
    "full_state_dict",
    "unwrapped_copy",
    "DistContext",
    "init_distributed",
    "make_mesh",
    "resolve_dims",
    "setup_from_env",
    "shutdown",
    "DistributedTraining",
]
