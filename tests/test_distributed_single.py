"""dsmoe.distributed's set-up and token exchange in the pytest process: a one-rank gloo group
for what needs a process group, stand-ins for what needs more ranks. The multi-rank behaviour
(expert parallelism, FSDP, DCP across rank counts) is test_distributed.py's, in rank processes."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from dsmoe.distributed import comm, mesh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank():
    """A one-process gloo world (destroyed after the test)."""
    assert not dist.is_initialized()
    ctx = mesh.init_distributed(0, 1, device="cpu", timeout_s=30, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        yield ctx
    finally:
        mesh.shutdown()
    assert not dist.is_initialized()


# ---- mesh shapes, checked before any process group

@pytest.mark.parametrize("args, dims", [
    ((1,), (1, 1)), ((6,), (1, 6)), ((6, None, 3), (2, 3)), ((6, 3, None), (3, 2)), ((6, 2, 3), (2, 3)),
    ((6, 6, 1), (6, 1)), ((6, 1, 6), (1, 6)),
])
def test_resolve_dims(args, dims):
    assert mesh.resolve_dims(*args) == dims


@pytest.mark.parametrize("args, message", [
    ((0,), "world size must be a positive integer, got 0"),
    ((True,), "world size must be a positive integer, got True"),
    ((2.0,), "world size must be a positive integer, got 2.0"),
    ((4, None, 0), "ep (expert-parallel size) must be a positive integer, got 0"),
    ((4, -1, None), "dp (data-parallel size) must be a positive integer, got -1"),
    ((4, False, 2), "dp (data-parallel size) must be a positive integer, got False"),
    ((4, None, 8), "ep=8 does not divide the world size 4"),
    ((4, 8, None), "dp=8 does not divide the world size 4"),
    ((4, 1, 2), "dp x ep = 1 x 2 = 2 does not match the world size 4"),
])
def test_resolve_dims_refusals(args, message):
    with pytest.raises(ValueError) as e:
        mesh.resolve_dims(*args)
    assert str(e.value) == message


def test_experts_fit_and_backends():
    mesh.check_experts_fit(8, 4)
    mesh.check_experts_fit(None, 3)  # a dense model: nothing to split
    mesh.check_experts_fit(3, 1)
    with pytest.raises(ValueError) as e:
        mesh.check_experts_fit(6, 4)
    assert str(e.value) == ("n_routed_experts=6 is not divisible by ep=4: every expert-parallel rank must hold the "
                            "same number of experts")
    assert mesh.backend_for("cuda") == "nccl" and mesh.backend_for("cpu") == "gloo"


def test_make_mesh_needs_a_process_group():
    with pytest.raises(RuntimeError) as e:
        mesh.make_mesh()
    assert str(e.value) == "make_mesh: torch.distributed is not initialised (call init_distributed first)"


@pytest.mark.parametrize("device, message", [
    ("meta", "device must be cpu or cuda, got 'meta'"),
    ("cuda", "device='cuda': this torch sees no CUDA device"),
])
def test_init_refuses_devices_before_any_group(device, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as e:
        mesh.init_distributed(0, 2, device=device, timeout_s=5)
    assert str(e.value) == message
    assert not dist.is_initialized()


# ---- a one-rank world

def test_one_rank_context(one_rank, monkeypatch):
    ctx = one_rank
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.dp, ctx.ep) == (0, 1, 0, 1, 1)
    assert ctx.device == torch.device("cpu") and ctx.is_main and ctx.backend == "gloo"
    assert ctx.mesh.mesh_dim_names == ("dp", "ep") and ctx.mesh.device_type == "cpu"
    assert mesh.mesh_dims(ctx.mesh) == (1, 1)
    assert mesh.make_mesh().device_type == "cpu"  # gloo: a CPU mesh
    from torch.distributed.device_mesh import init_device_mesh

    with pytest.raises(ValueError) as e:
        mesh.mesh_dims(init_device_mesh("cpu", (1,), mesh_dim_names=("x",)))
    assert str(e.value) == "expected a ('dp', 'ep') device mesh, got dims ('x',)"
    again = mesh.init_distributed(0, 1, local_rank=3, device="auto", timeout_s=30)  # reuses the group
    assert again.local_rank == 3 and again.device == torch.device("cpu")
    with pytest.raises(RuntimeError) as e:
        mesh.init_distributed(1, 2, device="cpu")
    assert str(e.value) == "init_distributed: a process group with another rank/world size already exists"
    with pytest.raises(RuntimeError, match="another rank/world size"):
        mesh.init_distributed(1, 1, device="cpu")
    assert dist.get_backend() == "gloo"


def test_the_timeout_reaches_the_group(monkeypatch):
    seen = {}
    real = dist.init_process_group

    def init(*a, **kw):
        seen.update(kw, backend=a[0] if a else kw.get("backend"))
        return real(*a, **kw)

    monkeypatch.setattr(dist, "init_process_group", init)
    mesh.init_distributed(0, 1, device="cpu", timeout_s=12.5, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        assert seen["timeout"].total_seconds() == 12.5 and seen["backend"] == "gloo"
        assert seen["rank"] == 0 and seen["world_size"] == 1 and seen["device_id"] is None
    finally:
        mesh.shutdown()
    mesh.shutdown()  # no group: nothing to do


def test_environment(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert mesh.env_world_size() == 1 and mesh.setup_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError) as e:
        mesh.env_world_size()
    assert str(e.value) == "WORLD_SIZE='two' is not an integer"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert mesh.env_world_size() == 1
    with pytest.raises(ValueError) as e:
        mesh.setup_from_env()
    assert str(e.value) == "WORLD_SIZE is set but RANK, MASTER_ADDR, MASTER_PORT is not (launch with torchrun or --nproc)"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="but MASTER_PORT is not"):
        mesh.setup_from_env()
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("LOCAL_RANK", "5")
    ctx = mesh.setup_from_env(device="cpu", timeout_s=30)
    try:
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.dp, ctx.ep) == (0, 1, 5, 1, 1)
    finally:
        mesh.shutdown()
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    ctx = mesh.setup_from_env(ep=1, dp=1, device="cpu", timeout_s=30)
    try:
        assert ctx.local_rank == 0  # LOCAL_RANK defaults to RANK
    finally:
        mesh.shutdown()


# ---- the token exchange

def test_all_to_all_on_one_rank(one_rank):
    comm.CommStats.reset()
    x = torch.randn(5, 3, requires_grad=True)
    y = comm.all_to_all(x, torch.tensor([5]), [5])
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    (y * torch.arange(5.0)[:, None]).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0)[:, None].expand(5, 3))
    assert comm.CommStats.calls == 2 and comm.CommStats.sent_bytes == 0  # forward + backward, all to itself
    counts = torch.tensor([[4, 1]])
    assert torch.equal(comm.exchange_counts(counts), counts) and comm.CommStats.calls == 3
    t = torch.randn(4, 2).t()  # non-contiguous rows are sent as their values
    assert torch.equal(comm.all_to_all(t, [2], [2]), t)
    comm.CommStats.reset()
    assert (comm.CommStats.calls, comm.CommStats.sent_bytes) == (0, 0)


def test_exchange_refusals(one_rank):
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError) as e:
        comm.all_to_all(x, [4, 0], [4])
    assert str(e.value) == ("all_to_all: output_splits (2) and input_splits (1) must have one entry per rank of the "
                            "group (1)")
    with pytest.raises(ValueError) as e:
        comm.all_to_all(x, [4], [4, 0])
    assert "output_splits (1) and input_splits (2)" in str(e.value)
    with pytest.raises(ValueError) as e:
        comm.all_to_all(x, [3], [3])
    assert str(e.value) == "all_to_all: input_splits sum to 3 but x has 4 rows"
    with pytest.raises(ValueError) as e:
        comm.exchange_counts(torch.zeros(2, 3, dtype=torch.int64))
    assert str(e.value) == "exchange_counts: send_counts.size(0) must be the group size 1, got 2"


def test_sent_bytes_count_rows_to_other_ranks(monkeypatch):
    """As rank 1 of 3: rows to ranks 0 and 2 count, rows to itself do not."""
    monkeypatch.setattr(comm.dist, "get_rank", lambda group=None: 1)
    comm.CommStats.reset()
    comm.CommStats._add(torch.zeros(9, 4, 2, dtype=torch.bfloat16), [2, 5, 2], group=None)
    assert comm.CommStats.sent_bytes == (2 + 2) * 4 * 2 * 2 and comm.CommStats.calls == 1
    comm.CommStats._add(torch.zeros(3, dtype=torch.int64), [1, 1, 1], group=None)
    assert comm.CommStats.sent_bytes == 64 + 2 * 8 and comm.CommStats.calls == 2
    comm.CommStats.reset()


def test_backward_sends_the_rows_back(monkeypatch):
    """With a stand-in exchange of two ranks: backward swaps the split lists."""
    calls = []

    def fake_exchange(x, output_splits, input_splits, group):
        calls.append((list(output_splits), list(input_splits)))
        return x.new_zeros((sum(output_splits),) + tuple(x.shape[1:])) + x.sum()

    monkeypatch.setattr(comm, "_exchange", fake_exchange)
    monkeypatch.setattr(comm.dist, "get_world_size", lambda group=None: 2)
    x = torch.ones(3, 2, requires_grad=True)
    y = comm.all_to_all(x, [4, 1], [2, 1])
    assert y.shape == (5, 2)
    y.sum().backward()
    assert calls == [([4, 1], [2, 1]), ([2, 1], [4, 1])]
    assert x.grad.shape == (3, 2)
