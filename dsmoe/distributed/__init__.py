"""dsmoe on torch.distributed, the library: expert parallelism over an ``ep`` process group,
FSDP2 over a ("dp", "ep") DeviceMesh, distributed checkpoints (DCP) and their conversion to and
from the Hugging Face layout. See docs/distributed.md.

Submodules: ``mesh`` (process groups, mesh), ``comm`` (the differentiable all-to-all),
``expert_parallel`` (the EP experts module), ``fsdp`` (wrapping, clipping, gathering),
``checkpoint`` (DCP save/load/convert). The application that runs `dsmoe train` under torchrun
(the training loop's distributed steps, the ``--nproc`` / ``--ep`` options, the launcher) is
:mod:`dsmoe.cli.distributed`; ``dsmoe.distributed.training``, ``.cli`` and ``.launch`` and
``DistributedTraining`` here stay as aliases of it.
"""
from .comm import CommStats, all_to_all, exchange_counts
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel
from .fsdp import clip_grad_norm_, dense_mesh, full_state_dict, grad_norm, unwrapped_copy, wrap_model
from .mesh import DistContext, init_distributed, make_mesh, resolve_dims, setup_from_env, shutdown


def __getattr__(name: str):
    # the application's class under its old name, imported on first use (the library does not
    # import the application)
    if name == "DistributedTraining":
        from ..cli.distributed.training import DistributedTraining

        return DistributedTraining
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
