"""dsmoe.distributed's set-up and token exchange in the pytest process: a one-rank gloo group
for what needs a process group, stand-ins for what needs more ranks. The multi-rank behaviour
(expert parallelism, FSDP, DCP across rank counts) is test_distributed.py's, in rank processes."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dsmoe
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
    got = mesh.resolve_dims(*args)
    assert got == dims and all(type(n) is int for n in got)  # sizes of a mesh: whole numbers


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


def test_init_distributed_and_make_mesh_with_stand_ins(monkeypatch):
    """Four ranks (stand-ins for torch.distributed, the mesh and CUDA): the process group's
    arguments, the mesh's shape and device type, and the CUDA device a local rank takes."""
    import datetime
    import types

    groups, meshes, devices = [], [], []
    monkeypatch.setattr(mesh.dist, "is_initialized", lambda: bool(groups))
    monkeypatch.setattr(mesh.dist, "init_process_group", lambda backend, **kw: groups.append((backend, kw)))
    monkeypatch.setattr(mesh.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(mesh.dist, "get_rank", lambda: 2)
    monkeypatch.setattr(mesh.dist, "get_backend", lambda: groups[-1][0])
    monkeypatch.setattr(mesh, "init_device_mesh", lambda *a, **kw: meshes.append((a, kw)) or "mesh")
    ctx = mesh.init_distributed(2, 4, dp=2, device="cpu", timeout_s=9, init_method="tcp://h:1")
    assert groups == [("gloo", dict(init_method="tcp://h:1", rank=2, world_size=4,
                                     timeout=datetime.timedelta(seconds=9), device_id=None))]
    assert meshes == [(("cpu", (2, 2)), dict(mesh_dim_names=("dp", "ep")))]
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.mesh, ctx.dp, ctx.ep) == (
        2, 4, 2, torch.device("cpu"), "mesh", 2, 2)
    # make_mesh on its own: one size given, the other from the world; the device type from the backend
    meshes.clear()
    mesh.make_mesh(dp=2)
    mesh.make_mesh(ep=4)
    mesh.make_mesh(ep=2)
    groups.append(("nccl", {}))
    mesh.make_mesh(dp=1, ep=4)
    assert meshes == [(("cpu", (2, 2)), dict(mesh_dim_names=("dp", "ep"))),
                      (("cpu", (1, 4)), dict(mesh_dim_names=("dp", "ep"))),
                      (("cpu", (2, 2)), dict(mesh_dim_names=("dp", "ep"))),
                      (("cuda", (1, 4)), dict(mesh_dim_names=("dp", "ep")))]
    assert mesh.mesh_dims(types.SimpleNamespace(mesh_dim_names=("dp", "ep"), size=lambda i: (2, 3)[i])) == (2, 3)
    # on GPUs (device None: CUDA when there is one): local rank 3 of 2 GPUs per node takes cuda:1
    groups.clear()
    meshes.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: devices.append(d))
    ctx = mesh.init_distributed(2, 4, local_rank=3, ep=4)
    assert devices == [torch.device("cuda", 1)] and ctx.device == torch.device("cuda", 1)
    assert groups[0][0] == "nccl" and groups[0][1]["device_id"] == torch.device("cuda", 1)
    assert meshes == [(("cuda", (1, 4)), dict(mesh_dim_names=("dp", "ep")))]


def test_setup_from_env_passes_everything_on(monkeypatch):
    seen = []
    monkeypatch.setattr(mesh, "init_distributed", lambda *a, **kw: seen.append((a, kw)) or "ctx")
    for k, v in (("WORLD_SIZE", "4"), ("RANK", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "9")):
        monkeypatch.setenv(k, v)
    assert mesh.setup_from_env(ep=2, dp=2, device="cpu", timeout_s=7) == "ctx"
    assert seen == [((2, 4), dict(local_rank=1, dp=2, ep=2, device="cpu", timeout_s=7, init_method="env://"))]


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


