"""GPU timings of one DeepSeekMoE layer (shared experts + fine-grained routed experts): the layer
times DESIGN.md's targets are stated in (ds16b at T=8192: forward <= 2.7 ms, forward+backward
<= 7.5 ms; the same ratios at `fine` and `ds145b`).

The implementations are bench_cpu_moe.py's, on CUDA tensors, all on the same weights and input:
  dsmoe_layer  dsmoe.DeepSeekMoELayer(impl="dsmoe")
  dsmoe        dsmoe.ops composed (gate, permute, grouped_gemm, swiglu, grouped_gemm, unpermute)
  grouped_mm   the torch._grouped_mm pipeline (sort, gather, 2 grouped GEMMs, index_add)
  hf_infer     the seeds' moe_infer (forward only)
  hf_train     the seeds' training loop over experts (few repetitions: it is slow)
  floor        one dense GEMM chain with the routed experts' FLOPs, plus the shared experts
Forward runs under torch.no_grad(); forward+backward computes the gradients of the input and
every weight. Median of CUDA-event timings after warm-up, one implementation after another.

    python benchmarks/bench_cuda_moe.py                          # ds16b and ds145b at T=8192, fine at 16384
    python benchmarks/bench_cuda_moe.py --shapes ds16b --tokens 64   # decode-sized batch
    python benchmarks/bench_cuda_moe.py --device cpu --shapes tiny   # the host code, on a CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_moe as peers  # noqa: E402  (the implementations, shared with the CPU benchmark)
from dsmoe.cli.bench import _time as median_ms  # noqa: E402  (CUDA events on a GPU, else the wall clock)

# name: (default T, hidden, expert intermediate, routed experts, top-k, shared experts)
SHAPES = {
    "ds16b": (8192, 2048, 1408, 64, 6, 2),
    "fine": (16384, 1280, 352, 63, 7, 1),
    "ds145b": (8192, 4096, 1536, 128, 12, 4),
    "tiny": (96, 32, 16, 8, 2, 1),  # for --device cpu: checks the script, measures nothing
}
IMPLS = ("dsmoe_layer", "dsmoe", "grouped_mm", "hf_infer", "hf_train", "floor")
FORWARD_ONLY = {"hf_infer"}
SLOW = {"hf_train", "hf_infer"}  # per-expert Python loops: a few repetitions are enough


def run_shape(name: str, T: int, dtype, args) -> list[dict]:
    _, h, inter, E, k, ns = SHAPES[name]
    dims = (T, h, inter, E, k, ns)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        train = mode == "fwd+bwd"
        p = peers.prepare(dims, dtype, "uniform", train=train, device=args.device)
        ref = None
        for impl in args.impls:
            if train and impl in FORWARD_ONLY:
                continue
            fn = peers.impl_fn(impl, p)
            if fn is None:
                print(f"  {name} T={T} {mode} {impl}: not available", file=sys.stderr)
                continue
            if train:
                step = peers.as_train_step(impl, fn, p)
                call = lambda step=step: step(p)  # noqa: E731
            else:
                def call(fn=fn):
                    with torch.no_grad():
                        return fn(p)
            rel = None
            if not train and impl != "floor":  # every implementation computes the same layer
                out = call().float()
                if ref is None:
                    ref = out
                else:
                    rel = float((out - ref).norm() / ref.norm())
            slow = impl in SLOW
            ms = median_ms(call, args.slow_reps if slow else args.reps, 1 if slow else args.warmup,
                           torch.device(args.device))
            wrong = rel is not None and not rel < 3e-2  # a timing of a wrong result is marked, not dropped
            rows.append(dict(shape=name, T=T, mode=mode, impl=impl, ms=ms, wrong=wrong))
            print(f"  {name} T={T} {mode} {impl}: {ms:.3f} ms"
                  + (f", relative difference from {args.impls[0]}: {rel:.2g}" if rel is not None else "")
                  + (" WRONG RESULT" if wrong else ""), flush=True)
        del p
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[dict], header: str) -> list[str]:
    """One line per shape and T: each implementation's forward and forward+backward ms, and
    dsmoe_layer's speed-up over the _grouped_mm pipeline and the reference loop."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ms = {(r["shape"], r["T"], r["mode"], r["impl"]): r["ms"] for r in rows}
    cases = list(dict.fromkeys((r["shape"], r["T"]) for r in rows))
    lines = [header, "", "| shape | T | " + " | ".join(f"{i} fwd / fwd+bwd ms" for i in impls)
             + " | dsmoe_layer vs grouped_mm | dsmoe_layer vs hf_train (fwd+bwd) |",
             "|---|---|" + "---|" * len(impls) + "---|---|"]

    wrong = {(r["shape"], r["T"], r["mode"], r["impl"]) for r in rows if r.get("wrong")}

    def cell(shape, T, mode, impl):
        v = ms.get((shape, T, mode, impl))
        return "—" if v is None else f"{v:.3f}" + (" (wrong result)" if (shape, T, mode, impl) in wrong else "")

    def ratio(shape, T, mode, peer):
        a, b = ms.get((shape, T, mode, "dsmoe_layer")), ms.get((shape, T, mode, peer))
        return "—" if a is None or b is None else f"{b / a:.2f}x"

    for shape, T in cases:
        cells = [f"{cell(shape, T, 'fwd', i)} / {cell(shape, T, 'fwd+bwd', i)}" for i in impls]
        vs_gmm = f"{ratio(shape, T, 'fwd', 'grouped_mm')} / {ratio(shape, T, 'fwd+bwd', 'grouped_mm')}"
        lines.append(f"| {shape} | {T} | " + " | ".join(cells) + f" | {vs_gmm} | {ratio(shape, T, 'fwd+bwd', 'hf_train')} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="ds16b,fine,ds145b", help=f"comma list of {','.join(SHAPES)}")
    ap.add_argument("--tokens", type=int, default=None, help="T for every shape (default: each shape's own)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {','.join(IMPLS)}")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--slow-reps", type=int, default=3, help="repetitions of hf_train and hf_infer")
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        ap.error(f"--shapes takes a comma list of {','.join(SHAPES)}, got {args.shapes!r}")
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in args.impls if i not in IMPLS]
    if bad or not args.impls:
        ap.error(f"--impls takes a comma list of {','.join(IMPLS)}, got {args.impls!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_cuda_moe: needs a CUDA device (or --device cpu to check the script)", file=sys.stderr)
        return 1
    import dsmoe

    if args.device == "cuda" and not dsmoe.build_info()["cuda"]:
        print("bench_cuda_moe: this dsmoe build has no CUDA kernels", file=sys.stderr)
        return 1
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    where = torch.cuda.get_device_name() if args.device == "cuda" else peers.cpu_name()
    rows = []
    for shape in shapes:
        rows += run_shape(shape, args.tokens or SHAPES[shape][0], dtype, args)
    header = (f"{where}, torch {torch.__version__}, {args.dtype}, uniform routing, median of {args.reps} "
              f"({args.slow_reps} for hf_*) (command: python benchmarks/bench_cuda_moe.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)})")
    lines = markdown_table(rows, header)
    print()
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
