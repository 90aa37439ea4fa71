"""The CPU fast paths (docs/cpu_performance.md) give the reference's answers on every path they
take: each ISA build of the vectorised kernels, every way the grouped GEMM splits rows over
threads (parts of a group on two threads, the few-row kernel, one hot expert), and the layer that
benchmarks/bench_cpu_moe.py times. Speed is never asserted here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe import ops, reference
from conftest import assert_close, offsets_from_counts

ROOT = Path(__file__).resolve().parents[1]
VEC_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Group sizes that exercise the thread split: a hot expert spanning every thread's share, groups of
# 1..4 rows (the few-row kernel) next to larger ones, all groups small (threads split columns),
# empty groups, and K/N that are not multiples of any vector width (16 fp32 lanes, 32 bf16 lanes)
# and span several vector chunks.
SPLIT_CASES = [
    ([300, 1, 0, 2], 70, 45),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 17], 129, 33),
    ([0, 0, 64, 0], 48, 96),
    ([8] * 9, 37, 130),
    # decode-like: every group <= 16 rows, so threads split columns (small kernel and BLAS parts)
    ([1, 0, 3, 4, 2, 0, 1], 129, 50),
    ([16, 5, 0, 2], 40, 70),
]


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"E{len(c[0])}M{sum(c[0])}K{c[1]}N{c[2]}")
@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=str)
@pytest.mark.parametrize("trans_b", [True, False])
def test_grouped_gemm_thread_split(threads, case, dtype, trans_b):
    counts, K, N = case
    E, M = len(counts), sum(counts)
    a = torch.randn(M, K, dtype=dtype)
    b = torch.randn(E, N, K, dtype=dtype) if trans_b else torch.randn(E, K, N, dtype=dtype)
    b = b / K**0.5
    off = offsets_from_counts(counts, "cpu")
    assert_close(ops.grouped_gemm(a, b, off, trans_b), reference.grouped_gemm(a, b, off, trans_b), dtype)
    g = torch.randn(M, N, dtype=dtype)
    got = ops.grouped_gemm_wgrad(a, g, off, trans_b)
    assert_close(got, reference.grouped_gemm_wgrad(a, g, off, trans_b), dtype, scale=M**0.5)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(got[e]) == 0, f"empty expert {e} must get a zero gradient"


@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=str)
def test_grouped_gemm_padded_rows_do_not_leak(threads, dtype):
    # bf16/fp16 GEMMs run on rows padded up to a multiple of 16, reading the next group's rows in
    # place (grouped_gemm.cpp, kRowQuantum): non-finite values there must not reach other groups,
    # and a tail past the end of a is padded with zeros.
    counts, K, N = [37, 3, 530, 21], 40, 24
    E, M = len(counts), sum(counts)
    off = offsets_from_counts(counts, "cpu")
    a = torch.randn(M, K, dtype=dtype)
    a[37:40] = float("inf")  # group 1
    b = torch.randn(E, N, K, dtype=dtype) / K**0.5
    got = ops.grouped_gemm(a, b, off, True)
    want = reference.grouped_gemm(a, b, off, True)
    finite = torch.ones(M, dtype=torch.bool)
    finite[37:40] = False
    assert torch.isfinite(got[finite]).all()
    assert_close(got[finite], want[finite], dtype)
    g = torch.randn(M, N, dtype=dtype)
    a[37:40] = 1.0
    assert_close(ops.grouped_gemm_wgrad(a, g, off, True), reference.grouped_gemm_wgrad(a, g, off, True),
                 dtype, scale=M**0.5)


def test_grouped_gemm_wgrad_is_a_normal_tensor():
    # The weight gradient comes from dsmoe's own allocator (huge pages, blocks reused between
    # steps): it must behave like any CPU tensor.
    a, g = torch.randn(40, 8), torch.randn(40, 600)
    off = offsets_from_counts([10, 0, 30], "cpu")
    w = ops.grouped_gemm_wgrad(a, g, off, True)
    assert w.shape == (3, 600, 8) and w.is_contiguous() and w.device.type == "cpu"
    before = w.clone()
    w.add_(1.0)
    assert_close(w - 1.0, before, torch.float32)
    w.resize_(3, 600, 16)  # needs the storage's allocator
    assert w.numel() == 3 * 600 * 16
    assert_close(before, reference.grouped_gemm_wgrad(a, g, off, True), torch.float32, scale=10)


def test_grouped_gemm_wgrad_reused_memory_is_overwritten():
    # A freed gradient's block is handed to the next gradient of the same size: the new one must
    # not show the old values, in particular in the experts that got no row (zeros).
    N = 1024
    for K in (64, 256):  # 768 KiB (aligned malloc) and 3 MiB (huge pages)
        a, g = torch.randn(60, K), torch.randn(60, N)
        full = ops.grouped_gemm_wgrad(a, g, offsets_from_counts([20, 20, 20], "cpu"), True)
        assert torch.count_nonzero(full[1]) > 0
        del full
        off = offsets_from_counts([30, 0, 30], "cpu")
        for _ in range(2):
            got = ops.grouped_gemm_wgrad(a, g, off, True)
            assert torch.count_nonzero(got[1]) == 0
            assert_close(got, reference.grouped_gemm_wgrad(a, g, off, True), torch.float32, scale=10)
            del got


_ISA_SCRIPT = r"""
import json, torch
from dsmoe import ops, reference
torch.manual_seed(0)
res = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    def err(x, y):
        x, y = x.double(), y.double()
        return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()
    gu = torch.randn(37, 2 * 75, dtype=dtype)
    go = torch.randn(37, 75, dtype=dtype)
    res[f"{dtype} swiglu"] = err(ops.swiglu(gu), reference.swiglu(gu))
    gu64 = gu.double().requires_grad_()
    (ref_d,) = torch.autograd.grad(reference.swiglu(gu64), gu64, go.double())
    res[f"{dtype} swiglu_backward"] = err(torch.ops.dsmoe.swiglu_backward(go, gu), ref_d)
    T, k, h, E = 29, 3, 70, 6
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    x = torch.randn(T, h, dtype=dtype)
    xp, row_map, off = ops.permute(x, ids, E)
    w = torch.rand(T, k)
    res[f"{dtype} unpermute"] = err(ops.unpermute(xp, row_map, w), reference.unpermute(xp, row_map, w))
    gy = torch.randn(T, h, dtype=dtype)
    gyp, gw = torch.ops.dsmoe.unpermute_backward(gy, xp, row_map, w)
    xp64, w64 = xp.double().requires_grad_(), w.double().requires_grad_()
    rgp, rgw = torch.autograd.grad(reference.unpermute(xp64, row_map, w64), [xp64, w64], gy.double())
    res[f"{dtype} unpermute_backward"] = max(err(gyp, rgp), err(gw, rgw))
    res[f"{dtype} permute_backward"] = err(torch.ops.dsmoe.permute_backward(xp, row_map, k), reference.unpermute(xp, row_map, torch.ones(T, k)))
    for E in (16, 21, 5):  # softmax: whole vectors, a tail, shorter than a vector
        logits = torch.randn(37, E, dtype=dtype) * 3
        logits[0] = 1.5  # equal logits: equal probs, ties to the lower expert id
        got, want = ops.gate(logits, 3, True), reference.gate(logits, 3, True)
        res[f"{dtype} gate E={E}"] = max(err(got[0], want[0]), err(got[3], want[3]))
        assert torch.equal(got[1], want[1]), f"{dtype} E={E}: gate chose other experts than the reference"
        logits64 = logits.double().requires_grad_()
        g = torch.randn(37, 3)
        (ref_g,) = torch.autograd.grad(reference.gate(logits64, 3, True)[0], logits64, g.double())
        got_g = torch.ops.dsmoe.gate_backward(g, torch.zeros(1, E), logits, got[1], True, 1)
        res[f"{dtype} gate_backward E={E}"] = err(got_g, ref_g)
    for rows in (1, 3, 8):
        a = torch.randn(rows, 133, dtype=dtype); b = torch.randn(2, 41, 133, dtype=dtype)
        o = torch.tensor([0, rows, rows], dtype=torch.int32)
        res[f"{dtype} small_gemm rows={rows}"] = err(ops.grouped_gemm(a, b, o, True), reference.grouped_gemm(a, b, o, True))
