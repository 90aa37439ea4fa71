"""Sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) composed with expert
parallelism on the ("dp", "ep") mesh.

Every rank of the world reads its own batch and the loss is the mean of the ranks' losses, so
training equals one process on the concatenated batch. Where each parameter lives:

* routed experts: split over ``ep`` by :func:`apply_expert_parallel`, and FSDP-sharded over
  ``dp`` (the replicas of one expert block) on their ``dp`` sub-mesh. A rank's expert gradient
  already sums the contributions of its whole ep group (the all-to-all's backward brings them),
  so the reduction over dp divides by dp * ep, not dp.
* everything else (embeddings, attention, norms, routers, shared experts, dense MLPs, the
  output head): FSDP-sharded over all dp * ep ranks (a 1-D mesh over the world), gradients
  averaged over all of them.

Each parameter byte is then held by exactly one rank, which makes the total gradient norm one
all-reduce (:func:`clip_grad_norm_`). Optimizers work on the sharded DTensor parameters.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from .expert_parallel import ExpertParallelExperts, apply_expert_parallel
from .mesh import check_experts_fit, mesh_dims


def _expert_placement(dp: int):
    """Shard experts over dp on the expert dim when the local experts split evenly, else on
    the row dim of each expert matrix (FSDP needs even shards off dim 0)."""

    def placement(param: nn.Parameter) -> Shard:
        local_experts = param.to_local().shape[0] if isinstance(param, DTensor) else param.shape[0]
        if local_experts % dp == 0:
            return Shard(0)
        if param.shape[1] % dp:
            raise ValueError(
                f"cannot shard the experts over dp={dp}: neither the {local_experts} local experts nor "
                f"the {param.shape[1]} rows of each expert matrix divide evenly"
            )
        return Shard(1)

    return placement


def dense_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh over all dp * ep ranks on which non-expert parameters are sharded (flattened
    from ``mesh``, so DTensor also reduces over both dims with one collective)."""
    mesh_dims(mesh)
    return mesh._flatten("dp_ep")


def wrap_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    reshard_after_forward: Optional[bool] = None,
    mp_policy: Optional[MixedPrecisionPolicy] = None,
) -> nn.Module:
    """Expert parallelism + FSDP2 on ``model`` (a :class:`dsmoe.DeepSeekMoEForCausalLM` with the
    same weights on every rank, on this rank's device), in place; returns it.

    ``mesh``: the ("dp", "ep") mesh of :func:`make_mesh`. The routed experts of each MoE layer
    become one FSDP unit, each decoder block another, and the root (embeddings, final norm,
    head) the last. ``reshard_after_forward`` and ``mp_policy`` go to ``fully_shard``."""
    dp, ep = mesh_dims(mesh)
    world = dp * ep
    check_experts_fit(model.config.n_routed_experts, ep)
    apply_expert_parallel(model, mesh["ep"])
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    gloo = dist.get_backend() == "gloo"
    for layer in model.moe_layers():
        experts = fully_shard(layer.experts, mesh=mesh["dp"], shard_placement_fn=_expert_placement(dp), **kwargs)
        experts.set_gradient_divide_factor(float(world))
        # gloo has no AVG / PREMUL_SUM: sum, then divide (size-1 groups already divide once)
        experts.set_force_sum_reduction_for_comms(gloo and dp > 1)
    flat = dense_mesh(mesh)
    for block in model.model.layers:
        fully_shard(block, mesh=flat, **kwargs)
    fully_shard(model, mesh=flat, **kwargs)
    if gloo and world > 1:
        for module in model.modules():
            if isinstance(module, FSDPModule) and not isinstance(module, ExpertParallelExperts):
                module.set_force_sum_reduction_for_comms(True)
    model._dsmoe_mesh = mesh
    return model


def is_wrapped(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------- gradient norm


def _mesh_key(t: Tensor):
    return t.device_mesh if isinstance(t, DTensor) else None


@torch.no_grad()
def grad_norm(parameters: Union[Tensor, Iterable[Tensor]], norm_type: float = 2.0) -> Tensor:
    """Total gradient norm over ``parameters``, DTensor-aware: DTensor gradients on different
    meshes (experts on ("dp", "ep"), the rest on the flat world mesh) are reduced per mesh and
    combined; plain tensors count as they are (replicated). A plain fp32 scalar on the
    gradients' device."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    by_mesh: Dict[object, List[Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(_mesh_key(g), []).append(g)
    norms: List[Tensor] = []
    for key, group in by_mesh.items():
        n = torch.nn.utils.get_total_norm(group, norm_type)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        norms.append(n.float())
    if not norms:
        return torch.zeros(())
    device = norms[0].device
    stacked = torch.stack([n.to(device) for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Union[Tensor, Iterable[Tensor]], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Like ``torch.nn.utils.clip_grad_norm_`` (same coefficient, max_norm / (norm + 1e-6)
    clamped to 1) for parameters sharded on several meshes; returns the total norm."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    total = grad_norm(params, norm_type)
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total


# ---------------------------------------------------------------- state


@contextlib.contextmanager
def _quiet_redistribute():
    """DTensor warns that gathering (StridedShard, Shard) expert weights takes two all-gathers;
    that is expected here (once per save), so keep the log clean."""
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def full_state_dict(model: nn.Module, rank0_only: bool = True) -> Dict[str, Tensor]:
    """The whole model's state dict as plain CPU tensors with global shapes (the names and
    shapes of an unwrapped model), gathered to rank 0 (empty elsewhere when ``rank0_only``).
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with _quiet_redistribute():
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))
    return {name: t.cpu() for name, t in state.items()}


def unwrapped_copy(model: nn.Module, state: Optional[Dict[str, Tensor]] = None) -> nn.Module:
    """A single-process :class:`dsmoe.DeepSeekMoEForCausalLM` (CPU, fp32 unless the state says
    otherwise) holding ``state`` (default: :func:`full_state_dict` of ``model``; call it on every
    rank then). For saving in the Hugging Face layout or generating on one rank."""
    from ..model import DeepSeekMoEForCausalLM

    if state is None:
        state = full_state_dict(model, rank0_only=False)
    with torch.device("meta"):
        plain = DeepSeekMoEForCausalLM(model.config, moe_impl="dsmoe")
    plain.to_empty(device="cpu")
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    # FSDP keeps the tied head under one name; load_state_dict wants both present or tied
    plain.load_state_dict(state, strict=True, assign=False)
    plain.train(model.training)
    return plain


__all__ = ["wrap_model", "is_wrapped", "dense_mesh", "grad_norm", "clip_grad_norm_", "full_state_dict", "unwrapped_copy"]
