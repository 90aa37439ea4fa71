"""dsmoe.distributed on CPU with gloo: expert parallelism, FSDP2 x EP training and DCP checkpoints.

The tests start their own rank processes (subprocess, torchrun's environment variables, no
torchrun): this file run as a script is the worker. Two jobs, each run once per session:

* job "a", 2 ranks: the expert-parallel layer against the single-process layer (outputs, aux
  loss, gradients of every parameter and of the input; 4 local experts and 1, skewed routing,
  different token counts per rank), training under dp x ep = 1 x 2 and 2 x 1 against one
  process on the concatenated batch, refused set-ups, and a DCP save (with optimizer state).
* job "b", 4 ranks (dp x ep = 2 x 2): resumes job a's checkpoint (written by 2 ranks), checks
  weights, trains on and compares with one process resumed from the same checkpoint; saves;
  trains a model whose single local expert FSDP must shard by rows.

Every collective runs under a 60 s process-group timeout and each job under a hard timeout.
The pytest process then loads both checkpoints in one process and converts them to and from
the Hugging Face layout.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dsmoe
from dsmoe.distributed import checkpoint as dckpt
from dsmoe.distributed.mesh import check_experts_fit, init_distributed, resolve_dims

JOB_TIMEOUT_S = 300
COLLECTIVE_TIMEOUT_S = 60
LR, CLIP, BATCH, SEQ = 1e-2, 0.3, 2, 8
TOL_PARAM, TOL_LOSS, TOL_GRAD = 2e-4, 1e-5, 1e-5


def tiny_config(**overrides) -> dsmoe.DeepSeekMoEConfig:
    """3 layers (one dense, two MoE), 8 routed experts top-2 + 1 shared, both balance losses."""
    base = dict(num_hidden_layers=3, aux_loss_alpha=0.01, device_aux_loss_alpha=0.02)
    return dsmoe.get_preset("tiny", **{**base, **overrides})


def global_batches(world: int, steps: int, seed: int):
    """``steps`` batches of world * BATCH sequences; rank r takes rows r*BATCH:(r+1)*BATCH."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        w = torch.randint(0, 64, (world * BATCH, SEQ + 1), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def train(model, optimizer, batches, rank=None, world=1):
    """Steps of CE + aux loss with clipping; ``rank`` given: distributed, on this rank's rows.
    Returns the losses (averaged over ranks) and gradient norms."""
    from dsmoe.distributed import clip_grad_norm_

    losses, norms = [], []
    for x, y in batches:
        if rank is not None:
            x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
        out = model(x)
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1)) + out.aux_loss
        loss.backward()
        if rank is None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        else:
            norm = clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if rank is not None:
            import torch.distributed as dist

            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        norms.append(float(norm))
    return losses, norms


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---------------------------------------------------------------- worker side


def _reduce_max(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _ep_layer_case(mesh, E: int, k: int, skew: bool, seed: int) -> dict:
    """EP layer on this rank's tokens vs the single-process layer on every rank's tokens."""
    import torch.distributed as dist
    from dsmoe.distributed import apply_expert_parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config(n_routed_experts=E, num_experts_per_tok=k, num_expert_devices=world)
    torch.manual_seed(seed)
    ref = dsmoe.DeepSeekMoELayer(cfg).train()
    if skew:  # equal logits: every token picks expert 0 (ties go to the lower id)
        with torch.no_grad():
            ref.gate.weight.zero_()
    layer = copy.deepcopy(ref)
    apply_expert_parallel(layer, mesh["ep"])
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(2, 5 + 2 * r, cfg.hidden_size, generator=g, dtype=torch.float64).float() for r in range(world)]
    gs = [torch.randn(x.shape, generator=g) for x in xs]

    x_ref = [x.clone().requires_grad_(True) for x in xs]
    total, outs_ref = 0.0, []
    for x, w in zip(x_ref, gs):
        out = ref(x)
        outs_ref.append(out)
        total = total + (out.hidden_states * w).sum() + out.aux_loss
    total.backward()

    x = xs[rank].clone().requires_grad_(True)
    out = layer(x)
    ((out.hidden_states * gs[rank]).sum() + out.aux_loss).backward()

    result = {
        "out": (out.hidden_states - outs_ref[rank].hidden_states).abs().max().item(),
        "aux": abs(out.aux_loss.item() - outs_ref[rank].aux_loss.item()),
        "grad_x": (x.grad - x_ref[rank].grad).abs().max().item(),
        "load": int((out.tokens_per_expert != outs_ref[rank].tokens_per_expert).sum()),
    }
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    grad_err = 0.0
    for name, p in layer.named_parameters():
        grad = p.grad
        if hasattr(grad, "full_tensor"):  # expert weights: the owner holds every rank's share
            grad = grad.full_tensor()
        else:  # replicated weights: each rank holds its own tokens' share
            grad = grad.clone()
            dist.all_reduce(grad)
        grad_err = max(grad_err, (grad - grads_ref[name]).abs().max().item())
    result["grad_params"] = grad_err
    result["num_params"] = len(grads_ref)
    return {key: _reduce_max(v) for key, v in result.items()}


