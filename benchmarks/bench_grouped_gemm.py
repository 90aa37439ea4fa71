"""Times every GEMM of a routed-expert MoE layer, forward and backward, on CUDA: dsmoe's grouped
GEMM against torch._grouped_mm on the same data, and against one dense cuBLAS GEMM with the same
FLOPs (the ceiling a grouped GEMM can approach). Prints a markdown table.

    python benchmarks/bench_grouped_gemm.py                      # the three shapes, T=8192 and 32768
    python benchmarks/bench_grouped_gemm.py --shapes fine --tokens 16384 --routing skewed
    DSMOE_GROUPED_GEMM_TILE=narrow python benchmarks/bench_grouped_gemm.py   # force a Hopper tile
    compute-sanitizer --tool memcheck python benchmarks/bench_grouped_gemm.py --sanitize

--sanitize runs no timing: each path (default, sm80 forced, CUDA-core) once on small problems
with empty groups, both layouts, bf16/fp16/fp32, each checked against an fp64 product, so a
sanitizer sees every kernel; it exits non-zero on a wrong result.

The six GEMMs of one layer (M = T*k routed rows, w_gate_up [E, 2I, h], w_down [E, h, I]):
  fwd gate_up   [M,h] x w_gate_up^T -> [M,2I]      grouped_gemm(x, w_gate_up, off, trans_b=True)
  fwd down      [M,I] x w_down^T    -> [M,h]       grouped_gemm(act, w_down, off, trans_b=True)
  dgrad down    [M,h] x w_down      -> [M,I]       grouped_gemm(dy, w_down, off, trans_b=False)
  wgrad down    dy^T x act per expert -> [E,h,I]   grouped_gemm_wgrad(act, dy, off, trans_b=True)
  dgrad gate_up [M,2I] x w_gate_up  -> [M,h]       grouped_gemm(dgu, w_gate_up, off, trans_b=False)
  wgrad gate_up dgu^T x x per expert -> [E,2I,h]   grouped_gemm_wgrad(x, dgu, off, trans_b=True)
Times are medians of CUDA-event timings after warm-up; TFLOP/s count 2*M*N*K.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

SHAPES = {
    # name: (hidden, expert intermediate, routed experts, experts per token)
    "ds16b": (2048, 1408, 64, 6),
    "fine": (1280, 352, 63, 7),
    "ds145b": (4096, 1536, 128, 12),
}


def time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def routing_offsets(T: int, E: int, k: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """expert_offsets [E+1] int32 of a top-k routing of T tokens (uniform or skewed scores)."""
    scores = torch.randn(T, E, generator=gen, device="cuda")
    if mode == "skewed":  # a few hot experts take most tokens, expert 0 in almost every row
        scores += torch.linspace(4.0, 0.0, E, device="cuda")
    ids = scores.topk(k, dim=1).indices
    counts = torch.bincount(ids.flatten(), minlength=E)
    off = torch.zeros(E + 1, dtype=torch.int32, device="cuda")
    off[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return off


def layer_gemms(h: int, inter: int, E: int, M: int, off: torch.Tensor, dtype, gen):
    """The six GEMMs as (name, (M,N,K), dsmoe fn, torch._grouped_mm fn, dense fn)."""
    dev = "cuda"

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * 0.1).to(dtype)

    x, act, dy, dgu = rnd(M, h), rnd(M, inter), rnd(M, h), rnd(M, 2 * inter)
    w_gu, w_down = rnd(E, 2 * inter, h), rnd(E, h, inter)
    ends = off[1:].contiguous()  # torch._grouped_mm takes the cumulative ends
    gg, wg = torch.ops.dsmoe.grouped_gemm, torch.ops.dsmoe.grouped_gemm_wgrad
    gmm = torch._grouped_mm

    def dense(m, n, k):
        a, b = rnd(m, k), rnd(k, n)
        return lambda: torch.mm(a, b)

    return [
        ("fwd gate_up", (M, 2 * inter, h), lambda: gg(x, w_gu, off, True),
         lambda: gmm(x, w_gu.transpose(1, 2), offs=ends), dense(M, 2 * inter, h)),
        ("fwd down", (M, h, inter), lambda: gg(act, w_down, off, True),
         lambda: gmm(act, w_down.transpose(1, 2), offs=ends), dense(M, h, inter)),
        ("dgrad down", (M, inter, h), lambda: gg(dy, w_down, off, False),
         lambda: gmm(dy, w_down, offs=ends), dense(M, inter, h)),
        ("wgrad down", (h, inter, M), lambda: wg(act, dy, off, True),
         lambda: gmm(dy.t(), act, offs=ends), dense(h, inter, M)),
        ("dgrad gate_up", (M, h, 2 * inter), lambda: gg(dgu, w_gu, off, False),
         lambda: gmm(dgu, w_gu, offs=ends), dense(M, h, 2 * inter)),
        ("wgrad gate_up", (2 * inter, h, M), lambda: wg(x, dgu, off, True),
         lambda: gmm(dgu.t(), x, offs=ends), dense(2 * inter, h, M)),
    ]


def check(fn_ours, fn_peer, name):
    """dsmoe and torch._grouped_mm agree (relative Frobenius error) on this data."""
    ours, peer = fn_ours().float(), fn_peer().float()
    rel = float((ours - peer).norm() / peer.norm().clamp_min(1e-30))
    if not rel < 2e-2:
        raise SystemExit(f"{name}: dsmoe and torch._grouped_mm differ, relative error {rel:.3g}")
    return rel


def sanitize() -> None:
    """Every kernel once on small problems, results checked against fp64 (no timing)."""
    gg, wg = torch.ops.dsmoe.grouped_gemm, torch.ops.dsmoe.grouped_gemm_wgrad
    gen = torch.Generator(device="cuda").manual_seed(0)
    counts = [0, 37, 1, 0, 130, 64, 0]
    off = torch.zeros(len(counts) + 1, dtype=torch.int32)
    off[1:] = torch.cumsum(torch.tensor(counts), 0)
    off = off.cuda()
    E, rows = len(counts), sum(counts)
    failures = 0
    for path in ("auto", "sm80", "simt"):
        dsmoe.set_backend(cuda_gemm_path=path)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for K, N in ((128, 256), (352, 136), (40, 44)):
                for trans_b in (False, True):
                    a = torch.randn(rows, K, generator=gen, device="cuda").to(dtype)
                    b = torch.randn(E, *((N, K) if trans_b else (K, N)), generator=gen, device="cuda").to(dtype)
                    g = torch.randn(rows, N, generator=gen, device="cuda").to(dtype)
                    out, dw = gg(a, b, off, trans_b), wg(a, g, off, trans_b)
                    ref, ref_dw = torch.empty_like(out, dtype=torch.float64), torch.zeros_like(dw, dtype=torch.float64)
                    start = 0
                    for e, n in enumerate(counts):
                        ae, ge, be = a[start:start + n].double(), g[start:start + n].double(), b[e].double()
                        ref[start:start + n] = ae @ (be.t() if trans_b else be)
                        ref_dw[e] = ge.t() @ ae if trans_b else ae.t() @ ge
                        start += n
                    for name, got, want in (("forward", out, ref), ("wgrad", dw, ref_dw)):
                        rel = float((got.double() - want).norm() / want.norm())
                        if not rel < (1e-5 if dtype == torch.float32 else 1e-2):
                            failures += 1
                            print(f"WRONG {name} path={path} {dtype} K={K} N={N} trans_b={trans_b}: rel {rel:.3g}")
    dsmoe.set_backend(cuda_gemm_path="auto")
    torch.cuda.synchronize()
    print(f"sanitize: {failures} wrong results")
    if failures:
        raise SystemExit(1)


def markdown_table(rows, device: str, args, argv, env) -> list[str]:
    """The rows as a markdown table, under a line saying where and how they were measured."""
    lines = [
        f"{device}, {args.dtype}, {args.routing} routing, median of {args.reps} "
        f"(command: python benchmarks/bench_grouped_gemm.py {' '.join(argv)}; env {env or '{}'})",
        "",
        "| shape | T | GEMM | M x N x K | dsmoe ms | _grouped_mm ms | dense ms | dsmoe TFLOP/s "
        "| _grouped_mm TFLOP/s | dense TFLOP/s | vs _grouped_mm | % of dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['gemm']} | {r['M']}x{r['N']}x{r['K']} | {r['dsmoe_ms']:.3f} "
            f"| {r['gmm_ms']:.3f} | {r['dense_ms']:.3f} | {r['dsmoe_tflops']:.0f} | {r['gmm_tflops']:.0f} "
            f"| {r['dense_tflops']:.0f} | {r['gmm_ms'] / r['dsmoe_ms']:.2f}x "
            f"| {100 * r['dsmoe_tflops'] / r['dense_tflops']:.0f}% |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="ds16b,fine,ds145b", help=f"comma list of {','.join(SHAPES)}")
    ap.add_argument("--tokens", default="8192,32768", help="comma list of T")
    ap.add_argument("--routing", choices=["uniform", "skewed"], default="uniform")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-check", action="store_true", help="skip comparing results with torch._grouped_mm")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--sanitize", action="store_true", help="check every kernel once, no timing (for compute-sanitizer)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_grouped_gemm: needs a CUDA device")
    import dsmoe  # noqa: F401  (registers torch.ops.dsmoe)

    if not dsmoe.build_info()["cuda"]:
        raise SystemExit("bench_grouped_gemm: this dsmoe build has no CUDA kernels")
    if args.sanitize:
        return sanitize()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    settings = dsmoe.backend_settings()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dsmoe {dsmoe.build_info()}, "
          f"{args.dtype}, routing {args.routing}, cuda_gemm_path {settings.cuda_gemm_path}, "
          f"cuda_gemm_tile {settings.cuda_gemm_tile}", flush=True)

    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("DSMOE_")}  # what chose the kernels
    rows = []
    for shape in args.shapes.split(","):
        h, inter, E, k = SHAPES[shape]
        for T in (int(t) for t in args.tokens.split(",")):
            off = routing_offsets(T, E, k, args.routing, gen)
            M = T * k
            for name, (m, n, kk), ours, peer, dense in layer_gemms(h, inter, E, M, off, dtype, gen):
                rel = None if args.no_check else check(ours, peer, f"{shape} T={T} {name}")
                t_ours = time_ms(ours, args.warmup, args.reps)
                t_peer = time_ms(peer, args.warmup, args.reps)
                t_dense = time_ms(dense, args.warmup, args.reps)
                flop = 2.0 * m * n * kk
                row = dict(shape=shape, T=T, gemm=name, M=m, N=n, K=kk, dsmoe_ms=t_ours, gmm_ms=t_peer,
                           dense_ms=t_dense, dsmoe_tflops=flop / t_ours / 1e9, gmm_tflops=flop / t_peer / 1e9,
                           dense_tflops=flop / t_dense / 1e9, rel_err_vs_gmm=rel)
                rows.append(row)
                print(f"  {shape} T={T} {name}: dsmoe {t_ours:.3f} ms, _grouped_mm {t_peer:.3f} ms, "
                      f"dense {t_dense:.3f} ms", flush=True)
            del off
            torch.cuda.empty_cache()

    lines = markdown_table(rows, torch.cuda.get_device_name(), args, sys.argv[1:], env)
    print()
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), dtype=args.dtype, routing=args.routing,
                           env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