def test_a_subgroup_is_used_for_every_call(monkeypatch):
    """As global rank 5, rank 1 of a 3-rank expert group: every rank, size and exchange is the
    group's (an expert group is a subgroup when dp > 1)."""
    group, calls = object(), []
    monkeypatch.setattr(comm.dist, "get_rank", lambda g=None: 1 if g is group else 5)
    monkeypatch.setattr(comm.dist, "get_world_size", lambda g=None: 3 if g is group else 6)

    def exchange(out, x, output_splits=None, input_splits=None, group=None):
        calls.append((output_splits, input_splits, group))
        out.copy_(x[: out.shape[0]] if out.shape[0] <= x.shape[0] else out)

    monkeypatch.setattr(comm.dist, "all_to_all_single", exchange)
    comm.CommStats.reset()
    counts = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert torch.equal(comm.exchange_counts(counts, group=group), counts)
    # one count row to each of the two other ranks of the group
    assert calls == [(None, None, group)] and comm.CommStats.sent_bytes == 2 * 2 * 8
    x = torch.zeros(6, 4, requires_grad=True)
    comm.all_to_all(x, [2, 2, 2], [1, 4, 1], group=group).sum().backward()
    assert calls[1:] == [([2, 2, 2], [1, 4, 1], group), ([1, 4, 1], [2, 2, 2], group)]
    # rows to ranks 0 and 2 of the group (not to global rank 1): (1 + 1) forward, (2 + 2) back
    assert comm.CommStats.sent_bytes == 32 + (1 + 1) * 16 + (2 + 2) * 16 and comm.CommStats.calls == 3
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


# ---- the training loop's distributed steps, on one rank

def test_distributed_training_on_one_rank(one_rank, tmp_path, monkeypatch):
    import dsmoe
    from dsmoe.cli.distributed import launch as launch_mod
    from dsmoe.cli.distributed.training import DistributedTraining
    from dsmoe.distributed import checkpoint as dckpt
    from dsmoe.model import DeepSeekMoEForCausalLM

    run = DistributedTraining(one_rank)
    assert run.rank == 0 and run.world_size == 1 and run.is_main and run.device == torch.device("cpu")
    assert run.describe() == "1 processes (gloo), mesh dp 1 x ep 1"
    assert run.mean(3.5) == 3.5 and run.mean(torch.tensor([1.0, 2.0])) == [1.0, 2.0]
    assert run.broadcast({"a": 1}) == {"a": 1}
    assert run.any(True) is True and run.any(False) is False
    monkeypatch.delenv(launch_mod.STOP_FILE_ENV, raising=False)
    assert run.should_stop(False) is False and run.should_stop(True) is True
    monkeypatch.setenv(launch_mod.STOP_FILE_ENV, str(tmp_path / "stop"))
    (tmp_path / "stop").write_text("")
    assert run.should_stop(False) is True  # the --nproc launcher asked
    run.barrier()
    x = torch.arange(6).reshape(3, 2)
    assert torch.equal(run.local_batch(x), x)

    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(dsmoe.get_preset("tiny"))
    run.check_config(model.config)
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.9, 0.95))
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    model(ids, labels=ids).loss.backward()
    opt.step()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped, new_opt = run.wrap(model, opt)
    assert type(new_opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in new_opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.95) and g["lr"] == 0.01 for g in new_opt.param_groups)
    assert len(new_opt.state) == len(opt.state)  # the single-process state carried over
    wrapped(ids, labels=ids).loss.backward()
    norm = run.clip_grad_norm_(wrapped.parameters(), 1.0)
    assert float(norm) > 0
    new_opt.step()

    path = run.save(tmp_path / "ck", wrapped, new_opt, {"step": 2, "note": "x"},
                    extra_files=lambda d: (Path(d) / "extra.txt").write_text("e"))
    assert path == tmp_path / "ck" and dckpt.is_dcp_checkpoint(path)
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 2, "note": "x"}
    assert (path / "extra.txt").read_text() == "e" and dckpt.read_meta(path)["extra"] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ck")) == ["ck"]
    run.save(tmp_path / "ck", wrapped, new_opt, {"step": 3})  # over an existing one: replaced whole
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 3} and not (path / "extra.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ck")) == ["ck"]
    # the optimizer's state is in it: a fresh optimizer gets the moments back
    fresh = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in new_opt.param_groups],
                              lr=0.01)
    assert run.load(path, wrapped, fresh)["has_optimizer"] is True
    assert len(fresh.state) == len(new_opt.state) > 0
    for p_new, p_fresh in zip(new_opt.state.values(), fresh.state.values()):
        assert torch.equal(p_new["exp_avg"], p_fresh["exp_avg"])

    # killed between its two renames: the checkpoint is only at step-N.old-<tag>; resuming the
    # run (dsmoe.cli.checkpoint.clean_partial_saves) puts it back; a killed save's .tmp-<tag> goes
    from dsmoe.cli import checkpoint as cli_ckpt

    step = tmp_path / "run" / "checkpoints" / "step-000004"
    run.save(step, wrapped, new_opt, {"step": 4})
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second rename never happens
        real_replace(src, dst)

    import types

    from dsmoe.cli.distributed import training as training_mod

    monkeypatch.setattr(training_mod, "os", types.SimpleNamespace(replace=replace))  # the save's renames only
    with pytest.raises(KeyboardInterrupt):
        run.save(step, wrapped, new_opt, {"step": 4, "again": True})
    monkeypatch.undo()
    left = sorted(p.name for p in step.parent.iterdir())
    assert len(left) == 2 and left[0].startswith("step-000004.old-") and left[1].startswith("step-000004.tmp-")
    assert left[0].split("-")[-1] == left[1].split("-")[-1] == calls[0].split("-")[-1]  # one tag per save
    done = cli_ckpt.clean_partial_saves(tmp_path / "run")
    assert sorted(p.name for p in step.parent.iterdir()) == ["step-000004"] and len(done) == 2
    assert json.loads((step / "trainer_state.json").read_text()) == {"step": 4}  # the complete one

    plain = run.export_hf(wrapped, tmp_path / "hf")
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert any(not torch.equal(plain.state_dict()[k], reference[k]) for k in reference)  # it trained on
    assert run.load(path, wrapped, new_opt)["extra"] == {"step": 3}


