"""`dsmoe bench`: times the DeepSeekMoE layer with the dsmoe ops against the plain PyTorch
reference path (the seeds' loop over experts in training, ``moe_infer`` in inference) on the
present device, on the same weights and inputs, and prints a table."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .common import CLIError, check_seed, format_table, pick_device, synchronize

# name: (tokens on CPU, tokens on GPU, hidden, moe_intermediate, routed experts, top-k, shared)
SHAPES = {
    "small": (2048, 8192, 256, 128, 16, 4, 1),      # the `dsmoe train` default model's layer
    "s64": (2048, 8192, 512, 256, 64, 6, 2),        # DESIGN.md's first CPU shape
    "fine": (1024, 16384, 1280, 352, 63, 7, 1),     # very fine-grained (2B-like)
    "gshard": (2048, 8192, 512, 1024, 16, 2, 1),    # coarse, GShard-like
    "ds16b": (1024, 8192, 2048, 1408, 64, 6, 2),    # DeepSeekMoE 16B layer
    "145b": (512, 8192, 4096, 1536, 128, 12, 4),    # DeepSeekMoE 145B-like layer
}
DEFAULT_SHAPES = {"cpu": ("small", "s64"), "cuda": ("ds16b", "fine")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", nargs="+", choices=tuple(SHAPES), help="named shapes (default: small s64 on CPU, ds16b fine on GPU)")
    p.add_argument("--tokens", type=int, help="tokens per call (overrides the shape's)")
    p.add_argument("--hidden", type=int, help="custom shape: hidden size")
    p.add_argument("--inter", type=int, help="custom shape: expert intermediate size")
    p.add_argument("--experts", type=int, help="custom shape: routed experts")
    p.add_argument("--topk", type=int, help="custom shape: experts per token")
    p.add_argument("--shared", type=int, default=None, help="custom shape: shared experts (default 0 with a custom shape)")
    p.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32"], help="default fp32")
    p.add_argument("--mode", nargs="+", choices=("fwd", "fwdbwd"), default=["fwd", "fwdbwd"], help="default both")
    p.add_argument("--impl", nargs="+", choices=("dsmoe", "reference"), default=["dsmoe", "reference"])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions, median reported (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def _shapes(ns, device) -> list[tuple[str, tuple]]:
    custom = [ns.hidden, ns.inter, ns.experts, ns.topk]
    if any(v is not None for v in custom):
        if any(v is None for v in custom):
            raise CLIError("a custom shape needs all of --hidden, --inter, --experts, --topk")
        T = ns.tokens or 2048
        shape = (T, T, ns.hidden, ns.inter, ns.experts, ns.topk, ns.shared or 0)
        name = f"T{T} h{ns.hidden} I{ns.inter} E{ns.experts} k{ns.topk}" + (f" +{ns.shared}" if ns.shared else "")
        return [(name, shape)]
    names = ns.shape or DEFAULT_SHAPES["cuda" if device.type == "cuda" else "cpu"]
    out = []
    for n in names:
        s = list(SHAPES[n])
        if ns.tokens:
            s[0] = s[1] = ns.tokens
        out.append((n, tuple(s)))
    return out


def _layer(shape, dtype, device, seed):
    from dsmoe.config import DeepSeekMoEConfig
    from dsmoe.layers import DeepSeekMoELayer

    _, _, h, inter, E, k, shared = shape
    if k > E:
        raise CLIError(f"--topk {k} exceeds --experts {E}")
    heads = 1
    cfg = DeepSeekMoEConfig(vocab_size=256, hidden_size=h, intermediate_size=4 * h, moe_intermediate_size=inter,
                            num_hidden_layers=1, num_attention_heads=heads, n_routed_experts=E,
                            num_experts_per_tok=k, n_shared_experts=shared or None, aux_loss_alpha=0.001)
    torch.manual_seed(seed)
    layer = DeepSeekMoELayer(cfg)
    with torch.no_grad():
        layer.experts.w_gate_up.normal_(0, 0.02)
        layer.experts.w_down.normal_(0, 0.02)
    return layer.to(device=device, dtype=dtype)


def _time(fn, reps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run(ns: argparse.Namespace) -> int:
    check_seed("--seed", ns.seed)
    device = pick_device(ns.device)
    reps = ns.reps if ns.reps is not None else (20 if device.type == "cuda" else 5)
    if reps < 1 or ns.warmup < 0:
        raise CLIError("--reps must be >= 1 and --warmup >= 0")
    if ns.tokens is not None and ns.tokens < 1:
        raise CLIError(f"--tokens must be >= 1, got {ns.tokens}")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    cpu = cpu_name()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    print(f"dsmoe bench on {device} ({where}), torch {torch.__version__}; median of {reps} (after {ns.warmup} warm-up)")
    print("fwd: inference (eval mode; reference = moe_infer); fwd+bwd: training (reference = loop over experts)\n")
    rows = []
    for name, shape in _shapes(ns, device):
        T = shape[1] if device.type == "cuda" else shape[0]
        for dname in ns.dtype:
            dtype = dtypes[dname]
            layer = _layer(shape, dtype, device, ns.seed)
            g = torch.Generator(device="cpu").manual_seed(ns.seed)
            x = torch.randn(1, T, shape[2], generator=g).to(device=device, dtype=dtype)
            grad = torch.randn(1, T, shape[2], generator=g).to(device=device, dtype=dtype)
            results = {}
            outputs = {}
            for impl in ns.impl:
                layer.impl = impl
                for mode in ns.mode:
                    if mode == "fwd":
                        layer.eval()

                        def fn():
                            with torch.no_grad():
                                return layer(x).hidden_states
                    else:
                        layer.train()
                        xg = x.detach().requires_grad_(True)

                        def fn():
                            out = layer(xg)
                            loss = (out.hidden_states * grad).sum()
                            if out.aux_loss is not None:
                                loss = loss + out.aux_loss
                            loss.backward()
                            layer.zero_grad(set_to_none=True)
                            xg.grad = None
                    results[(impl, mode)] = _time(fn, reps, ns.warmup, device)
                layer.eval()
                with torch.no_grad():
                    outputs[impl] = layer(x).hidden_states.float()
            diff = (outputs["dsmoe"] - outputs["reference"]).abs().max().item() if len(outputs) == 2 else float("nan")
            for mode in ns.mode:
                label = name if name.startswith("T") else f"{name} (T{T})"
                row = [label, dname, {"fwd": "fwd", "fwdbwd": "fwd+bwd"}[mode]]
                for impl in ("dsmoe", "reference"):
                    row.append(results.get((impl, mode), float("nan")))
                if ("dsmoe", mode) in results and ("reference", mode) in results:
                    row.append(f"{results[('reference', mode)] / results[('dsmoe', mode)]:.2f}x")
                else:
                    row.append("-")
                row.append(diff if mode == "fwd" else "")
                rows.append(row)
    print(format_table(["shape", "dtype", "pass", "dsmoe ms", "reference ms", "speed-up", "max |diff|"], rows))
    print("\nshapes: " + "; ".join(f"{n}: h{s[2]} I{s[3]} E{s[4]} top-{s[5]} +{s[6]} shared" for n, s in _shapes(ns, device)))
    return 0


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for benchmark headers."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"