print("RESULT", json.dumps(res))
"""


def _isas():
    out = ["default", "avx2"]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        out.append("avx512")
    return out


@pytest.mark.parametrize("isa", _isas())
def test_vec_kernels_every_isa(isa):
    # Each ISA build (vec_kernels_*.cpp) is chosen by ATen's ATEN_CPU_CAPABILITY at first use, so
    # each runs in a process of its own.
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    if isa != "avx512":  # AVX512 GEMMs forced (tools/mutate_kernels.py does on AMX CPUs) cannot run there
        for name in ("DSMOE_CPU_BF16_GEMM", "DSMOE_CPU_FP32_GEMM"):
            if env.get(name) == "avx512":
                del env[name]
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stdout[-2000:]
    errs = json.loads(line[0][7:])
    tol = {"torch.float32": 1e-5, "torch.bfloat16": 1.5e-2, "torch.float16": 2e-3}
    bad = {k: v for k, v in errs.items() if not v <= tol[k.split()[0]]}
    assert not bad, f"ATEN_CPU_CAPABILITY={isa}: relative errors too large: {bad}"


def test_benchmark_layer_matches_reference():
    # The dsmoe layer the CPU benchmark times equals the seeds' moe_infer, forward and backward.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_cpu_moe as bench
    finally:
        sys.path.pop(0)
    dims = (48, 40, 24, 6, 2, 1)
    for routing in ("uniform", "skewed"):
        p = bench.prepare(dims, torch.float32, routing, train=True)
        y = bench.dsmoe_fn(p)
        with torch.no_grad():
            ref = bench.hf_infer(p)
        assert_close(y, ref, torch.float32, scale=4)
        y.backward(p["gy"])
        got = {n: p[n].grad.clone() for n in ("x", "wg", "w1", "w2", "ws1", "ws2")}
        for n in got:
            p[n].grad = None
        bench.hf_train(p).backward(p["gy"])
        for n, gr in got.items():
            assert_close(gr, p[n].grad, torch.float32, scale=8, msg=f"d{n} ({routing})")


_FP32_GEMM_SCRIPT = r"""
import torch, dsmoe
from dsmoe import ops, reference
from conftest import assert_close, offsets_from_counts
print("KERNEL", dsmoe.cpu_kernels()["fp32_gemm"])
torch.manual_seed(0)
# As for bf16 below; 700 x 257 fp32 > 512 KiB: whole weight packed first on the avx512 kernel.
cases = [([300, 1, 0, 2], 70, 45), ([8] * 9, 37, 130), ([530, 21], 129, 33), ([1, 5, 6, 7, 0, 13], 1, 1),
         ([6, 70], 17, 65), ([700, 9], 257, 96)]
