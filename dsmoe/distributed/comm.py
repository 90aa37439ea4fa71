"""The token exchange of expert parallelism: a differentiable variable-size all-to-all.

``all_to_all(x, output_splits, input_splits, group)`` sends rows ``x[sum(input_splits[:j]) :
sum(input_splits[:j+1])]`` to rank j of ``group`` and returns the rows received, grouped by
source rank. Its backward is the reverse exchange (the gradient rows travel back to where the
rows came from), so autograd sees one step. Split sizes vary per step; they are exchanged
first with :func:`exchange_counts` (the one host sync of an expert-parallel layer: the output
size of an all-to-all must be known on the host).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class CommStats:
    """Bytes this rank sent to other ranks through :func:`all_to_all` (forward and backward)
    and :func:`exchange_counts`; the benchmark reads and resets it."""

    sent_bytes: int = 0
    calls: int = 0

    @classmethod
    def reset(cls) -> None:
        cls.sent_bytes = 0
        cls.calls = 0

    @classmethod
    def _add(cls, x: Tensor, input_splits: Sequence[int], group) -> None:
        me = dist.get_rank(group)
        row_bytes = x.element_size() * math.prod(x.shape[1:])
        cls.sent_bytes += sum(n for j, n in enumerate(input_splits) if j != me) * row_bytes
        cls.calls += 1


def _exchange(x: Tensor, output_splits: List[int], input_splits: List[int], group) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    CommStats._add(x, input_splits, group)
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, output_splits: List[int], input_splits: List[int], group) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # the rows go back: what was received is sent, what was sent is received
        grad_x = _exchange(grad_out, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_x, None, None, None


def all_to_all(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group=None) -> Tensor:
    """Differentiable ``all_to_all_single`` over the rows of ``x`` (see the module docstring)."""
    output_splits, input_splits = [int(n) for n in output_splits], [int(n) for n in input_splits]
    size = dist.get_world_size(group)
    if len(output_splits) != size or len(input_splits) != size:
        raise ValueError(
            f"all_to_all: output_splits ({len(output_splits)}) and input_splits ({len(input_splits)}) "
            f"must have one entry per rank of the group ({size})"
        )
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"all_to_all: input_splits sum to {sum(input_splits)} but x has {x.shape[0]} rows")
    return _AllToAll.apply(x, output_splits, input_splits, group)


def exchange_counts(send_counts: Tensor, group=None) -> Tensor:
    """``send_counts`` [D, ...] (row j: what this rank sends to rank j) -> [D, ...] (row j: what
    rank j sends to this rank). Integer counts, not differentiable."""
    size = dist.get_world_size(group)
    if send_counts.shape[0] != size:
        raise ValueError(f"exchange_counts: send_counts.size(0) must be the group size {size}, got {send_counts.shape[0]}")
    send = send_counts.contiguous()
    recv = torch.empty_like(send)
    CommStats._add(send, [1] * size, group)
    dist.all_to_all_single(recv, send, group=group)
    return recv


__all__ = ["CommStats", "all_to_all", "exchange_counts"]
