"""Timings of dsmoe's memory-bound CUDA kernels (gate, permute, unpermute, swiglu and their
backward) at the ds16b shape: hidden 2048, 64 routed experts of intermediate 1408, top-6, bf16.

For each kernel: the median time (CUDA events, L2 flushed before each run), the fewest bytes it
must move (each input read once, each output written once) and that as a share of the measured
device-to-device copy bandwidth. Then gate+permute+unpermute against the plain PyTorch
equivalents (softmax+topk, stable argsort + index gather, index_add), eagerly and, where both
capture, replayed from CUDA graphs. Prints markdown tables (and writes them to --out).

    python benchmarks/bench_cuda_ops.py [--tokens 64 8192 32768] [--reps 50] [--out FILE]
    python benchmarks/bench_cuda_ops.py --sanitize [--dtypes bf16,fp32,fp64]
        # every CUDA op of dsmoe once at small shapes (run under compute-sanitizer)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import dsmoe
from dsmoe import ops

HIDDEN, EXPERTS, TOPK, INTER = 2048, 64, 6, 1408


def flush_l2(buf: torch.Tensor) -> None:
    buf.zero_()


def median_ms(fn, reps: int, flush: torch.Tensor) -> float:
    """Median of `reps` CUDA-event timings of fn(), each after an L2 flush."""
    fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        flush_l2(flush)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def graph_ms(fn, reps: int, flush: torch.Tensor) -> float | None:
    """Median time of one replay of fn() captured in a CUDA graph; None if it does not capture."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # e.g. an op that syncs with the host cannot be captured
        print(f"  (no graph: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})", file=sys.stderr)
        torch.cuda.synchronize()
        return None
    return median_ms(graph.replay, reps, flush)