for threads in (1, 2):
    torch.set_num_threads(threads)
    for counts, K, N in cases:
        E, M = len(counts), sum(counts)
        off = offsets_from_counts(counts, "cpu")
        a = torch.randn(M, K)
        for trans_b in (True, False):
            b = torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)
            got = ops.grouped_gemm(a, b, off, trans_b)
            assert_close(got, reference.grouped_gemm(a, b, off, trans_b), torch.float32)
            # the weight gradient (its reduction is the group's rows: odd, 1, past a 16-row strip)
            g = torch.randn(M, N)
            got = ops.grouped_gemm_wgrad(a, g, off, trans_b)
            want = reference.grouped_gemm_wgrad(a.double(), g.double(), off, trans_b).float()
            assert_close(got, want, torch.float32, scale=max(counts) ** 0.5)
print("OK")
"""


def _run_backend_script(variable, backend, script):
    # The GEMM backend is read once per process: run the script in a process of its own. It
    # prints "KERNEL <what runs>" and "OK"; avx512 on a CPU without AVX512-BF16 must be refused.
    env = dict(os.environ, **{variable: backend})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    import dsmoe

    if backend == "avx512" and not dsmoe.cpu_kernels()["cpu_avx512_bf16"]:
        assert r.returncode != 0 and "no AVX512-BF16" in r.stderr, r.stderr[-2000:]
        return
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
    if backend == "onednn" and variable == "DSMOE_CPU_FP32_GEMM" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        backend = "mkl"  # torch's oneDNN fp32 matmul refuses CPUs without AVX-512
    assert f"KERNEL {backend}" in r.stdout


@pytest.mark.parametrize("backend", ["avx512", "onednn", "mkl"])
def test_grouped_gemm_fp32_backends(backend):
    # fp32 GEMMs run on dsmoe's AVX512 kernel where the CPU has AVX512-BF16 and no AMX, else on
    # oneDNN, or on MKL with DSMOE_CPU_FP32_GEMM=mkl; all give the reference's answers.
    _run_backend_script("DSMOE_CPU_FP32_GEMM", backend, _FP32_GEMM_SCRIPT)


@pytest.mark.parametrize("variable, dtype, message", [
    ("DSMOE_CPU_FP32_GEMM", "float32", "DSMOE_CPU_FP32_GEMM must be 'auto', 'avx512', 'onednn' or 'mkl'"),
    ("DSMOE_CPU_BF16_GEMM", "bfloat16", "DSMOE_CPU_BF16_GEMM must be 'auto', 'onednn', 'avx512' or 'fp32'"),
])
def test_grouped_gemm_backend_bad_value(variable, dtype, message):
    env = dict(os.environ, **{variable: "cublas"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = (f"import torch; from dsmoe import ops; dt = torch.{dtype}; "
            "ops.grouped_gemm(torch.randn(4, 8, dtype=dt), torch.randn(1, 8, 8, dtype=dt), "
            "torch.tensor([0, 4], dtype=torch.int32), True)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]


_BF16_GEMM_SCRIPT = r"""
import torch, dsmoe
from dsmoe import ops, reference
from conftest import assert_close, offsets_from_counts
print("KERNEL", dsmoe.cpu_kernels()["bf16_gemm"])
torch.manual_seed(0)
# Row counts around the 6-row tiles, K odd / 1 / past one 16-pair strip, N around the 64-column
# panels, empty groups, and a part too large for the streamed kernel (1100 x 257 bf16 > 512 KiB:
# whole weight packed first).
cases = [([1, 5, 6, 7, 0, 13], 1, 1), ([12, 0, 25], 33, 17), ([40, 3], 2, 64), ([6, 70], 31, 65),
         ([19, 114], 1280 // 8, 130), ([1100, 9], 257, 96), ([2, 3, 4], 64, 200)]
for threads in (1, 2, 3):
    torch.set_num_threads(threads)
    for counts, K, N in cases:
        E, M = len(counts), sum(counts)
        off = offsets_from_counts(counts, "cpu")
        a = torch.randn(M, K, dtype=torch.bfloat16)
        for trans_b in (True, False):
            b = torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)
            b = (b / K**0.5).bfloat16()
            got = ops.grouped_gemm(a, b, off, trans_b)
            # fp32 accumulation, one rounding: within one bf16 ulp of the fp64 product
            want = reference.grouped_gemm(a.double(), b.double(), off, trans_b)
            assert_close(got, want.bfloat16(), torch.bfloat16, msg=f"{counts} K{K} N{N} trans_b={trans_b}")
            # every element written (the output is not zero-initialised)
            assert torch.isfinite(got).all()
            # and the transposed weight through a view (not contiguous: oneDNN path) agrees
            bt = b.transpose(1, 2).contiguous().transpose(1, 2)
            assert_close(ops.grouped_gemm(a, bt, off, trans_b), got, torch.bfloat16)
            # the weight gradient: fp32 accumulation over the group's rows, one rounding
            g = torch.randn(M, N, dtype=torch.bfloat16)
            got = ops.grouped_gemm_wgrad(a, g, off, trans_b)
            want = reference.grouped_gemm_wgrad(a.double(), g.double(), off, trans_b)
            assert_close(got, want.bfloat16(), torch.bfloat16, scale=max(counts) ** 0.5,
                         msg=f"wgrad {counts} K{K} N{N} trans_b={trans_b}")
            assert torch.isfinite(got).all()
print("OK")
"""


@pytest.mark.parametrize("backend", ["onednn", "avx512", "fp32"])
def test_grouped_gemm_bf16_backends(backend):
    # bf16 GEMMs run on dsmoe's AVX512-BF16 kernel where the CPU has it and no AMX, in fp32 (parts
    # of 5+ rows converted, fp32 BLAS) where the CPU has no bf16 arithmetic, else on oneDNN
    # (avx512_gemm.h); each can be asked for, and all give the fp64 product within a bf16 rounding.
    _run_backend_script("DSMOE_CPU_BF16_GEMM", backend, _BF16_GEMM_SCRIPT)


def test_bf16_gemm_auto_choice():
    # auto: the AVX512-BF16 kernel where it runs, oneDNN on AMX, fp32 where the CPU has neither
    # (a CPU with AMX has AVX512-BF16 too).
    import dsmoe

    with dsmoe.use_backend(cpu_bf16_gemm="auto"):
        info = dsmoe.cpu_kernels()
    if not info["cpu_avx512_bf16"]:
        assert info["bf16_gemm"] == "fp32"
    else:
        assert info["bf16_gemm"] in ("avx512", "onednn")
    for choice in ("onednn", "fp32"):
        with dsmoe.use_backend(cpu_bf16_gemm=choice):
            assert dsmoe.cpu_kernels()["bf16_gemm"] == choice


def test_bf16_gemm_in_fp32_matches_onednn_every_path():
    # The fp32 route against oneDNN's bf16 GEMM on the same inputs, through each path of the
    # grouped GEMM that can take it: the decode column split (every group <= 16 rows, parts of
    # 5-16 rows), row shares (a group straddling the threads' ranges) and the weight gradient.
    # Both sum in fp32 and round once, so they agree to a bf16 rounding of the result.
    import dsmoe
    from dsmoe import ops

    torch.manual_seed(0)
    for counts in ([5, 0, 16, 1, 9], [70, 3, 200, 6], [1, 2, 3, 4]):
        off = offsets_from_counts(counts, "cpu")
        M, K, N = sum(counts), 72, 40
        a = torch.randn(M, K).bfloat16()
        g = torch.randn(M, N).bfloat16()
        for trans_b in (True, False):
            b = (torch.randn(len(counts), *((N, K) if trans_b else (K, N))) / K**0.5).bfloat16()
            got = {}
            for choice in ("onednn", "fp32"):
                with dsmoe.use_backend(cpu_bf16_gemm=choice):
                    got[choice] = (ops.grouped_gemm(a, b, off, trans_b), ops.grouped_gemm_wgrad(a, g, off, trans_b))
            for x, y in zip(got["fp32"], got["onednn"]):
                assert x.dtype == torch.bfloat16
                torch.testing.assert_close(x.float(), y.float(), rtol=1e-2, atol=1e-2)


def test_cpu_kernels_reports_choice():
    import dsmoe

    info = dsmoe.cpu_kernels()
    assert info["vec_isa"] in ("AVX512", "AVX2", "DEFAULT")
    assert info["bf16_gemm"] in ("avx512", "onednn", "fp32")
    assert info["fp32_gemm"] in ("avx512", "onednn", "mkl")
    if "avx512" in (info["bf16_gemm"], info["fp32_gemm"]):
        assert info["cpu_avx512_bf16"]


_CACHE_SCRIPT = r"""
import torch
from dsmoe import ops, reference
from conftest import assert_close
torch.manual_seed(0)
# Outputs of 1-5 MiB, freed and requested again at other sizes: blocks are reused when they fit
# (best fit, at most 1/8 to spare), evicted past the cap; every result must be fresh.
for rows in (600, 2100, 2000, 1900, 700, 2100, 5000, 600):
    gu = torch.randn(rows, 2 * 512)
    want = reference.swiglu(gu)
    got = ops.swiglu(gu)
    assert_close(got, want, torch.float32)
    got.resize_(rows + 10, 512)  # needs the storage's allocator
    g = torch.randn(rows, 512)
    gu64 = gu.double().requires_grad_()
    (want_grad,) = torch.autograd.grad(reference.swiglu(gu64), gu64, g.double())
    assert_close(torch.ops.dsmoe.swiglu_backward(g, gu), want_grad.float(), torch.float32)
print("OK")
"""


@pytest.mark.parametrize("cap_mb", ["0", "3", "64"])
def test_caching_allocator_reuse_and_eviction(cap_mb):
    # The ops' large outputs come from dsmoe's caching allocator (caching_allocator.h), its cap read
    # once per process: off, smaller than the blocks (every block evicted), and holding several.
    env = dict(os.environ, DSMOE_CPU_CACHE_MB=cap_mb)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_huge_page_tensors_are_normal_tensors():
    from dsmoe._ext import advise_huge_pages, empty_huge_pages

    t = empty_huge_pages((3, 1024, 1024), torch.bfloat16)  # 6 MiB: huge-page aligned
    assert t.shape == (3, 1024, 1024) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % (2 << 20) == 0
    t.fill_(2.0)
    assert t.float().sum().item() == 2.0 * t.numel()
    t.resize_(4, 1024, 1024)  # needs the storage's allocator
    small = empty_huge_pages((5, 7), torch.float32)
    small.copy_(torch.arange(35.0).view(5, 7))
    assert small[4, 6].item() == 34.0
    x = torch.randn(3000, 1000)
    before = x.clone()
    assert isinstance(advise_huge_pages(x), bool) and isinstance(advise_huge_pages(x, collapse=True), bool)
    assert torch.equal(x, before)  # a hint only
    with pytest.raises(RuntimeError, match="expected a CPU tensor"):
        advise_huge_pages(torch.empty(4, device="meta"))
    del t, small


def test_expert_weights_on_huge_pages_keep_their_values():
    # RoutedExperts puts CPU expert weights of 2 MiB or more on huge pages at construction and
    # after every conversion; the values, the Parameter objects and training are unaffected.
    from dsmoe.layers import RoutedExperts

    torch.manual_seed(0)
    m = RoutedExperts(8, 256, 512)  # w_gate_up 4 MiB in fp32
    assert m.w_gate_up.data_ptr() % (2 << 20) == 0
    params = list(m.parameters())
    want = m.w_gate_up.detach().clone()
    m.to(torch.bfloat16)
    assert list(m.parameters())[0] is params[0] and m.w_gate_up.dtype == torch.bfloat16
    assert torch.equal(m.w_gate_up.detach(), want.bfloat16())
    assert m.w_gate_up.data_ptr() % (2 << 20) == 0
    m.float()
    x = torch.randn(40, 256)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(40)]).to(torch.int32)
    w = torch.rand(40, 2)
    y = m(x, w, ids)
    ref = reference.moe_infer(x, ids.long(), w, m.w_gate_up, m.w_down)
    assert_close(y, ref, torch.float32, scale=4)
    y.sum().backward()
    assert m.w_gate_up.grad is not None and m.w_gate_up.grad.shape == m.w_gate_up.shape
