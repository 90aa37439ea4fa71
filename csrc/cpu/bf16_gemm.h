// A bf16 GEMM for CPUs with AVX512-BF16 but no AMX (AMD Zen 4/5, Intel Cooper Lake), where
// oneDNN's per-call cost shows at expert sizes: at::mm on one expert's ~500 rows ran at 150-165
// GFLOP/s per core here against ~190-200 for one large GEMM with the same weights, because each
// call re-packs its weight and sets up a primitive (docs/cpu_performance.md). This kernel packs a
// group's weight once per call into the VNNI pair layout that vdpbf16ps reads and runs a
// register-blocked micro-kernel over the group's rows. On CPUs with AMX oneDNN stays (its AMX
// kernels are several times faster than any AVX512 code).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace dsmoe::cpu {

// Columns per packed panel: two 16-lane fp32 accumulators per row.
inline constexpr int64_t kBf16PanelCols = 64;

// uint32 words a packed B of N columns and reduction K takes: panels of kBf16PanelCols columns,
// each [ceil(K/2)][kBf16PanelCols] words of (B[2p][n], B[2p+1][n]) bf16 pairs, zero padded.
inline int64_t bf16_packed_words(int64_t N, int64_t K) {
  return (N + kBf16PanelCols - 1) / kBf16PanelCols * kBf16PanelCols * ((K + 1) / 2);
}

// uint32 words of one packed panel.
inline int64_t bf16_panel_words(int64_t K) { return kBf16PanelCols * ((K + 1) / 2); }

struct Bf16Gemm {
  // Packs B (K x N) for gemm. b_nk: b is [N, K] with row stride ldb (an nn.Linear weight, B is its
  // transpose); otherwise b is [K, N] with row stride ldb.
  void (*pack)(const c10::BFloat16* b, int64_t ldb, bool b_nk, int64_t N, int64_t K,
               uint32_t* packed);
  // c[M, N] (row stride ldc) = a[M, K] (row stride lda) @ B, B packed by pack; fp32 accumulation,
  // rounded to bf16 once at the end.
  void (*gemm)(const c10::BFloat16* a, int64_t lda, const uint32_t* packed, int64_t N, int64_t K,
               c10::BFloat16* c, int64_t ldc, int64_t M);
  // The same product with b unpacked: one panel at a time is packed into `panel`
  // (bf16_panel_words(K) words) while the next one's weight is prefetched, so reading the weight
  // from memory overlaps the arithmetic. For a of at most a few hundred KB (it is re-read per
  // panel); larger a: pack + gemm.
  void (*gemm_streamed)(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb,
                        bool b_nk, int64_t N, int64_t K, c10::BFloat16* c, int64_t ldc, int64_t M,
                        uint32_t* panel);
};

// The kernel, or nullptr where oneDNN is the better choice or the only one: no AVX512-BF16, AMX
// present, ATen's CPU capability below AVX512 (ATEN_CPU_CAPABILITY), or DSMOE_CPU_BF16_GEMM=onednn.
// DSMOE_CPU_BF16_GEMM=avx512 asks for the kernel on an AMX CPU too (an error without AVX512-BF16).
const Bf16Gemm* bf16_gemm_kernel();

// Whether the CPU has AVX512-BF16 (cpuid), whatever is chosen.
bool cpu_has_avx512_bf16();

// Filled by the AVX512-BF16 translation unit; false when the compiler could not build it.
bool fill_bf16_gemm_avx512(Bf16Gemm& out);

}  // namespace dsmoe::cpu
