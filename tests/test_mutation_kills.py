"""Tests written for the mutants of tools/mutate_kernels.py and tools/mutation_python.sh that the
rest of the suite let through (docs/mutation_testing.md names each). Every expectation here is
independent of the code under test: plain PyTorch, or a value worked out by hand."""
from __future__ import annotations

import pytest
import torch

from dsmoe import ops


def test_permute_dropped_rows_are_zero_in_reused_memory():
    """Rows of dropped ids (>= num_experts) are zeros even when the output's memory comes back from
    the CPU caching allocator holding NaNs (fresh pages are zero anyway, so a test on fresh memory
    cannot tell a zero-fill from none). 2 MiB outputs: large enough to be cached."""
    T, k, h, E = 1024, 2, 256, 4
    ids = torch.arange(T * k, dtype=torch.int32).view(T, k) % E
    poison = ops.permute(torch.full((T, h), float("nan")), ids, E)[0]
    assert bool(poison.isnan().all())
    del poison
    ids[::3, 1] = E + 1  # every third token's second slot belongs to another rank
    x = torch.randn(T, h)
    x_perm, row_map, offsets = ops.permute(x, ids, E)
    kept = int(offsets[-1])
    assert kept == int((ids < E).sum())
    assert torch.equal(x_perm[kept:], torch.zeros(T * k - kept, h))
    token = torch.arange(T).repeat_interleave(k)
    assert torch.equal(x_perm[row_map.long()[ids.flatten() < E]], x[token[ids.flatten() < E]])
