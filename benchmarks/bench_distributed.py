"""Training throughput and communication of dsmoe.distributed at the default `dsmoe train` model.

For each process count (default 1, 2, 4) and each mesh that fits it (dp x ep), the script starts
that many processes on this machine (gloo on CPU, NCCL with one GPU per process on CUDA), builds
the default model of `dsmoe train` (the "small" preset, byte vocabulary), wraps it with expert
parallelism + FSDP2, and times full training steps (forward, backward, gradient clipping,
AdamW) on the same global batch (default 16 x 128 tokens, as `dsmoe train`), split over the
ranks. One process runs the plain, unwrapped model (what `dsmoe train` does without --nproc).

Reported per configuration: median step time and tokens/s (the whole global batch), and the
bytes one rank sends per step, split into
  ep a2a   the expert-parallel all-to-all (token rows out and back, forward and backward, plus
           the split-size exchange): exact, counted by dsmoe.distributed.CommStats
  fsdp     FSDP2's parameter all-gathers and gradient reduce-scatters (payload leaving a rank:
           (g - 1) shards per all-gather, (g - 1)/g of the input per reduce-scatter, g = group)
(The gradient norm and the logged loss add a few scalar all-reduces, not counted.) On one CPU the processes share its cores (each gets cores / processes threads), so tokens/s
measures the overhead of the distributed machinery here, not a speed-up.

    python benchmarks/bench_distributed.py                       # 1, 2, 4 processes, all meshes
    python benchmarks/bench_distributed.py --nproc 2 --steps 10 --markdown
    python benchmarks/bench_distributed.py --device cuda --nproc 8   # a multi-GPU machine
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsmoe.cli.bench import cpu_name


def meshes(nproc: int, only: str | None):
    out = []
    for ep in range(nproc, 0, -1):
        if nproc % ep == 0:
            out.append((nproc // ep, ep))
    if only:
        want = {tuple(int(v) for v in m.split("x")) for m in only.split(",")}
        out = [m for m in out if m in want]
    return out


# ---------------------------------------------------------------- worker


class ByteCounter:
    """Wraps the torch.distributed collectives FSDP2 and the training step use."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.fsdp = 0
        self._orig = {}
        for name in ("all_gather_single", "reduce_scatter_single"):
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name))

    def _size(self, group) -> int:
        return self.dist.get_world_size(group)

    def _wrap(self, name):
        orig = self._orig[name]

        def counted(*args, **kwargs):
            group = kwargs.get("group")
            g = self._size(group)
            if name == "all_gather_single":
                inp = kwargs.get("input_tensor", args[1] if len(args) > 1 else None)
                self.fsdp += inp.numel() * inp.element_size() * (g - 1)
            else:
                inp = kwargs.get("input", args[1] if len(args) > 1 else None)
                self.fsdp += inp.numel() * inp.element_size() * (g - 1) // max(g, 1)
            return orig(*args, **kwargs)

        return counted

    def reset(self):
        self.fsdp = 0


def build(device: torch.device, seed: int):
    from dsmoe.cli.data import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID
    from dsmoe.cli.models import make_config
    from dsmoe.model import DeepSeekMoEForCausalLM

    cfg = make_config("small", None, overrides=dict(vocab_size=BYTE_VOCAB_SIZE, bos_token_id=BOS_ID,
                                                    eos_token_id=EOS_ID, pad_token_id=None))
    torch.manual_seed(seed)
    return DeepSeekMoEForCausalLM(cfg).to(device).train()