@contextlib.contextmanager
def _mlp_on_own_gemm():
    """Every MLP (dense layers, shared experts) on its one-group grouped GEMM path, whatever the
    CPU and row count (FSDP2 hands the MLP unsharded parameters; the path must see them).
    Yields the list of the MLP modules (ids) whose forward took the path, one entry per call."""
    from dsmoe.backend import BACKENDS, use_backend

    backend, calls = BACKENDS["dsmoe"], []
    forward = backend._own_cpu_gemm_mlp

    def counted(mlp, *args):
        calls.append(id(mlp))
        return forward(mlp, *args)

    backend.own_cpu_gemm, backend._own_cpu_gemm_mlp = (lambda dtype: True), counted
    try:
        with use_backend(dense_own_gemm_min_rows=1):
            yield calls
    finally:
        del backend.own_cpu_gemm, backend._own_cpu_gemm_mlp  # the class's methods again


def _train_case(dp: int, ep: int, steps: int = 3, **overrides) -> dict:
    import torch.distributed as dist
    from dsmoe.distributed import full_state_dict, make_mesh, wrap_model

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config(num_expert_devices=ep, **overrides)
    batches = global_batches(world, steps, seed=7)
    torch.manual_seed(0)
    ref = dsmoe.DeepSeekMoEForCausalLM(cfg).train()
    model = copy.deepcopy(ref)
    ref_losses, ref_norms = train(ref, make_optimizer(ref), batches)
    wrap_model(model, make_mesh(dp, ep, "cpu"))
    opt = make_optimizer(model)
    losses, norms = train(model, opt, batches, rank, world)
    state = full_state_dict(model, rank0_only=False)
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "norm": max(abs(a - b) for a, b in zip(norms, ref_norms)),
        "max_ref_norm": max(ref_norms),
        "params": _reduce_max(max_diff(state, ref.state_dict())),
    }, model, opt


def _refusals(mesh) -> dict:
    from dsmoe.distributed import apply_expert_parallel, wrap_model

    out = {}
    bad_e = dsmoe.DeepSeekMoEForCausalLM(tiny_config(n_routed_experts=3, num_experts_per_tok=2))
    try:
        wrap_model(bad_e, mesh)
        out["experts"] = "accepted"
    except ValueError as e:
        out["experts"] = str(e)
    try:  # the model itself (wrap_model checks first), left as it was
        apply_expert_parallel(bad_e, mesh["ep"])
        out["experts_apply"] = "accepted"
    except ValueError as e:
        out["experts_apply"] = str(e)
    out["experts_apply_devices"] = bad_e.config.num_expert_devices
    bad_d = dsmoe.DeepSeekMoEForCausalLM(tiny_config(num_expert_devices=4))
    try:
        apply_expert_parallel(bad_d, mesh["ep"])
        out["devices"] = "accepted"
    except ValueError as e:
        out["devices"] = str(e)
    from dsmoe.distributed import ExpertParallelExperts

    try:  # built directly, not through apply_expert_parallel's own check
        ExpertParallelExperts(3, 8, 4, mesh["ep"])
        out["module_experts"] = "accepted"
    except ValueError as e:
        out["module_experts"] = str(e)
    # accepted: num_expert_devices 1 (one device, the default) becomes the ep size when the
    # device-level loss is on; with its alpha 0 the config and the layers keep what they had
    one = dsmoe.DeepSeekMoEForCausalLM(tiny_config(num_expert_devices=1))
    apply_expert_parallel(one, mesh["ep"])
    out["devices_from_one"] = [one.config.num_expert_devices] + [
        layer.device_balance_loss.num_devices for layer in one.moe_layers()]
    off = dsmoe.DeepSeekMoEForCausalLM(tiny_config(num_expert_devices=1, device_aux_loss_alpha=0.0))
    apply_expert_parallel(off, mesh["ep"])
    out["device_loss_off"] = [off.config.num_expert_devices] + [
        layer.device_balance_loss is None for layer in off.moe_layers()]
    return out