def test_local_batch_splits_rows_by_rank():
    from dsmoe.cli.distributed.training import DistributedTraining

    def part(rank, world, *tensors):
        ctx = mesh.DistContext(rank, world, rank, torch.device("cpu"), None, 1, world)
        return DistributedTraining(ctx).local_batch(*tensors)

    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    assert [part(r, 3, y).tolist() for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    xs, ys = part(1, 2, x, y)
    assert xs.tolist() == [[6, 7], [8, 9], [10, 11]] and ys.tolist() == [3, 4, 5]
    with pytest.raises(ValueError) as e:
        part(0, 4, y)
    assert str(e.value) == "the batch size 6 is not divisible by the 4 processes (--batch-size is the global batch)"
    assert not DistributedTraining(mesh.DistContext(2, 3, 0, torch.device("cpu"), None, 1, 3)).is_main


def test_experts_must_split_over_ep():
    from dsmoe.cli.distributed.training import DistributedTraining

    import dsmoe

    run = DistributedTraining(mesh.DistContext(0, 4, 0, torch.device("cpu"), None, 1, 4))
    run.check_config(dsmoe.get_preset("tiny", n_routed_experts=8))
    with pytest.raises(ValueError, match="n_routed_experts=6 is not divisible by ep=4"):
        run.check_config(dsmoe.get_preset("tiny", n_routed_experts=6))


def test_distributed_training_from_the_environment(monkeypatch):
    from dsmoe.cli.distributed import training as training_mod

    calls, ctx = [], object()
    monkeypatch.setattr(training_mod, "setup_from_env", lambda **kw: calls.append(kw) or ctx)
    run = training_mod.DistributedTraining.from_env(ep=2, device="cpu", timeout_s=5)
    assert isinstance(run, training_mod.DistributedTraining) and run.ctx is ctx
    training_mod.DistributedTraining.from_env()
    assert calls == [dict(ep=2, device="cpu", timeout_s=5), dict(ep=None, device=None, timeout_s=1800.0)]
    monkeypatch.setattr(training_mod, "setup_from_env", lambda **kw: None)  # not launched distributed
    assert training_mod.DistributedTraining.from_env() is None


# ---- FSDP helpers that need no second rank

def test_expert_placement():
    from torch.distributed.tensor import Shard

    from dsmoe.distributed.fsdp import _expert_placement

    # 4 local experts over dp=2: split the experts; 3 experts: split each matrix's rows
    assert _expert_placement(2)(torch.empty(4, 6, 8)) == Shard(0)
    assert _expert_placement(2)(torch.empty(3, 6, 5)) == Shard(1)
    assert _expert_placement(3)(torch.empty(6, 4, 8)) == Shard(0)
    with pytest.raises(ValueError) as e:
        _expert_placement(2)(torch.empty(3, 5, 8))
    assert str(e.value) == ("cannot shard the experts over dp=2: neither the 3 local experts nor the 5 rows of each "
                            "expert matrix divide evenly")


def test_expert_placement_of_a_sharded_parameter(one_rank):
    from torch.distributed.tensor import DTensor, Shard

    from dsmoe.distributed.fsdp import _expert_placement, _mesh_key

    ep = one_rank.mesh["ep"]
    w = DTensor.from_local(torch.empty(3, 4, 6), ep, [Shard(0)], run_check=False)
    # the experts of this rank's block (3) decide; with 2 they do not split, the 4 rows do
    assert _expert_placement(2)(w) == Shard(1) and _expert_placement(3)(w) == Shard(0)
    assert _mesh_key(w) is ep and _mesh_key(torch.empty(1)) is None


def test_grad_norm_and_clipping_against_torch():
    from dsmoe.distributed.fsdp import clip_grad_norm_, grad_norm

    torch.manual_seed(0)

    def params():
        ps = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(2))]
        for p in ps[:3]:
            p.grad = torch.randn_like(p) * 3
        return ps  # the last without a gradient

    for norm_type in (2.0, 1.0, 3.0, float("inf")):
        a, b = params(), params()
        for x, y in zip(a, b):
            y.data.copy_(x.data)
            if x.grad is not None:
                y.grad = x.grad.clone()
        grads = [p.grad for p in a if p.grad is not None]
        want = (max(g.abs().max() for g in grads) if norm_type == float("inf")
                else sum((g.abs() ** norm_type).sum() for g in grads) ** (1 / norm_type))
        assert grad_norm(a, norm_type) == pytest.approx(float(want), rel=1e-5)
        total = clip_grad_norm_(a, 1.5, norm_type)
        expected = torch.nn.utils.clip_grad_norm_(b, 1.5, norm_type)
        assert float(total) == pytest.approx(float(expected), rel=1e-5)
        for x, y in zip(a, b):
            assert (x.grad is None) == (y.grad is None) and (x.grad is None or torch.allclose(x.grad, y.grad))
    ps = params()
    assert float(grad_norm(ps)) == pytest.approx(float(torch.nn.utils.get_total_norm([p.grad for p in ps[:3]])))
    single = torch.nn.Parameter(torch.zeros(2))
    single.grad = torch.tensor([3.0, 4.0])
    assert float(grad_norm(single)) == pytest.approx(5.0)  # one tensor, the default 2-norm
    assert float(clip_grad_norm_(single, 10.0)) == pytest.approx(5.0) and torch.equal(single.grad, torch.tensor([3.0, 4.0]))
    assert float(clip_grad_norm_(single, 5.0)) == pytest.approx(5.0)  # at the limit: the same coefficient as torch
    assert torch.equal(single.grad, torch.tensor([3.0, 4.0]).mul_(5.0 / (5.0 + 1e-6)))  # torch's coefficient
    none = torch.nn.Parameter(torch.zeros(2))
    assert grad_norm([none]).shape == () and float(grad_norm([none])) == 0.0


