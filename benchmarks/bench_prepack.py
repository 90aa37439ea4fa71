"""Time of packing a whole model's MoE weights for the CPU decode path (dsmoe.decode.prepack).

Builds a preset with random weights (no download), then times ``decode.prepack(model)`` ``--reps``
times with the cache cleared between: the first includes faulting in the packed copies' fresh
(huge) pages, the later ones reuse the freed memory.

    python benchmarks/bench_prepack.py                  # the 2B preset in bf16
    python benchmarks/bench_prepack.py --preset small --dtype fp32
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from dsmoe import DeepSeekMoEForCausalLM, decode, get_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2b")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(get_preset(a.preset))
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"preset {a.preset} {a.dtype}: {nbytes / 1e9:.2f} GB of routed-expert weights (built in "
          f"{time.perf_counter() - t0:.1f} s)")
    for i in range(a.reps):
        decode.clear_cache()
        t0 = time.perf_counter()
        layers = decode.prepack(model)
        dt = time.perf_counter() - t0
        print(f"prepack {i + 1}: {layers} MoE layers in {dt:.2f} s ({nbytes / dt / 1e9:.1f} GB/s of routed weights)")


if __name__ == "__main__":
    main()
