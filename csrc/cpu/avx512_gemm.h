// dsmoe's own GEMM for the grouped GEMM's forward, input- and weight-gradient products, bf16
// (AVX512-BF16 vdpbf16ps) and fp32 (AVX512 FMA), used on CPUs with AVX512-BF16 and no AMX (AMD
// Zen 4/5, Intel Cooper Lake), where it was measured against oneDNN/MKL (docs/cpu_performance.md).
//
// Why not the BLAS: per expert, a BLAS call packs the weight and sets up a kernel for a few
// hundred rows, and the weight is read from memory before any arithmetic starts. bf16 at::mm on
// one expert's ~500 rows ran at 150-165 GFLOP/s per core here against ~190-200 for one large GEMM
// with the same weight. This kernel packs one 64-column panel of the weight at a time into the
// layout its micro-kernel reads (for bf16 the VNNI pairs vdpbf16ps multiplies) and prefetches the
// next panel's weight while the current one computes, so the weight streams under the arithmetic.
// The micro-kernel keeps a 6 x 64 tile of fp32 accumulators in registers. On CPUs with AMX
// oneDNN stays (its AMX kernels are several times faster than any AVX512 code).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace dsmoe::cpu {

// Columns per packed panel: four 16-lane fp32 accumulators per row.
inline constexpr int64_t kPanelCols = 64;

// Elements of T packed per 32-bit word: bf16 pairs (along the reduction), fp32 singles.
template <typename T>
inline constexpr int64_t kElemsPerWord = sizeof(T) == 2 ? 2 : 1;

// uint32 words of one packed panel: [ceil(K / elems per word)][kPanelCols].
template <typename T>
inline int64_t panel_words(int64_t K) {
  return kPanelCols * ((K + kElemsPerWord<T> - 1) / kElemsPerWord<T>);
}

// uint32 words of a whole packed B of N columns: its panels one after another, zero padded.
template <typename T>
inline int64_t packed_words(int64_t N, int64_t K) {
  return (N + kPanelCols - 1) / kPanelCols * panel_words<T>(K);
}

template <typename T>
struct Avx512Gemm {
  // Packs B (K x N) for gemm. b_nk: b is [N, K] with row stride ldb (an nn.Linear weight, B is its
  // transpose); otherwise b is [K, N] with row stride ldb.
  void (*pack)(const T* b, int64_t ldb, bool b_nk, int64_t N, int64_t K, uint32_t* packed);
  // c[M, N] (row stride ldc) = a[M, K] (row stride lda) @ B, B packed by pack; fp32 accumulation,
  // rounded to T once at the end.
  void (*gemm)(const T* a, int64_t lda, const uint32_t* packed, int64_t N, int64_t K, T* c,
               int64_t ldc, int64_t M);
  // The same product with b unpacked: one panel at a time is packed into `panel`
  // (panel_words<T>(K) words) while the next one's weight is prefetched, so reading the weight
  // overlaps the arithmetic. a is re-read per panel, so this is for a of a few hundred KB at most;
  // larger a: pack + gemm.
  void (*gemm_streamed)(const T* a, int64_t lda, const T* b, int64_t ldb, bool b_nk, int64_t N,
                        int64_t K, T* c, int64_t ldc, int64_t M, uint32_t* panel);
  // vec_kernels.h's small_gemm_nt contract (c[r * ldc + n] = a[r, :] . b[n, :], a [rows, K] and
  // b [N, K] contiguous), for rows of a few tokens: b read once from memory, four of its rows per
  // pass, the next four prefetched; bf16 pairs multiplied as stored (no conversion).
  void (*small_gemm_nt)(const T* a, const T* b, T* c, int64_t ldc, int64_t rows, int64_t N,
                        int64_t K);
  // out [C, R] (row stride ldo) = x^T for x [R, C] (row stride ldx): the weight gradient's first
  // operand, its reduction (the rows of x) made contiguous as gemm's a needs.
  void (*transpose)(const T* x, int64_t ldx, int64_t R, int64_t C, T* out, int64_t ldo);
};

// Rows of a per small_gemm_nt pass over b.
inline constexpr int64_t kSmallGemmMaxRows = 4;

// The kernels, or nullptr where the BLAS is chosen: no AVX512-BF16, AMX present, ATen's CPU
// capability below AVX512 (ATEN_CPU_CAPABILITY), or the environment says so:
// DSMOE_CPU_BF16_GEMM=auto|onednn|avx512|fp32 and DSMOE_CPU_FP32_GEMM=auto|onednn|mkl|avx512 (avx512
// asks for the kernel on an AMX CPU too, and is an error without AVX512-BF16).
const Avx512Gemm<c10::BFloat16>* bf16_gemm_kernel();
const Avx512Gemm<float>* fp32_gemm_kernel();

// The fp32 BLAS that runs where fp32_gemm_kernel() is nullptr: "onednn" (default) or "mkl".
const char* fp32_blas_choice();

// Whether bf16 GEMMs of more than a few rows compute in fp32 (converted operands, fp32 BLAS):
// DSMOE_CPU_BF16_GEMM=fp32, or auto on a CPU without bf16 arithmetic (no AVX512-BF16, no AMX),
// where oneDNN emulates it.
bool bf16_gemm_in_fp32();

// Whether the CPU has AVX512-BF16 (cpuid), whatever is chosen.
bool cpu_has_avx512_bf16();

// Filled by the AVX512 translation unit; false when the compiler could not build it.
bool fill_avx512_gemm(Avx512Gemm<c10::BFloat16>& bf16, Avx512Gemm<float>& fp32);

}  // namespace dsmoe::cpu