def test_redistribute_warnings_are_quiet_only_inside():
    import logging

    from dsmoe.distributed.fsdp import _quiet_redistribute

    log = logging.getLogger("torch.distributed.tensor._redistribute")
    before = log.level
    with _quiet_redistribute():
        assert log.level == logging.ERROR
    assert log.level == before


def test_unwrapped_copy_of_a_plain_model():
    import dsmoe
    from dsmoe.distributed.fsdp import full_state_dict, unwrapped_copy
    from dsmoe.model import DeepSeekMoEForCausalLM

    torch.manual_seed(0)
    for tie in (False, True):
        model = DeepSeekMoEForCausalLM(dsmoe.get_preset("tiny", tie_word_embeddings=tie), moe_impl="reference")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.eval()
        copy = unwrapped_copy(model, state)
        assert not copy.training and copy.moe_impl == "dsmoe"  # the model's mode; the fast path
        assert all(torch.equal(copy.state_dict()[k], v) for k, v in state.items())
        assert (copy.lm_head.weight is copy.model.embed_tokens.weight) == tie
        model.train()
        assert unwrapped_copy(model, state).training
        gathered = unwrapped_copy(model)  # no state given: the model's own, gathered
        assert all(torch.equal(gathered.state_dict()[k], v) for k, v in state.items())
        with pytest.raises(RuntimeError):  # strict: a missing weight is an error, not a random one
            unwrapped_copy(model, {k: v for k, v in state.items() if k != "model.norm.weight"})