def worker(args) -> None:
    import torch.nn.functional as F

    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = args.mode == "dist"
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, args.cores // nproc))
    run = None
    counter = None
    if distributed:
        from dsmoe.distributed import init_distributed, wrap_model

        counter = ByteCounter()
        run = init_distributed(int(os.environ["RANK"]), nproc, dp=args.dp, ep=args.ep, device=args.device,
                               timeout_s=600)
        device = run.device
    else:
        device = torch.device("cuda" if args.device == "cuda" else "cpu")
    from dsmoe.distributed import CommStats, clip_grad_norm_

    model = build(device, seed=0)
    vocab = model.config.vocab_size
    if distributed:
        wrap_model(model, run.mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    rank = run.rank if run else 0
    per = args.batch_size // nproc
    times, a2a, fsdp = [], [], []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=g)
        x, y = tokens[rank * per:(rank + 1) * per, :-1].to(device), tokens[rank * per:(rank + 1) * per, 1:].to(device)
        CommStats.reset()
        if counter:
            counter.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run:
            import torch.distributed as dist

            dist.barrier()
        t0 = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out.logits.reshape(-1, vocab), y.reshape(-1)) + out.aux_loss
        loss.backward()
        if run:
            clip_grad_norm_(model.parameters(), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            a2a.append(CommStats.sent_bytes)
            fsdp.append(counter.fsdp if counter else 0)
    if run:
        import torch.distributed as dist

        # the slowest rank sets the pace; bytes: the largest sender
        t = torch.tensor([statistics.median(times), statistics.mean(a2a), statistics.mean(fsdp)],
                         dtype=torch.float64)
        t = t.to(device) if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        step_s, a2a_b, fsdp_b = t.tolist()
    else:
        step_s, a2a_b, fsdp_b = statistics.median(times), 0.0, 0.0
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "nproc": nproc, "dp": args.dp, "ep": args.ep, "mode": args.mode,
            "threads": torch.get_num_threads(), "step_s": step_s,
            "tokens_per_s": args.batch_size * args.seq_len / step_s,
            "a2a_bytes": a2a_b, "fsdp_bytes": fsdp_b,
            "params": sum(p.numel() for p in model.parameters()),
        }))
    if run:
        from dsmoe.distributed import shutdown

        shutdown()


# ---------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(args, nproc: int, dp: int, ep: int, mode: str, threads: int = 0) -> dict:
    result = Path(tempfile.mkstemp(suffix=".json")[1])
    port = _free_port()
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--dp", str(dp), "--ep", str(ep),
           "--device", args.device, "--cores", str(args.cores), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--threads", str(threads), "--result", str(result)]
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise RuntimeError(f"{nproc} processes ({dp} x {ep}, {mode}) failed: exit codes {codes}")
    out = json.loads(result.read_text())
    result.unlink()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", default="1,2,4", help="process counts, comma-separated (default 1,2,4)")
    p.add_argument("--mesh", default=None, help="only these meshes, e.g. 1x2,2x2 (dp x ep)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences (default 16, as dsmoe train)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="CPU cores to share out")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration before it is killed")
    p.add_argument("--plain-threads", default=None,
                   help="thread counts of the one-process plain run, comma-separated (default: 1 and all cores)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    # worker side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("plain", "dist"), default="dist", help=argparse.SUPPRESS)
    p.add_argument("--dp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    rows = []
    load0 = os.getloadavg()[0]
    for nproc in [int(n) for n in args.nproc.split(",")]:
        if args.batch_size % nproc:
            raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {nproc} processes")
        plain_threads = sorted({int(t) for t in (args.plain_threads or f"1,{args.cores}").split(",")})
        configs = [(1, 1, "plain", t) for t in plain_threads] if nproc == 1 else []
        configs += [(dp, ep, "dist", 0) for dp, ep in meshes(nproc, args.mesh) if nproc > 1]
        for dp, ep, mode, threads in configs:
            r = run_config(args, nproc, dp, ep, mode, threads)
            rows.append(r)
            print(f"{nproc} proc  {'plain' if mode == 'plain' else f'dp {dp} x ep {ep}':>12}  "
                  f"{r['step_s'] * 1e3:8.1f} ms/step  {r['tokens_per_s']:8.0f} tok/s  "
                  f"a2a {r['a2a_bytes'] / 1e6:7.2f} MB  fsdp {r['fsdp_bytes'] / 1e6:7.2f} MB  "
                  f"({r['threads']} threads/proc)", flush=True)

    if args.markdown:
        print()
        print(f"{cpu_name() if args.device == 'cpu' else torch.cuda.get_device_name()}, "
              f"{args.cores} cores, torch {torch.__version__}, {datetime.date.today()}; model: `dsmoe train` "
              f"default ({rows[0]['params'] / 1e6:.2f}M parameters), global batch {args.batch_size} x "
              f"{args.seq_len} tokens, fp32, median of {args.steps} steps after {args.warmup}; "
              f"load average before the run {load0:.1f}, after {os.getloadavg()[0]:.1f}")
        print()
        print("| processes | mesh (dp x ep) | threads / process | ms / step | tokens/s | EP all-to-all MB / rank / step | FSDP MB / rank / step |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            mesh = "— (plain model)" if r["mode"] == "plain" else f"{r['dp']} x {r['ep']}"
            print(f"| {r['nproc']} | {mesh} | {r['threads']} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} | "
                  f"{r['a2a_bytes'] / 1e6:.2f} | {r['fsdp_bytes'] / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
