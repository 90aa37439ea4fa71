// Vectorised row kernels of the memory-bound CPU ops: SwiGLU forward/backward and the weighted
// row gathers of unpermute, permute_backward and unpermute_backward.
//
// They are written once with at::vec (vec_kernels_impl.h) and compiled for AVX512, AVX2 and the
// default ISA (vec_kernels_avx512.cpp, vec_kernels_avx2.cpp, vec_kernels.cpp), because an
// extension is compiled for the baseline x86-64 ISA, where at::vec falls back to scalar code. The
// table for this CPU is picked once, by ATen's own rule (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY). Math is in fp32 for every element type. The kernels are serial over the
// rows they are given; the ops split rows over threads.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace dsmoe::cpu {

// Element types with vectorised kernels (fp64 keeps the scalar loops of the ops).
template <typename T>
inline constexpr bool has_vec_kernels = std::is_same_v<T, float> ||
                                        std::is_same_v<T, c10::BFloat16> ||
                                        std::is_same_v<T, c10::Half>;

template <typename T>
struct VecKernels {
  using acc_t = at::opmath_type<T>;  // float for every type that has kernels
  // out[r, c] = silu(gate_up[r, c]) * gate_up[r, I + c] for r < rows, c < I.
  void (*swiglu)(const T* gate_up, T* out, int64_t rows, int64_t I);
  // grad[r, :] = d gate_up of swiglu given grad_out[r, :]; recomputes silu.
  void (*swiglu_backward)(const T* grad_out, const T* gate_up, T* grad, int64_t rows, int64_t I);
  // out[t] = sum_j (w ? w[t*k+j] : 1) * src[row_map[t*k+j]] for t in [t_begin, t_end), in slot
  // order, accumulated in fp32.
  void (*gather_sum)(const T* src, const int32_t* row_map, const acc_t* w, int64_t t_begin,
                     int64_t t_end, int64_t k, int64_t h, T* out);
  // For t in [t_begin, t_end), j < k, f = t*k+j, r = row_map[f]:
  //   grad_y_perm[r] = w[f] * grad_y[t];  grad_w[f] = dot(grad_y[t], y_perm[r]) (fp32).
  void (*unpermute_backward)(const T* grad_y, const T* y_perm, const int32_t* row_map,
                             const acc_t* w, int64_t t_begin, int64_t t_end, int64_t k, int64_t h,
                             T* grad_y_perm, acc_t* grad_w);
  // c[r * ldc + n] = sum_k a[r, k] * b[n, k] (fp32 accumulation); a [rows, K] and b [N, K] (one
  // nn.Linear weight, or a slice of its rows) contiguous; meant for rows <= kSmallGemmRows. A GEMM
  // of a few rows is bound by reading b; this reads b once, straight from memory, where a BLAS call
  // first packs it (decode, and experts that got a few tokens).
  void (*small_gemm_nt)(const T* a, const T* b, T* c, int64_t ldc, int64_t rows, int64_t N,
                        int64_t K);
  // probs[r, :] = softmax(logits[r, :]) in fp32 for r < rows, rows of E (the gate; its exp
  // dominated the scalar loop).
  void (*softmax_rows)(const T* logits, acc_t* probs, int64_t rows, int64_t E);
};

// Up to this many rows small_gemm_nt beats a BLAS call here. Measured on 2 threads over 63
// experts (704x1280 and 1280x352) with r rows each: bf16 r=1..3 8-10 ms against 10-12 ms with
// oneDNN, r=4 even, r>=6 oneDNN wins at K=1280; fp32 r=2..3 11-14 ms against 20-25 ms with
// MKL, r=4 even, r>=6 MKL wins.
inline constexpr int64_t kSmallGemmRows = 4;
// Rows that small_gemm_nt multiplies in one pass over b.
inline constexpr int64_t kSmallGemmBlock = 4;

template <typename T>
struct VecTables {
  VecKernels<float> f32;
  VecKernels<c10::BFloat16> bf16;
  VecKernels<c10::Half> f16;
};
using AllVecKernels = VecTables<void>;

// The kernels for this CPU, for T in float, c10::BFloat16, c10::Half.
template <typename T>
const VecKernels<T>& vec_kernels();

// The kernels for T, or nullptr for a type without them (fp64), so that callers inside
// AT_DISPATCH (where if constexpr does not discard) compile for every type.
template <typename T>
const VecKernels<T>* vec_kernels_or_null() {
  if constexpr (has_vec_kernels<T>) {
    return &vec_kernels<T>();
  } else {
    return nullptr;
  }
}

// Which build of the kernels runs here: "AVX512", "AVX2" or "DEFAULT".
const char* vec_kernels_isa();

// Filled by each ISA's translation unit; false when that ISA was not compiled in.
bool fill_vec_kernels_avx512(AllVecKernels& out);
bool fill_vec_kernels_avx2(AllVecKernels& out);
void fill_vec_kernels_default(AllVecKernels& out);

}  // namespace dsmoe::cpu