# ---- expert parallelism on one rank: what a user sees of the module itself


def test_expert_parallel_experts_on_one_rank(one_rank):
    from dsmoe.distributed import ExpertParallelExperts

    ep_mesh = one_rank.mesh["ep"]
    torch.manual_seed(0)
    fresh = ExpertParallelExperts(16, 32, 24, ep_mesh)  # RoutedExperts' default init: N(0, 0.02)
    w = torch.cat([fresh.w_gate_up.to_local().flatten(), fresh.w_down.to_local().flatten()])
    assert w.dtype == torch.float32 and w.numel() == 16 * 3 * 24 * 32
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.0005
    assert fresh.init_std == 0.02
    assert repr(fresh).endswith(
        "(num_experts=16, local_experts=0..15, ep_size=1, hidden_size=32, intermediate_size=24)")
    wide = ExpertParallelExperts(4, 8, 6, ep_mesh, init_std=0.5, dtype=torch.float64)
    assert wide.w_gate_up.to_local().dtype == torch.float64
    assert wide.w_down.to_local().dtype == torch.float64 and abs(wide.w_down.to_local().std().item() - 0.5) < 0.15

    # from a RoutedExperts: the same weights, forward with the default impl equals the original
    experts = dsmoe.RoutedExperts(8, 16, 12, init_std=0.1).eval()
    ep = ExpertParallelExperts.from_experts(experts, ep_mesh)
    assert not ep.training and ep.init_std == 0.1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 16, generator=g)
    ids = torch.randint(0, 8, (11, 2), generator=g, dtype=torch.int32)
    weights = torch.rand(11, 2, generator=g)
    torch.testing.assert_close(ep(x, weights, ids), experts(x, weights, ids), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError) as e:
        ep(x, weights, ids, impl="reference")
    assert str(e.value) == "expert parallelism runs on the dsmoe ops; impl='reference' is not supported"
    with pytest.raises(ValueError) as e:
        ExpertParallelExperts(8, 16, 12, one_rank.mesh)
    assert str(e.value) == "ep_mesh must be 1-D, got a 2-D mesh"


def test_apply_expert_parallel_refuses_other_backends(one_rank):
    from dsmoe.distributed import apply_expert_parallel

    model = dsmoe.DeepSeekMoEForCausalLM(dsmoe.get_preset("tiny", num_hidden_layers=2), moe_impl="reference")
    with pytest.raises(ValueError) as e:
        apply_expert_parallel(model, one_rank.mesh["ep"])
    assert str(e.value) == "expert parallelism runs on the dsmoe ops; the model has moe_impl='reference'"