def copy_bandwidth(flush: torch.Tensor, reps: int) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps, flush)
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def bench_tokens(T: int, reps: int, copy_gbs: float, flush: torch.Tensor):
    h, E, k, I = HIDDEN, EXPERTS, TOPK, INTER
    dt = torch.bfloat16
    s = 2  # bytes per element
    M = T * k
    dev = "cuda"
    logits = torch.randn(T, E, device=dev, dtype=dt) * 2
    x = torch.randn(T, h, device=dev, dtype=dt)
    w, ids, counts, sums = ops.gate(logits, k)
    x_perm, row_map, offsets = ops.permute(x, ids, E)
    y_perm = torch.randn(M, h, device=dev, dtype=dt)
    grad_y = torch.randn(T, h, device=dev, dtype=dt)
    gate_up = torch.randn(M, 2 * I, device=dev, dtype=dt)
    grad_act = torch.randn(M, I, device=dev, dtype=dt)
    grad_w = torch.randn(T, k, device=dev)
    grad_sums = torch.randn(1, E, device=dev)

    kernels = [
        ("gate", lambda: ops.gate(logits, k), T * E * s + T * k * 8 + E * 8),
        ("gate_backward", lambda: torch.ops.dsmoe.gate_backward(grad_w, grad_sums, logits, ids, False, 1),
         2 * T * E * s + T * k * 8 + E * 4),
        ("permute", lambda: ops.permute(x, ids, E), T * h * s + M * h * s + 2 * M * 4 + (E + 1) * 4),
        ("permute_backward", lambda: torch.ops.dsmoe.permute_backward(y_perm, row_map, k),
         M * h * s + T * h * s + M * 4),
        ("unpermute", lambda: ops.unpermute(y_perm, row_map, w), M * h * s + T * h * s + M * 8),
        ("unpermute_backward", lambda: torch.ops.dsmoe.unpermute_backward(grad_y, y_perm, row_map, w),
         T * h * s + 2 * M * h * s + M * 12),
        ("swiglu", lambda: ops.swiglu(gate_up), 3 * M * I * s),
        ("swiglu_backward", lambda: torch.ops.dsmoe.swiglu_backward(grad_act, gate_up), 5 * M * I * s),
    ]
    rows = []
    for name, fn, nbytes in kernels:
        ms = median_ms(fn, reps, flush)
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append((T, name, ms, nbytes / 1e6, gbs, 100.0 * gbs / copy_gbs))

    # gate + permute + unpermute: dsmoe against plain PyTorch.
    def dsmoe_chain():
        w_, ids_, _, _ = ops.gate(logits, k)
        xp, rm, _ = ops.permute(x, ids_, E)
        return ops.unpermute(xp, rm, w_)

    def torch_chain():
        probs = torch.softmax(logits.float(), dim=-1)
        w_, ids_ = probs.topk(k, dim=-1)
        order = ids_.view(-1).argsort(stable=True)
        token = order // k
        xp = x.index_select(0, token)
        contrib = xp * w_.view(-1)[order].unsqueeze(1).to(dt)
        return torch.zeros(T, h, device=dev, dtype=dt).index_add_(0, token, contrib)

    chain = {"dsmoe": dsmoe_chain, "torch": torch_chain}
    eager = {name: median_ms(fn, reps, flush) for name, fn in chain.items()}
    graphed = {name: graph_ms(fn, reps, flush) for name, fn in chain.items()}
    return rows, (T, eager, graphed)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def sanitize(dtypes) -> None:
    """Every CUDA op of dsmoe once (several paths each) at small shapes, then a sync."""
    dev = "cuda"
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    torch.manual_seed(0)
    for dt in dtypes:
        for T, E, k, S in ((100, 64, 6, 2), (2048, 64, 6, 2), (64, 300, 8, 1), (40, 1024, 16, 2), (9, 5, 2, 3)):
            logits = torch.randn(T, E, device=dev, dtype=dt)
            bias = torch.randn(E, device=dev) * 0.1
            w, ids, counts, sums = ops.gate(logits, k, True, bias, S)
            torch.ops.dsmoe.gate_backward(torch.randn_like(w), torch.randn_like(sums), logits, ids, True, S)
            torch.ops.dsmoe.gate_backward(torch.randn_like(w), torch.randn_like(sums), logits, ids, False, S)
        for T, h, E, k in ((100, 64, 16, 6), (2048, 64, 64, 6), (300, 33, 5000, 2), (50, 8, 8192, 3), (7, 1, 3, 3),
                           (64, 1024, 32, 6), (20, 4096, 128, 8)):  # h >= 512: unpermute_backward's shared-memory sum
            x = torch.randn(T, h, device=dev, dtype=dt)
            ids = torch.randint(0, E, (T, k), device=dev, dtype=torch.int32)
            ids[0, 0] = E  # out of range: the overflow bucket
            x_perm, row_map, offsets = ops.permute(x, ids, E)
            weights = torch.rand(T, k, device=dev)
            y = ops.unpermute(x_perm, row_map, weights)
            torch.ops.dsmoe.permute_backward(x_perm, row_map, k)
            torch.ops.dsmoe.unpermute_backward(torch.randn_like(y), x_perm, row_map, weights)
            # misaligned views (the scalar paths)
            xs = torch.randn(T * h + 1, device=dev, dtype=dt)[1:].view(T, h)
            ops.permute(xs, ids, E)
            yp = torch.randn(T * k * h + 1, device=dev, dtype=dt)[1:].view(T * k, h)
            ops.unpermute(yp, row_map, weights)
            torch.ops.dsmoe.unpermute_backward(torch.randn_like(y), yp, row_map, weights)
        for M, I in ((100, 64), (33, 35), (5, 1)):
            gu = torch.randn(M, 2 * I, device=dev, dtype=dt)
            ops.swiglu(gu)
            torch.ops.dsmoe.swiglu_backward(torch.randn(M, I, device=dev, dtype=dt), gu)
    if has("dsmoe::grouped_gemm", "CUDA"):
        # Every path (the default -- sm90a on Hopper --, the sm80 kernels, the CUDA-core one) in
        # bf16/fp16 (fp32 takes the CUDA-core path), at E = 8, 32, 128 and 256 with empty experts.
        for path in ("auto", "sm80", "simt"):
            dsmoe.set_backend(cuda_gemm_path=path)
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                for E in (8, 32, 128, 256):
                    K, N = 64, 128
                    sizes = torch.randint(0, 6, (E,))
                    sizes[0] = 0
                    sizes[-1] = 40
                    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(torch.int32).to(dev)
                    rows = int(sizes.sum()) + 3  # three rows after the last group: zeroed
                    a = torch.randn(rows, K, device=dev, dtype=dt)
                    for trans_b in (False, True):
                        b = (torch.randn(E, N, K, device=dev, dtype=dt) if trans_b
                             else torch.randn(E, K, N, device=dev, dtype=dt))
                        c = ops.grouped_gemm(a[: rows - 3], b, offsets, trans_b)
                        torch.ops.dsmoe.grouped_gemm(a, b, offsets, trans_b)
                        if has("dsmoe::grouped_gemm_wgrad", "CUDA"):
                            ops.grouped_gemm_wgrad(a[: rows - 3], torch.randn_like(c), offsets, trans_b)
        dsmoe.set_backend(cuda_gemm_path="auto")
    torch.cuda.synchronize()
    print("sanitize: every CUDA op ran")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 8192, 32768])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", help="also write the tables to this file")
    parser.add_argument("--sanitize", action="store_true", help="run every CUDA op once and exit")
    parser.add_argument("--dtypes", default="bf16,fp32,fp64", help="--sanitize: comma-separated of " + ",".join(DTYPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda_ops: no CUDA device")
    if not dsmoe.build_info()["cuda"]:
        raise SystemExit("bench_cuda_ops: dsmoe was built without CUDA kernels")
    if args.sanitize:
        names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        bad = [d for d in names if d not in DTYPES]
        if bad or not names:
            raise SystemExit(f"bench_cuda_ops: --dtypes takes {','.join(DTYPES)}, got {args.dtypes!r}")
        sanitize([DTYPES[d] for d in names])
        return

    props = torch.cuda.get_device_properties(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    t0 = time.time()
    copy_gbs = copy_bandwidth(flush, args.reps)
    lines = [
        f"Device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"dsmoe {dsmoe.build_info()['version']}; ds16b: h {HIDDEN}, E {EXPERTS}, k {TOPK}, I {INTER}, bf16; "
        f"median of {args.reps} CUDA-event timings, L2 flushed before each.",
        f"Device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written).",
        "",
        "| T | kernel | ms | MB moved | GB/s | % of copy |",
        "|---|---|---|---|---|---|",
    ]
    chains = []
    for T in args.tokens:
        rows, chain = bench_tokens(T, args.reps, copy_gbs, flush)
        for T_, name, ms, mb, gbs, pct in rows:
            lines.append(f"| {T_} | {name} | {ms:.4f} | {mb:.1f} | {gbs:.0f} | {pct:.0f}% |")
        chains.append(chain)
    lines += [
        "",
        "gate + permute + unpermute (dsmoe) against softmax+topk, stable argsort + index_select, "
        "index_add (torch):",
        "",
        "| T | dsmoe ms | torch ms | speed-up | dsmoe graph ms | torch graph ms | graph speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for T, eager, graphed in chains:
        g_d, g_t = graphed["dsmoe"], graphed["torch"]
        g_cells = [f"{g_d:.4f}" if g_d else "n/a", f"{g_t:.4f}" if g_t else "n/a",
                   f"{g_t / g_d:.2f}x" if g_d and g_t else "n/a"]
        lines.append(f"| {T} | {eager['dsmoe']:.4f} | {eager['torch']:.4f} | "
                     f"{eager['torch'] / eager['dsmoe']:.2f}x | " + " | ".join(g_cells) + " |")
    lines += ["", f"({time.time() - t0:.0f} s; python benchmarks/bench_cuda_ops.py "
              + " ".join(sys.argv[1:]) + ")"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