def _facade_case(ctx, model, state: dict, hf_dir: Path) -> dict:
    """The command line's DistributedTraining collectives, each seen from every rank."""
    from dsmoe.cli.distributed.training import DistributedTraining

    facade = DistributedTraining(ctx)
    rank = ctx.rank
    plain = facade.export_hf(model, hf_dir)
    got = facade.broadcast(rank + 10)
    one_says_so = float(facade.any(rank == 1))
    return {
        "broadcast": [-_reduce_max(-got), _reduce_max(got)],  # the fewest and most over the ranks
        "any": [-_reduce_max(-one_says_so), _reduce_max(float(facade.any(False)))],
        # a float32 scalar whose sum over the ranks is not a float32 (2**24 + 1): summed in float64
        "mean_scalar": facade.mean(torch.tensor(2.0**24 if rank == 0 else 1.0)),
        "mean_vector": facade.mean(torch.tensor([float(rank), 4.0 * rank])),
        # rank 0 holds the gathered copy (equal to the full state), every other rank None
        "export_returns": _reduce_max(float((plain is not None) != (rank == 0))),
        "export_diff": max_diff(plain.state_dict(), state) if rank == 0 else None,
    }


def worker_main(job: str, out_dir: Path) -> None:
    import torch.distributed as dist
    from dsmoe.distributed import full_state_dict, setup_from_env, shutdown, wrap_model
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    ctx = setup_from_env(ep=2, device="cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
    rank, world = ctx.rank, ctx.world_size
    report: dict = {}
    t0 = time.time()
    if job == "a":
        report["layer_4_local"] = _ep_layer_case(ctx.mesh, E=8, k=2, skew=False, seed=3)
        report["layer_1_local_skewed"] = _ep_layer_case(ctx.mesh, E=2, k=1, skew=True, seed=4)
        report["refused"] = _refusals(ctx.mesh)
        report["train_2x1"] = _train_case(2, 1)[0]
        with _mlp_on_own_gemm() as calls:
            case, sharded, _ = _train_case(2, 1)
        # calls of the FSDP2-wrapped model's own MLPs (the single-process reference's excluded),
        # the fewest over the ranks
        mine = {id(m) for m in sharded.modules() if isinstance(m, dsmoe.layers.MLP)}
        case["own_gemm_calls"] = -_reduce_max(-sum(c in mine for c in calls))
        report["train_2x1_mlp_on_own_gemm"] = case
        report["train_1x2"], model, opt = _train_case(1, 2)
        dckpt.save(out_dir / "ckpt_a", model, opt, extra={"step": 3})
        state = full_state_dict(model)
        if rank == 0:
            save_file(state, str(out_dir / "ckpt_a_full.safetensors"))
        report["facade"] = _facade_case(ctx, model, state, out_dir / "hf_a")
    elif job == "b":
        cfg = tiny_config(num_expert_devices=2)
        torch.manual_seed(123)  # other weights than the checkpoint's
        model = wrap_model(dsmoe.DeepSeekMoEForCausalLM(cfg).train(), ctx.mesh)
        opt = make_optimizer(model)
        meta = dckpt.load(out_dir / "ckpt_a", model, opt)
        from safetensors.torch import load_file

        saved = load_file(str(out_dir / "ckpt_a_full.safetensors"))
        report["resume"] = {"written_by": meta["world_size"], "mesh": [ctx.dp, ctx.ep],
                            "params": _reduce_max(max_diff(full_state_dict(model, rank0_only=False), saved))}
        # one process resumed from the same checkpoint, then both train on
        ref = dsmoe.DeepSeekMoEForCausalLM(cfg).train()
        ref_opt = make_optimizer(ref)
        dckpt.load(out_dir / "ckpt_a", ref, ref_opt, distributed=False)
        batches = global_batches(world, 2, seed=11)
        ref_losses, _ = train(ref, ref_opt, batches)
        losses, _ = train(model, opt, batches, rank, world)
        report["train_2x2_resumed"] = {
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "params": _reduce_max(max_diff(full_state_dict(model, rank0_only=False), ref.state_dict())),
            "exp_avg": _reduce_max(_optimizer_diff(model, opt, ref, ref_opt)),
        }
        dckpt.save(out_dir / "ckpt_b", model, opt, extra={"step": 5})
        # one expert per ep rank cannot split over dp=2 on the expert dim: FSDP shards its rows
        report["train_2x2_row_sharded_experts"] = _train_case(2, 2, n_routed_experts=2, num_experts_per_tok=1)[0]
        state = full_state_dict(model)
        if rank == 0:
            save_file(state, str(out_dir / "ckpt_b_full.safetensors"))
    else:
        raise ValueError(f"unknown job {job!r}")
    report["seconds"] = time.time() - t0
    if rank == 0:
        (out_dir / f"report_{job}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    shutdown()


def _optimizer_diff(model, opt, ref, ref_opt) -> float:
    """Largest difference of AdamW's exp_avg / exp_avg_sq between the sharded and the plain run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    plain = get_optimizer_state_dict(ref, ref_opt)
    err = 0.0
    for name, state in plain["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            err = max(err, (full["state"][name][key] - state[key]).abs().max().item())
    return err


# ---------------------------------------------------------------- pytest side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(job: str, world: int, out_dir: Path) -> dict:
    """Starts ``world`` rank processes of this file, waits (hard timeout), returns the report."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        log = open(out_dir / f"{job}_rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, job, str(out_dir)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + JOB_TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        tails = "\n".join(
            f"--- rank {r} (exit {c}) ---\n" + (out_dir / f"{job}_rank{r}.log").read_text()[-3000:]
            for r, c in enumerate(codes) if c
        )
        pytest.fail(f"job {job} failed or timed out after {JOB_TIMEOUT_S}s (exit codes {codes}):\n{tails}")
    return json.loads((out_dir / f"report_{job}.json").read_text())


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    reports = {"a": run_job("a", 2, out)}
    reports["b"] = run_job("b", 4, out)
    return out, reports


@pytest.mark.parametrize("case", ["layer_4_local", "layer_1_local_skewed"])
def test_ep_layer_matches_single_process(jobs, case):
    r = jobs[1]["a"][case]
    assert r["num_params"] == 6  # router, two expert stacks, the shared experts. three matrices
    assert r["load"] == 0
    assert r["out"] < TOL_GRAD and r["aux"] < TOL_GRAD and r["grad_x"] < TOL_GRAD, r
    assert r["grad_params"] < TOL_GRAD, r


@pytest.mark.parametrize("job, case", [("a", "train_1x2"), ("a", "train_2x1"), ("a", "train_2x1_mlp_on_own_gemm"),
                                       ("b", "train_2x2_row_sharded_experts")])
def test_training_matches_single_process(jobs, job, case):
    r = jobs[1][job][case]
    assert r.get("own_gemm_calls", 1) > 0  # the case that forces the MLPs' own-GEMM path took it
    assert r["max_ref_norm"] > CLIP  # clipping was active
    assert r["loss"] < TOL_LOSS and r["norm"] < TOL_LOSS, r
    assert r["params"] < TOL_PARAM, r


def test_resume_on_other_rank_count_matches_single_process(jobs):
    r = jobs[1]["b"]
    assert r["resume"]["written_by"] == 2 and r["resume"]["mesh"] == [2, 2]
    assert r["resume"]["params"] == 0.0  # loading moves bytes, no arithmetic
    t = r["train_2x2_resumed"]
    assert t["loss"] < TOL_LOSS and t["params"] < TOL_PARAM and t["exp_avg"] < TOL_PARAM, t


def test_training_facade_collectives(jobs):
    out, f = jobs[0], jobs[1]["a"]["facade"]
    assert f["broadcast"] == [10, 10]  # rank 0's value on both ranks
    assert f["any"] == [1.0, 0.0]  # true on every rank when one rank says so
    assert f["mean_scalar"] == 2.0**23 + 0.5 and f["mean_vector"] == [0.5, 2.0]
    assert f["export_returns"] == 0.0 and f["export_diff"] == 0.0
    exported = dsmoe.DeepSeekMoEForCausalLM.from_pretrained(out / "hf_a")
    from safetensors.torch import load_file

    assert max_diff(exported.state_dict(), load_file(str(out / "ckpt_a_full.safetensors"))) == 0.0


def test_bad_setups_refused_in_ranks(jobs):
    refused = jobs[1]["a"]["refused"]
    assert "n_routed_experts=3" in refused["experts"] and "ep=2" in refused["experts"]
    assert "num_expert_devices=4" in refused["devices"] and "ep=2" in refused["devices"]
    assert refused["devices"].endswith(
        "the device-level balance loss must group the experts as the expert-parallel ranks hold them")
    assert "n_routed_experts=3 is not divisible by ep=2" in refused["experts_apply"]
    assert refused["experts_apply_devices"] == 1  # refused before the config was touched
    assert "n_routed_experts=3 is not divisible by ep=2" in refused["module_experts"]
    assert refused["devices_from_one"] == [2, 2, 2]  # the config, then each of the two MoE layers
    assert refused["device_loss_off"] == [1, True, True]


@pytest.mark.parametrize("name", ["ckpt_a", "ckpt_b"])
def test_sharded_checkpoint_loads_in_one_process(jobs, name):
    from safetensors.torch import load_file

    out = jobs[0]
    model = dckpt.load_model(out / name)
    assert max_diff(model.state_dict(), load_file(str(out / f"{name}_full.safetensors"))) == 0.0
    # the optimizer state too, into a plain AdamW
    plain = dsmoe.DeepSeekMoEForCausalLM(tiny_config(num_expert_devices=2))
    opt = make_optimizer(plain)
    meta = dckpt.load(out / name, plain, opt)
    assert meta["world_size"] == (2 if name == "ckpt_a" else 4)
    assert meta["mesh"] == ({"dp": 1, "ep": 2} if name == "ckpt_a" else {"dp": 2, "ep": 2})  # the mesh that wrote it
    assert all(int(s["step"]) == meta["extra"]["step"] for s in opt.state_dict()["state"].values())


def test_convert_to_and_from_hf_layout(jobs, tmp_path):
    out = jobs[0]
    hf = dckpt.dcp_to_hf(out / "ckpt_b", tmp_path / "hf")
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()
    hf_model = dsmoe.DeepSeekMoEForCausalLM.from_pretrained(hf)
    dcp_model = dckpt.load_model(out / "ckpt_b")
    assert max_diff(hf_model.state_dict(), dcp_model.state_dict()) == 0.0
    back = dckpt.hf_to_dcp(hf, tmp_path / "dcp")
    assert dckpt.read_meta(back)["world_size"] == 1
    assert max_diff(dckpt.load_model(back).state_dict(), dcp_model.state_dict()) == 0.0
    with torch.no_grad():
        x = torch.randint(0, 64, (1, 6))
        assert torch.equal(hf_model(x).logits, dcp_model(x).logits)


def test_bad_setups_refused_before_any_collective():
    with pytest.raises(ValueError, match=r"ep=3 does not divide the world size 4"):
        resolve_dims(4, ep=3)
    with pytest.raises(ValueError, match=r"dp x ep = 3 x 2 = 6 does not match the world size 4"):
        resolve_dims(4, dp=3, ep=2)
    with pytest.raises(ValueError, match=r"dp=3 does not divide the world size 4"):
        resolve_dims(4, dp=3)
    with pytest.raises(ValueError, match=r"n_routed_experts=6 is not divisible by ep=4"):
        check_experts_fit(6, 4)
    # the mesh is checked before the process group is made, so this cannot hang
    with pytest.raises(ValueError, match=r"ep=3"):
        init_distributed(0, 4, ep=3, device="cpu", timeout_s=5)
    assert resolve_dims(4) == (1, 4) and resolve_dims(4, ep=2) == (2, 2) and resolve_dims(4, dp=4) == (4, 1)


def test_not_a_dcp_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a dsmoe DCP checkpoint"):
        dckpt.read_meta(tmp_path)
    with pytest.raises(FileNotFoundError):
        dckpt.read_meta(tmp_path / "missing")


if __name__ == "__main__":
    worker_main(sys.argv[1], Path(sys.argv[2]))
