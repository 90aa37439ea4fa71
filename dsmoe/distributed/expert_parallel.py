"""Expert parallelism: each rank of an ``ep`` group of D ranks holds E/D routed experts.

Expert e lives on ep rank ``e // (E/D)`` (contiguous blocks, the same map as the model's
:class:`dsmoe.DeviceBalanceLoss` with D devices). One layer's forward on every rank::

    x_perm, row_map, offsets = permute(x, expert_ids, E)    # rows grouped by expert, so the
                                                              # rows for rank r are contiguous
    send[r, j] = rows for rank r's local expert j           # from offsets, [D, E/D]
    recv = all_to_all(send)                                  # recv[s, j]: rows from rank s
    x_recv = all_to_all(x_perm)                              # grouped by source, then expert
    x_loc = permute(x_recv, local expert of each row)        # regrouped by local expert
    y_loc = down(swiglu(gate_up(x_loc)))                     # grouped GEMMs, local offsets
    y_perm = all_to_all(unpermute(y_loc))                    # back to source order, back home
    y = unpermute(y_perm, row_map, weights)

The regrouping is stable, so an expert sees its rows in (source rank, token) order, and each
token's result is summed by the same fixed-order gather as on one process. Both exchanges are
differentiable (their backward is the reverse exchange).

The weights are DTensors on the ep mesh, ``Shard(0)`` of the global stacked tensors
(``w_gate_up`` [E, 2I, h], ``w_down`` [E, h, I]): state dicts and distributed checkpoints see
the global shapes and names of :class:`dsmoe.RoutedExperts`, so they move between rank counts.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .. import ops
from ..layers import RoutedExperts
from ..losses import DeviceBalanceLoss
from .comm import all_to_all, exchange_counts
from .mesh import check_experts_fit


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ExpertParallelExperts(nn.Module):
    """Drop-in for :class:`dsmoe.RoutedExperts` (same ``forward(x, weights, expert_ids)`` and
    parameter names) whose experts are spread over the ranks of ``ep_mesh`` (1-D)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, ep_mesh: DeviceMesh,
                 init_std: float = 0.02, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if ep_mesh.ndim != 1:
            raise ValueError(f"ep_mesh must be 1-D, got a {ep_mesh.ndim}-D mesh")
        self.ep_size = ep_mesh.size()
        check_experts_fit(num_experts, self.ep_size)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.num_local_experts = num_experts // self.ep_size
        self.ep_rank = ep_mesh.get_local_rank()
        self.ep_mesh = ep_mesh
        self.init_std = init_std
        device = torch.device(ep_mesh.device_type, torch.cuda.current_device()) if ep_mesh.device_type == "cuda" \
            else torch.device(ep_mesh.device_type)
        El, I, h = self.num_local_experts, intermediate_size, hidden_size
        self.w_gate_up = nn.Parameter(self._shard(torch.empty(El, 2 * I, h, device=device, dtype=dtype)))
        self.w_down = nn.Parameter(self._shard(torch.empty(El, h, I, device=device, dtype=dtype)))
        self.reset_parameters()

    def _shard(self, local: Tensor) -> DTensor:
        return DTensor.from_local(local, self.ep_mesh, [Shard(0)], run_check=False)

    @property
    def first_expert(self) -> int:
        """Global id of this rank's first local expert."""
        return self.ep_rank * self.num_local_experts

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.w_gate_up, self.w_down):
            _local(w).normal_(0.0, self.init_std)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: RoutedExperts, ep_mesh: DeviceMesh) -> "ExpertParallelExperts":
        """This rank's block of ``experts`` (the full stacked weights, identical on every rank,
        e.g. built from the same seed or loaded from one checkpoint)."""
        w_gate_up = experts.w_gate_up
        new = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, ep_mesh,
                  experts.init_std, dtype=w_gate_up.dtype)
        lo, hi = new.first_expert, new.first_expert + new.num_local_experts
        _local(new.w_gate_up).copy_(experts.w_gate_up[lo:hi])
        _local(new.w_down).copy_(experts.w_down[lo:hi])
        new.train(experts.training)
        return new

    # ------------------------------------------------------------ forward
    def _experts_mlp(self, x: Tensor, offsets: Tensor) -> Tensor:
        """down(swiglu(gate_up(x))) over rows grouped by local expert."""
        w_gate_up, w_down = _local(self.w_gate_up), _local(self.w_down)
        hidden = ops.swiglu(ops.grouped_gemm(x, w_gate_up, offsets, trans_b=True))
        return ops.grouped_gemm(hidden, w_down, offsets, trans_b=True)

    def _run_local(self, x_recv: Tensor, recv_counts: Tensor) -> Tensor:
        """Rows received from every source rank ([D, E/D] counts: source-major, then local
        expert) -> their expert outputs, in the same (received) order."""
        D, El = recv_counts.shape
        R = x_recv.shape[0]
        if El == 1:  # one local expert: the rows are already one group
            offsets = torch.tensor([0, R], dtype=torch.int32, device=x_recv.device)
            return self._experts_mlp(x_recv, offsets)
        # regroup by local expert with the permute op (stable: source rank, then token order)
        local_ids = torch.arange(El, dtype=torch.int32, device=x_recv.device).repeat(D)
        local_ids = local_ids.repeat_interleave(recv_counts.reshape(-1), output_size=R).view(R, 1)
        x_loc, row_map, offsets = ops.permute(x_recv, local_ids, El)
        y_loc = self._experts_mlp(x_loc, offsets)
        ones = torch.ones(R, 1, dtype=torch.float32, device=x_recv.device)
        return ops.unpermute(y_loc, row_map, ones)

    def forward(self, x: Tensor, weights: Tensor, expert_ids: Tensor, impl: str = "dsmoe") -> Tensor:
        if impl != "dsmoe":
            raise ValueError(f"expert parallelism runs on the dsmoe ops; impl={impl!r} is not supported")
        E, D, El = self.num_experts, self.ep_size, self.num_local_experts
        x_perm, row_map, offsets = ops.permute(x, expert_ids, E)
        if D == 1:
            y_perm = self._experts_mlp(x_perm, offsets)
            return ops.unpermute(y_perm, row_map, weights)
        group = self.ep_mesh.get_group()
        send_counts = (offsets[1:] - offsets[:-1]).view(D, El)
        recv_counts = exchange_counts(send_counts, group)
        send_splits, recv_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        x_recv = all_to_all(x_perm, recv_splits, send_splits, group)
        y_recv = self._run_local(x_recv, recv_counts)
        y_perm = all_to_all(y_recv, send_splits, recv_splits, group)
        return ops.unpermute(y_perm, row_map, weights)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local_experts={self.first_expert}.."
                f"{self.first_expert + self.num_local_experts - 1}, ep_size={self.ep_size}, "
                f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}")


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Replaces the routed experts of every MoE layer of ``model`` (a
    :class:`dsmoe.DeepSeekMoEForCausalLM` or one :class:`dsmoe.DeepSeekMoELayer`, with the same
    weights on all ranks) by this rank's expert-parallel block, in place. The device-level
    balance loss (when its alpha > 0) then counts the ep ranks as its devices:
    ``config.num_expert_devices`` becomes the ep size (a different value > 1 is refused)."""
    ep = ep_mesh.size()
    config = model.config
    check_experts_fit(config.n_routed_experts, ep)
    layers = model.moe_layers() if hasattr(model, "moe_layers") else [model]
    for layer in layers:
        if layer.impl != "dsmoe":
            raise ValueError(f"expert parallelism runs on the dsmoe ops; the model has moe_impl={layer.impl!r}")
    uses_device_loss = config.device_aux_loss_alpha > 0 and ep > 1
    if uses_device_loss:
        if config.num_expert_devices not in (1, ep):
            raise ValueError(
                f"num_expert_devices={config.num_expert_devices} does not match ep={ep}: the device-level "
                "balance loss must group the experts as the expert-parallel ranks hold them"
            )
        config.num_expert_devices = ep
    for layer in layers:
        if not isinstance(layer.experts, ExpertParallelExperts):
            layer.experts = ExpertParallelExperts.from_experts(layer.experts, ep_mesh)
        if uses_device_loss:
            layer.device_balance_loss = DeviceBalanceLoss(
                layer.num_experts, layer.top_k, ep, config.device_aux_loss_alpha
            )
    return model


__all__ = ["ExpertParallelExperts", "apply_expert_parallel"]
