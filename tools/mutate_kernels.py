"""Mutation testing of the C++ CPU kernels (csrc/cpu/) and of the CUDA kernel sources under the
SIMT emulator (csrc/cuda/*.cu, csrc/index_math.h; tools/simt_build.py, docs/simt.md).

Each mutant is one exact text replacement in one source file (the script stops before touching
anything if an anchor no longer occurs exactly once: update the list when the sources change).
For each mutant: apply it, rebuild (the CPU extension with ``setup.py build_ext --inplace``, or
the emulator library with tools/simt_build.py; ninja recompiles only what the file touches), run
the tests that should catch it, restore the file. First each test selection runs once on the
unmutated build and must pass (else a kill would mean nothing; --no-baseline skips that). The
file is always restored (``finally``, also on Ctrl-C), and the clean build is rebuilt at the end.
A mutant is

* killed: the tests fail (what every mutant must be; a survivor means a missing test),
* SURVIVED: the tests pass,
* not runnable here: its code only runs on an ISA this CPU lacks (dsmoe.cpu_kernels() says which
  paths run; on an AVX2-only CPU the AVX512 GEMM kernels never run, so their mutants are reported
  as such, never as killed; on an AMX CPU, where "auto" picks oneDNN, their tests run with
  DSMOE_CPU_BF16_GEMM=DSMOE_CPU_FP32_GEMM=avx512),
* build failed: the mutant does not compile (reported; not counted as killed).

    python tools/mutate_kernels.py                 # every mutant (CPU, then SIMT), nice 19 advised
    python tools/mutate_kernels.py --list          # the mutants
    python tools/mutate_kernels.py --only cpu-gate-tie-rule,simt-swiglu-backward
    python tools/mutate_kernels.py --target simt   # only the CUDA sources under the emulator
    python tools/mutate_kernels.py --check         # only check that every anchor still matches

Results go to stdout and to build/mutation/kernels.json. Not in CI (each mutant is a rebuild:
about a minute on 2 cores); the tests the mutants asked for are in tests/ and run in CI.
docs/mutation_testing.md has the last results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str  # relative to ROOT
    old: str  # exact text, must occur once
    new: str
    tests: list[str]  # pytest arguments
    target: str = "cpu"  # "cpu": the extension dsmoe._C; "simt": the emulator library
    needs: str = ""  # "avx512": runs only where dsmoe.cpu_kernels() reports avx512 GEMMs
    why: str = ""
    extra: dict = field(default_factory=dict)


GATE_T = ["tests/test_ops_gate.py", "tests/test_mutation_kills.py", "-k", "gate"]
PERMUTE_T = ["tests/test_ops_permute.py", "tests/test_mutation_kills.py", "-k", "permute"]
GEMM_T = ["tests/test_ops_gemm.py", "tests/test_cpu_fastpaths.py", "tests/test_mutation_kills.py", "-k",
          "grouped_gemm or vec_kernels"]
SWIGLU_T = ["tests/test_ops_gemm.py", "tests/test_cpu_fastpaths.py", "tests/test_mutation_kills.py", "-k",
            "swiglu or vec_kernels"]
DECODE_T = ["tests/test_moe_decode.py"]
SIMT_GATE_T = ["tests/test_cuda_ops.py", "-k", "gate"]
SIMT_PERMUTE_T = ["tests/test_cuda_ops.py", "-k", "permute or unpermute or routing"]
SIMT_SWIGLU_T = ["tests/test_cuda_ops.py", "-k", "swiglu"]
SIMT_GEMM_T = ["tests/test_simt_grouped_gemm.py"]  # (test_cuda_grouped_gemm.py: tensor-core paths, GPU only)

MUTANTS = [
    # ---- gate (csrc/cpu/gate.cpp, csrc/index_math.h shared with the CUDA kernels) ----
    Mutant("cpu-gate-tie-rule", "csrc/index_math.h",
           "while (pos > 0 && key > keys[pos - 1]) {", "while (pos > 0 && key >= keys[pos - 1]) {",
           GATE_T, why="tie rule flipped: an equal key moves before the earlier (lower) id"),
    Mutant("cpu-gate-tie-enter-full", "csrc/index_math.h",
           "if (count == k && !(key > keys[k - 1])) return;", "if (count == k && !(key >= keys[k - 1])) return;",
           GATE_T, why="an equal key replaces the k-th when the list is full (ties to the higher id)"),
    Mutant("cpu-gate-no-renormalise", "csrc/cpu/gate.cpp",
           "        if (normalize) {\n          const acc_t denom = sum + acc_t(1e-20);",
           "        if (false) {\n          const acc_t denom = sum + acc_t(1e-20);",
           GATE_T, why="top-k renormalisation dropped"),
    Mutant("cpu-gate-backward-no-renorm-term", "csrc/cpu/gate.cpp",
           "dp[ids[j]] += gw[j] / D - gdot / (D * D);", "dp[ids[j]] += gw[j] / D;",
           GATE_T, why="backward of the renormalisation misses its -sum g p / D^2 term"),
    Mutant("cpu-gate-softmax-backward", "csrc/index_math.h",
           "return p * (dp - dot);", "return p * dp;", GATE_T, why="softmax backward without the dot term"),
    Mutant("cpu-gate-seq-last-token", "csrc/cpu/gate.cpp",
           "for (int64_t t = s * L; t < (s + 1) * L; ++t) {", "for (int64_t t = s * L; t < (s + 1) * L - 1; ++t) {",
           GATE_T, why="per-sequence statistics skip each sequence's last token (off by one)"),
    Mutant("cpu-gate-counts-last-slot", "csrc/cpu/gate.cpp",
           "for (int64_t j = 0; j < k; ++j) counts[id_p[t * k + j]] += 1;",
           "for (int64_t j = 0; j + 1 < k; ++j) counts[id_p[t * k + j]] += 1;",
           GATE_T, why="tokens_per_expert misses the last slot of every token"),
    Mutant("cpu-gate-backward-seq-row", "csrc/cpu/gate.cpp",
           "const acc_t* gs = gs_p + (t / L) * E;", "const acc_t* gs = gs_p;",
           GATE_T, why="backward reads the first sequence's score-sum gradient for every token"),
    Mutant("cpu-gate-softmax-tail", "csrc/cpu/vec_kernels_impl.h",
           "if (e < E) {  // the tail", "if (false) {  // the tail",
           GATE_T, why="vectorised softmax skips the tail (E not a multiple of the vector width)"),
    Mutant("cpu-gate-fp64-sum-narrowed", "csrc/cpu/gate.cpp",
           "  acc_t sum = 0;\n  for (int64_t e = 0; e < E; ++e) {\n    probs[e]",
           "  float sum = 0;\n  for (int64_t e = 0; e < E; ++e) {\n    probs[e]",
           GATE_T, why="accumulation dtype narrowed: the fp64 softmax sums in fp32"),
    # ---- permute / unpermute (csrc/cpu/permute.cpp, vec_kernels_impl.h) ----
    Mutant("cpu-permute-last-offset", "csrc/cpu/permute.cpp",
           "for (int64_t e = 0; e <= E; ++e) offsets[e] = static_cast<int32_t>(cursor[e]);",
           "for (int64_t e = 0; e < E; ++e) offsets[e] = static_cast<int32_t>(cursor[e]);",
           PERMUTE_T, why="off by one: expert_offsets[E] never written"),
    Mutant("cpu-permute-count-bucket", "csrc/cpu/permute.cpp",
           "cursor[(e < E ? static_cast<int64_t>(e) : E) + 1] += 1;",
           "cursor[(e < E ? static_cast<int64_t>(e) : E)] += (e < E);",
           PERMUTE_T, why="off by one: each expert's count lands in the previous one's slot"),
    Mutant("cpu-permute-no-zero-fill", "csrc/cpu/permute.cpp",
           "std::memset(dst + map_p[f] * row_bytes, 0, row_bytes);", "(void)0;",
           PERMUTE_T, why="zero-fill of dropped rows (ids >= E) removed"),
    Mutant("cpu-permute-source-row", "csrc/cpu/permute.cpp",
           "src + (f / k) * row_bytes", "src + (f % k) * row_bytes",
           PERMUTE_T, why="copies the wrong token's row"),
    Mutant("cpu-unpermute-weights-ignored", "csrc/cpu/vec_kernels_impl.h",
           "for (int p = 0; p < L::P; ++p) acc[p] = at::vec::fmadd(wj, v[p], acc[p]);",
           "for (int p = 0; p < L::P; ++p) acc[p] = acc[p] + v[p];",
           PERMUTE_T, why="unpermute ignores the routing weights (vector path)"),
    Mutant("cpu-permute-backward-last-slot-only", "csrc/cpu/vec_kernels_impl.h",
           "for (int p = 0; p < L::P; ++p) acc[p] = acc[p] + v[p];",
           "for (int p = 0; p < L::P; ++p) acc[p] = v[p];",
           PERMUTE_T, why="permute backward keeps only the last slot instead of the sum"),
    Mutant("cpu-gather-tail", "csrc/cpu/vec_kernels_impl.h",
           "    for (int64_t c = 0; c < h; c += L::N) {\n      const int64_t n = std::min<int64_t>(L::N, h - c);\n      Vf acc[L::P], v[L::P];",
           "    for (int64_t c = 0; c + L::N <= h; c += L::N) {\n      const int64_t n = std::min<int64_t>(L::N, h - c);\n      Vf acc[L::P], v[L::P];",
           PERMUTE_T, why="tail loop skipped: the last h % N columns of unpermute / permute backward"),
    Mutant("cpu-unpermute-backward-dot", "csrc/cpu/vec_kernels_impl.h",
           "dot = at::vec::fmadd(gv[p], yv[p], dot);", "dot = at::vec::fmadd(gv[p], gv[p], dot);",
           PERMUTE_T, why="weight gradient dots grad_y with itself instead of y_perm"),
    Mutant("cpu-unpermute-fp64-weights", "csrc/cpu/permute.cpp",
           "const acc_t wj = w ? w[t * k + j] : acc_t(1);", "const acc_t wj = acc_t(1);",
           PERMUTE_T, why="the scalar (fp64) gather ignores the weights"),
    # ---- grouped GEMM (csrc/cpu/grouped_gemm.cpp, vec_kernels_impl.h, avx512_gemm_kernels.cpp) ----
    Mutant("cpu-gemm-thread-boundary", "csrc/cpu/grouped_gemm.cpp",
           "run_share(c * rows / threads, (c + 1) * rows / threads);",
           "run_share(c * rows / threads, (c + 1) * rows / threads - (c + 1 < threads));",
           GEMM_T, why="thread split boundary shifted: a row at each boundary is computed by no thread"),
    Mutant("cpu-gemm-ungrouped-rows-not-zeroed", "csrc/cpu/grouped_gemm.cpp",
           "if (off.back() < M) c.narrow(0, off.back(), M - off.back()).zero_();", "",
           GEMM_T, why="zero-fill of rows past the last offset removed"),
    Mutant("cpu-wgrad-empty-group-not-zeroed", "csrc/cpu/grouped_gemm.cpp",
           "if (off[g + 1] == off[g]) out.select(0, g).zero_();", "",
           GEMM_T, why="weight gradient of an expert with no rows not zeroed"),
    Mutant("cpu-wgrad-column-split", "csrc/cpu/grouped_gemm.cpp",
           "n1 = split_col(hi - off[g]);", "n1 = split_col(hi - off[g] - (hi < off[g + 1]));",
           GEMM_T, why="weight-gradient column split boundary shifted when a group straddles threads"),
    Mutant("cpu-gemm-decode-column-split", "csrc/cpu/grouped_gemm.cpp",
           "const int64_t n0 = t * N / threads, n1 = (t + 1) * N / threads;",
           "const int64_t n0 = t * N / threads, n1 = (t + 1) * N / threads - (t + 1 < threads);",
           GEMM_T, why="decode path: thread column split boundary shifted"),
    Mutant("cpu-gemm-padded-rows-copy", "csrc/cpu/grouped_gemm.cpp",
           "rows_c.copy_(c_pad.narrow(0, 0, m));", "rows_c.copy_(c_pad.narrow(0, padded - m, m));",
           GEMM_T, why="oneDNN bucketed GEMM copies the wrong rows of the padded result"),
    Mutant("cpu-gemm-bf16-fp32-column-offset", "csrc/cpu/grouped_gemm.cpp",
           "c.narrow(0, lo, hi - lo).narrow(1, n0, n1 - n0).copy_(cf);",
           "c.narrow(0, lo, hi - lo).narrow(1, 0, n1 - n0).copy_(cf);",
           GEMM_T, why="bf16 in fp32: a thread's column slice written at column 0 (decode column split)"),
    Mutant("cpu-gemm-bf16-fp32-weight-slice", "csrc/cpu/grouped_gemm.cpp",
           "b.select(0, g).narrow(0, n0, n1 - n0).to(at::kFloat).t()",
           "b.select(0, g).narrow(0, 0, n1 - n0).to(at::kFloat).t()",
           GEMM_T, why="bf16 in fp32: every thread converts the first columns of the weight"),
    Mutant("cpu-small-gemm-k-tail", "csrc/cpu/vec_kernels_impl.h",
           "if (k_full < K) small_gemm_nt_step<T, R>(a, ld, bn, k_full, K - k_full, acc);", "",
           GEMM_T, why="small GEMM (decode) skips the reduction tail K % N"),
    Mutant("cpu-small-gemm-row-block", "csrc/cpu/vec_kernels_impl.h",
           "case 3: small_gemm_nt_block<T, 3>(ar, ld, b, cr, ldc, N, K); break;",
           "case 3: small_gemm_nt_block<T, 2>(ar, ld, b, cr, ldc, N, K); break;",
           GEMM_T, why="small GEMM: a block of 3 rows computes only 2"),
    Mutant("cpu-small-gemm-fp32-narrowed", "csrc/cpu/vec_kernels_impl.h",
           "af[r * ld + k] = static_cast<float>(a[r * K + k]);",
           "af[r * ld + k] = static_cast<float>(static_cast<c10::Half>(a[r * K + k]));",
           GEMM_T, why="accumulation dtype narrowed: fp32 small-GEMM inputs rounded to fp16"),
    Mutant("cpu-gemm-offsets-check", "csrc/cpu/grouped_gemm.cpp",
           "TORCH_CHECK(out[n - 1] <= rows,", "TORCH_CHECK(out[n - 1] <= rows + 1,",
           GEMM_T, why="offset validation off by one (reads a row past the end)"),
    Mutant("cpu-avx512-gemm-odd-k", "csrc/cpu/avx512_gemm_kernels.cpp",
           "if (K % W != 0) {  // bf16, odd K: the last element alone", "if (false) {  // bf16, odd K: the last element alone",
           GEMM_T, needs="avx512", why="AVX512 bf16 GEMM skips the last element of an odd K"),
    Mutant("cpu-avx512-small-gemm-tail", "csrc/cpu/avx512_gemm_kernels.cpp",
           "  for (; k < K; k += V) {\n    const __m512i w = Ops::load_chunk(b_row + k, K - k);",
           "  for (; k + V <= K; k += V) {\n    const __m512i w = Ops::load_chunk(b_row + k, K - k);",
           GEMM_T, needs="avx512", why="AVX512 small GEMM skips the reduction tail"),
    Mutant("cpu-avx512-wgrad-transpose-tail", "csrc/cpu/avx512_gemm_kernels.cpp",
           "const int64_t rows = std::min<int64_t>(16 * W, R - r0);", "const int64_t rows = std::min<int64_t>(16 * W, R - r0 - 1);",
           GEMM_T, needs="avx512", why="AVX512 weight gradient: the transpose drops a row of each block"),
    # ---- swiglu (csrc/cpu/swiglu.cpp, vec_kernels_impl.h, index_math.h) ----
    Mutant("cpu-swiglu-backward-term", "csrc/cpu/vec_kernels_impl.h",
           "dgv[p] = dv[p] * uv[p] * s * (one + gv[p] * (one - s));", "dgv[p] = dv[p] * uv[p] * s;",
           SWIGLU_T, why="swiglu backward: d silu / d g without its g s (1 - s) term"),
    Mutant("cpu-swiglu-fp64-backward-term", "csrc/index_math.h",
           "dg = dout * u * s * (acc_t(1) + g * (acc_t(1) - s));", "dg = dout * u * s * (acc_t(1) + g * s);",
           SWIGLU_T, why="scalar (fp64, CUDA) swiglu backward term wrong"),
    Mutant("cpu-swiglu-tail", "csrc/cpu/vec_kernels_impl.h",
           "    for (int64_t c = 0; c < I; c += L::N) {\n      const int64_t n = std::min<int64_t>(L::N, I - c);\n      Vf gv[L::P], uv[L::P];\n",
           "    for (int64_t c = 0; c + L::N <= I; c += L::N) {\n      const int64_t n = std::min<int64_t>(L::N, I - c);\n      Vf gv[L::P], uv[L::P];\n",
           SWIGLU_T, why="swiglu forward tail loop skipped"),
    Mutant("cpu-swiglu-chunk-offset", "csrc/cpu/swiglu.cpp",
           "kernel(in + begin * 2 * I, o + begin * I, end - begin, I);", "kernel(in + begin * I, o + begin * I, end - begin, I);",
           SWIGLU_T, why="thread chunks after the first read the wrong rows"),
    # ---- decode on packed weights (csrc/cpu/moe_decode.cpp) ----
    Mutant("cpu-decode-pack-gate-up-swapped", "csrc/cpu/moe_decode.cpp",
           "dst[c * 16 + r] = g[c];\n            dst[c * 16 + 8 + r] = u[c];",
           "dst[c * 16 + r] = u[c];\n            dst[c * 16 + 8 + r] = g[c];",
           DECODE_T, why="packing puts the up rows in the gate lanes and back"),
    Mutant("cpu-decode-pack-padding-kept", "csrc/cpu/moe_decode.cpp",
           "for (int64_t c = 0; c < h; ++c) dst[c * 16 + r] = dst[c * 16 + 8 + r] = T(0);",
           "for (int64_t c = 0; c < 0; ++c) dst[c * 16 + r] = dst[c * 16 + 8 + r] = T(0);",
           DECODE_T, why="zero-fill removed: the gate|up rows past I keep what the buffer held"),
    Mutant("cpu-decode-pack-down-padding-kept", "csrc/cpu/moe_decode.cpp",
           "for (int64_t i = I; i < Ip; ++i) dst[i * 8 + r] = T(0);",
           "for (int64_t i = I; i < I; ++i) dst[i * 8 + r] = T(0);",
           DECODE_T, why="zero-fill removed: the down columns past I keep what the buffer held"),
    Mutant("cpu-decode-output-tail", "csrc/cpu/moe_decode.cpp",
           "const int64_t cols = std::min<int64_t>(8, h - b * 8);",
           "const int64_t cols = std::min<int64_t>(8, h - b * 8 - 1);",
           DECODE_T, why="tail skipped: the last output column of h is never written"),
    Mutant("cpu-decode-routing-weight-ignored", "csrc/cpu/moe_decode.cpp",
           "      scales[r] = w[f];", "      scales[r] = 1.0f;",
           DECODE_T, why="the routing weight is not applied to the routed experts' outputs"),
    Mutant("cpu-decode-shared-weight", "csrc/cpu/moe_decode.cpp",
           "scales[routed_rows + t] = 1.0f;", "scales[routed_rows + t] = 0.5f;",
           DECODE_T, why="the shared experts' output is scaled instead of added as it is"),
    Mutant("cpu-decode-last-work-unit", "csrc/cpu/moe_decode.cpp",
           "for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) body(u);",
           "for (int64_t u = next.fetch_add(1); u < n - 1; u = next.fetch_add(1)) body(u);",
           DECODE_T, why="thread split boundary shifted: the last work unit of each pass is never run"),
    Mutant("cpu-decode-pair-second-block", "csrc/cpu/moe_decode_impl.h",
           "  const W* b1 = block + h * 16;", "  const W* b1 = block + h * 8;",
           DECODE_T, why="one-token experts: the second block of a pair read from the middle of the first"),
    Mutant("cpu-decode-pair-odd-count", "csrc/cpu/moe_decode.cpp",
           "(paired(slots[s]) ? ceil_div(slots[s].nb, 2) : slots[s].nb)",
           "(paired(slots[s]) ? slots[s].nb / 2 : slots[s].nb)",
           DECODE_T, why="one-token experts with an odd number of gate|up blocks never compute the last"),
    Mutant("cpu-decode-down-pair-output", "csrc/cpu/moe_decode.cpp",
           "                         o + kDownPair * rows_total * 8);",
           "                         o + rows_total * 8);",
           DECODE_T, why="one-token experts: the second block of a down pair written to the next block's row"),
    Mutant("cpu-decode-down-pair-skip", "csrc/cpu/moe_decode.cpp",
           "if ((b - b_begin) % (2 * kDownPair) >= kDownPair) continue;",
           "if ((b - b_begin) % (2 * kDownPair) >= kDownPair - 1) continue;",
           DECODE_T, why="one-token experts: the last first-of-a-pair block of each half-group is never computed"),
    Mutant("cpu-decode-down-group-end", "csrc/cpu/moe_decode.cpp",
           "const int64_t b_end = std::min(nbh, (u % groups + 1) * kDownGroup);",
           "const int64_t b_end = std::min(nbh, (u % groups + 1) * kDownGroup - 1);",
           DECODE_T, why="off by one: each unit of pass 2 stops one output block short of its group's end"),
    Mutant("cpu-decode-last-row-not-added", "csrc/cpu/moe_decode.cpp",
           "kern.add_rows(partial.data() + b * rows_total * 8, rows_total, tokens,",
           "kern.add_rows(partial.data() + b * rows_total * 8, rows_total - 1, tokens,",
           DECODE_T, why="off by one: the step's last (token, expert) row is never added to the output"),
    Mutant("cpu-decode-down-tile-offset", "csrc/cpu/moe_decode_impl.h",
           "    float* o = out + t0 * 8;", "    float* o = out + t0;",
           DECODE_T, why="an expert's tokens past the first tile of 8 write their rows at the wrong offset"),
    # ---- CUDA kernels under the SIMT emulator ----
    Mutant("simt-gate-tie-rule", "csrc/cuda/gate.cu",
           "return (tag_a & ((1 << kStatus) - 1)) < (tag_b & ((1 << kStatus) - 1));",
           "return (tag_a & ((1 << kStatus) - 1)) > (tag_b & ((1 << kStatus) - 1));",
           SIMT_GATE_T, target="simt", why="CUDA top-k: ties to the higher expert id"),
    Mutant("simt-gate-no-renormalise", "csrc/cuda/gate.cu",
           "if (normalize && active) {", "if (false && active) {",
           SIMT_GATE_T, target="simt", why="CUDA gate: renormalisation dropped"),
    Mutant("simt-gate-backward-renorm-term", "csrc/cuda/gate.cu",
           "if (v * G + lane == id) dp[v] += g / D - gdot / (D * D);", "if (v * G + lane == id) dp[v] += g / D;",
           SIMT_GATE_T, target="simt", why="CUDA gate backward misses the renormalisation term"),
    Mutant("simt-gate-sum-first-warp", "csrc/cuda/gate.cu",
           "if (e < E) s_sums[e] = (w == 0 ? acc_t(0) : s_sums[e]) + sums[v];",
           "if (e < E) s_sums[e] = sums[v];",
           SIMT_GATE_T, target="simt", why="CUDA gate: score sums keep only the last warp's partial"),
    Mutant("simt-permute-scan-offsets", "csrc/cuda/permute.cu",
           "for (int e = threadIdx.x; e <= E; e += blockDim.x) offsets[e] = data[static_cast<int64_t>(e) * tiles];",
           "for (int e = threadIdx.x; e < E; e += blockDim.x) offsets[e] = data[static_cast<int64_t>(e) * tiles];",
           SIMT_PERMUTE_T, target="simt", why="CUDA permute (multi-tile): expert_offsets[E] never written"),
    Mutant("simt-permute-no-zero-fill", "csrc/cuda/permute.cu",
           "= rows[j] < kept ? v : zero;", "= v;",
           SIMT_PERMUTE_T, target="simt", why="CUDA permute: dropped rows get the token's data, not zeros"),
    Mutant("simt-permute-rank-order", "csrc/cuda/permute.cu",
           "if (b >= 0) row_map[f] = my[b] + __popc(peers & lanemask_lt());",
           "if (b >= 0) row_map[f] = my[b] + __popc(peers) - 1 - __popc(peers & lanemask_lt());",
           SIMT_PERMUTE_T, target="simt", why="CUDA permute: rows within a warp in reverse order (not stable)"),
    Mutant("simt-unpermute-weights-ignored", "csrc/cuda/permute.cu",
           "const acc_t w = kWeighted ? weights[t * k + j] : acc_t(1);", "const acc_t w = acc_t(1);",
           SIMT_PERMUTE_T, target="simt", why="CUDA unpermute ignores the weights"),
    Mutant("simt-unpermute-backward-dot", "csrc/cuda/permute.cu",
           "dots[jj] += gq * static_cast<acc_t>(y.v[q]);", "dots[jj] += gq;",
           SIMT_PERMUTE_T, target="simt", why="CUDA unpermute backward: weight gradient wrong"),
    Mutant("simt-swiglu-backward", "csrc/cuda/swiglu.cu",
           "    dg.v[q] = static_cast<scalar_t>(dgq);", "    dg.v[q] = static_cast<scalar_t>(duq);",
           SIMT_SWIGLU_T, target="simt", why="CUDA swiglu backward writes du into dg"),
    Mutant("simt-swiglu-up-half", "csrc/cuda/swiglu.cu",
           "  const auto u = load_vec<VEC>(row + I + c);\n  Vec<scalar_t, VEC> o;",
           "  const auto u = load_vec<VEC>(row + c);\n  Vec<scalar_t, VEC> o;",
           SIMT_SWIGLU_T, target="simt", why="CUDA swiglu forward reads the gate half as up"),
    Mutant("simt-gemm-k-tail", "csrc/cuda/grouped_gemm.cu",
           "As[kk][r] = (row < end && k < K) ? acc_t(a[row * K + k]) : acc_t(0);",
           "As[kk][r] = (row < end && k + 1 < K) ? acc_t(a[row * K + k]) : acc_t(0);",
           SIMT_GEMM_T, target="simt", why="CUDA-core grouped GEMM drops the last K element"),
    Mutant("simt-gemm-mma-accumulate", "csrc/cuda/grouped_gemm.cu",
           "for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];", "for (int j = 0; j < 4; ++j) acc[i][j] = av[i] * bv[j];",
           SIMT_GEMM_T, target="simt", why="CUDA-core GEMM overwrites instead of accumulating"),
    Mutant("simt-wgrad-group-end", "csrc/cuda/grouped_gemm.cu",
           "Xs[kk][i] = (r < end && m0 + i < M) ? acc_t(x[r * M + m0 + i]) : acc_t(0);",
           "Xs[kk][i] = (r + 1 < end && m0 + i < M) ? acc_t(x[r * M + m0 + i]) : acc_t(0);",
           SIMT_GEMM_T, target="simt", why="CUDA-core weight gradient drops each group's last row"),
    Mutant("simt-gate-stats-last-tile", "csrc/cuda/gate.cu",
           "for (int tile = threadIdx.y; tile < tiles; tile += 32) {",
           "for (int tile = threadIdx.y; tile < tiles - 1; tile += 32) {",
           SIMT_GATE_T, target="simt", why="CUDA gate: per-sequence statistics skip each sequence's last tile"),
    Mutant("simt-gate-backward-seq-row", "csrc/cuda/gate.cu",
           "const acc_t* gs = grad_sums + (active ? t / L : 0) * E;",
           "const acc_t* gs = grad_sums + (active ? 0 : 0) * E;",
           SIMT_GATE_T, target="simt", why="CUDA gate backward reads the first sequence's score-sum gradient for every token"),
    Mutant("simt-permute-kept-off-by-one", "csrc/cuda/permute.cu",
           "= rows[j] < kept ? v : zero;", "= rows[j] <= kept ? v : zero;",
           SIMT_PERMUTE_T, target="simt", why="CUDA permute: off by one, the first dropped row gets the token's data"),
    Mutant("simt-unpermute-backward-last-chunk", "csrc/cuda/permute.cu",
           "for (int j0 = 0; j0 < k; j0 += kSlotChunk) {", "for (int j0 = 0; j0 + kSlotChunk <= k; j0 += kSlotChunk) {",
           SIMT_PERMUTE_T, target="simt", why="CUDA unpermute backward skips a token's last partial chunk of slots (k % 8)"),
    Mutant("simt-tile-starts-carry", "csrc/cuda/grouped_gemm.cu",
           "    carry += chunk_total;", "    carry = chunk_total;",
           SIMT_GEMM_T, target="simt", why="CUDA-core GEMM tile scan: the running total lost between chunks of 1024 groups"),
    Mutant("simt-ungrouped-last-row", "csrc/cuda/grouped_gemm.cu",
           "const int64_t before = first * N, after = (rows - last) * N;",
           "const int64_t before = first * N, after = (rows - last - 1) * N;",
           SIMT_GEMM_T, target="simt", why="CUDA-core GEMM: off by one, the last row after every group never zeroed"),
    Mutant("simt-group-rows-clamp", "csrc/index_math.h",
           "e = e < b ? b : (e > rows ? rows : e);", "e = e < b ? b : e;",
           SIMT_GEMM_T + ["tests/test_mutation_kills.py"], target="simt",
           why="group rows not clamped to the tensor: malformed offsets address past the end"),
]


def check_anchors(mutants: list[Mutant]) -> None:
    bad = []
    for m in mutants:
        text = (ROOT / m.path).read_text()
        n = text.count(m.old)
        if n != 1:
            bad.append(f"{m.name}: anchor occurs {n} times in {m.path} (expected exactly once):\n    {m.old!r}")
    if bad:
        sys.exit("mutate_kernels: the sources changed; update these mutants:\n" + "\n".join(bad))


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(extra or {}))
    env.setdefault("MAX_JOBS", "2")
    return env


# What makes the AVX512 GEMM kernels run where the CPU has AVX512-BF16 but "auto" prefers oneDNN
# (AMX CPUs): the settings that force them, for the mutants that live in them.
FORCE_AVX512 = {"DSMOE_CPU_BF16_GEMM": "avx512", "DSMOE_CPU_FP32_GEMM": "avx512"}


def build(target: str, log: Path) -> bool:
    if target == "cpu":
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    else:
        cmd = [sys.executable, "tools/simt_build.py"]
    with log.open("w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    return r.returncode == 0


def run_tests(args: list[str], log: Path, timeout: int, extra_env: dict | None = None) -> str:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    with log.open("w") as f:
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=_env(extra_env), stdout=f, stderr=subprocess.STDOUT,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)"
    if r.returncode == 0:
        return "SURVIVED"
    if r.returncode == 5:
        return "no tests collected"
    return "killed"


def runnable_here() -> dict:
    out = subprocess.run([sys.executable, "-c", "import json, dsmoe; print(json.dumps(dsmoe.cpu_kernels()))"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check that every anchor matches")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--target", choices=["cpu", "simt", "all"], default="all")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    ap.add_argument("--no-final-rebuild", action="store_true", help="skip the clean rebuild at the end")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running each test selection on the unmutated build first")
    args = ap.parse_args()

    mutants = MUTANTS
    if args.target != "all":
        mutants = [m for m in mutants if m.target == args.target]
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTANTS}
        if unknown:
            sys.exit(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in names]
    # grouped by file (stable): ninja then recompiles the restored file together with the next
    # mutant of the same file, one compile per mutant
    # headers included by several translation units (several recompiles per mutant) last
    order = {p: i for i, p in enumerate(dict.fromkeys(m.path for m in mutants))}
    mutants = sorted(mutants, key=lambda m: (m.target != "cpu", m.path.endswith(".h"), order[m.path]))
    if args.list:
        for m in mutants:
            print(f"{m.name:40s} {m.target:4s} {m.path}: {m.why}" + (f" [needs {m.needs}]" if m.needs else ""))
        return 0
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names)), "duplicate mutant names"
    check_anchors(mutants)
    if args.check:
        print(f"all {len(mutants)} anchors match")
        return 0

    logdir = ROOT / "build" / "mutation" / "kernels"
    logdir.mkdir(parents=True, exist_ok=True)
    kernels = runnable_here()
    print(f"dsmoe.cpu_kernels(): {kernels}", flush=True)
    avx512 = kernels.get("bf16_gemm") == "avx512" or kernels.get("fp32_gemm") == "avx512"
    forced = {}
    if not avx512 and kernels.get("cpu_avx512_bf16"):  # AMX CPUs: the kernels run when chosen
        avx512, forced = True, FORCE_AVX512
    mutant_env = {m.name: forced if m.needs == "avx512" else {} for m in mutants}
    runnable = [m for m in mutants if not (m.needs == "avx512" and not avx512)]
    if not args.no_baseline:
        # A kill means something only if the tests pass without the mutant: run each selection
        # (with its settings) once on the unmutated build first.
        selections = {(tuple(m.tests), tuple(sorted(mutant_env[m.name].items()))) for m in runnable}
        for target in sorted({m.target for m in runnable}):
            if not build(target, logdir / f"baseline-{target}.build.log"):
                sys.exit(f"mutate_kernels: the unmutated {target} build fails; see {logdir}")
        for i, (tests, env_items) in enumerate(sorted(selections)):
            log = logdir / f"baseline-{i}.test.log"
            status = run_tests(list(tests), log, args.timeout, dict(env_items))
            if status != "SURVIVED":
                sys.exit(f"mutate_kernels: without any mutant, the tests {' '.join(tests)}"
                         f"{' with ' + str(dict(env_items)) if env_items else ''} are {status}: "
                         f"a kill would mean nothing; see {log}")
        print(f"baseline: the {len(selections)} test selections pass on the unmutated build", flush=True)
    results = []
    touched_targets = set()
    try:
        for m in mutants:
            start = time.time()
            if m.needs == "avx512" and not avx512:
                status = "not runnable here (needs AVX512 GEMM kernels)"
            else:
                src = ROOT / m.path
                original = src.read_bytes()
                touched_targets.add(m.target)
                try:
                    text = original.decode()
                    src.write_text(text.replace(m.old, m.new, 1))
                    if not build(m.target, logdir / f"{m.name}.build.log"):
                        status = "build failed"
                    else:
                        status = run_tests(m.tests, logdir / f"{m.name}.test.log", args.timeout,
                                           mutant_env[m.name])
                finally:
                    src.write_bytes(original)
            results.append({"name": m.name, "file": m.path, "target": m.target, "status": status, "why": m.why,
                            "tests": m.tests, "seconds": round(time.time() - start)})
            print(f"{m.name:40s} {status:18s} {time.time() - start:6.0f}s  {m.why}", flush=True)
            (ROOT / "build" / "mutation" / "kernels.json").write_text(json.dumps(results, indent=1))
    finally:
        if not args.no_final_rebuild:
            for target in sorted(touched_targets):
                print(f"rebuilding the clean {target} build ...", flush=True)
                if not build(target, logdir / f"clean-{target}.build.log"):
                    print(f"WARNING: the clean {target} rebuild failed; see {logdir}", file=sys.stderr)
        (ROOT / "build" / "mutation" / "kernels.json").write_text(json.dumps(results, indent=1))

    counts: dict[str, int] = {}
    for r in results:
        key = r["status"].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    print("totals:", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    survivors = [r["name"] for r in results if r["status"] in ("SURVIVED", "build failed", "no tests collected")]
    if survivors:
        print("NOT KILLED:", ", ".join(survivors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
