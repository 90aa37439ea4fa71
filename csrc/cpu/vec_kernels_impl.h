// The bodies of the kernels declared in vec_kernels.h, written with at::vec. Included once by
// each ISA's translation unit after it has set CPU_CAPABILITY (and the target ISA); everything
// here has internal linkage, so the builds for different ISAs never mix.
#pragma once

#include "vec_kernels.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dsmoe::cpu {
namespace {

using Vf = at::vec::Vectorized<float>;

// Loads/stores one chunk of a row as fp32 vectors: one vector for float, two for bf16/fp16
// (whose vector holds twice as many elements). n < N loads zeros past the end and stores n.
template <typename T>
struct Lanes {
  using VT = at::vec::Vectorized<T>;
  static constexpr int64_t N = VT::size();
  static constexpr int P = 2;
  static inline void load(const T* p, int64_t n, Vf* v) {
    const VT x = n == N ? VT::loadu(p) : VT::loadu(p, n);
    auto [a, b] = at::vec::convert_to_float<T>(x);
    v[0] = a;
    v[1] = b;
  }
  static inline void store(T* p, int64_t n, const Vf* v) {
    const VT x = at::vec::convert_from_float<T>(v[0], v[1]);
    if (n == N) {
      x.store(p);
    } else {
      x.store(p, static_cast<int>(n));
    }
  }
};

template <>
struct Lanes<float> {
  static constexpr int64_t N = Vf::size();
  static constexpr int P = 1;
  static inline void load(const float* p, int64_t n, Vf* v) { v[0] = n == N ? Vf::loadu(p) : Vf::loadu(p, n); }
  static inline void store(float* p, int64_t n, const Vf* v) {
    if (n == N) {
      v[0].store(p);
    } else {
      v[0].store(p, static_cast<int>(n));
    }
  }
};

// Sum of the lanes: ATen's shuffle tree for float on AVX2/AVX512 (the two-argument
// vec_reduce_all; the sized overload loops over the lanes).
inline float lane_sum(const Vf& v) {
  return at::vec::vec_reduce_all<float>([](const Vf& x, const Vf& y) { return x + y; }, v);
}

inline Vf sigmoid(const Vf& g) { return Vf(1.0f) / (Vf(1.0f) + g.neg().exp()); }

template <typename T>
void swiglu_rows(const T* gate_up, T* out, int64_t rows, int64_t I) {
  using L = Lanes<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate_up + r * 2 * I;
    const T* u = g + I;
    T* o = out + r * I;
    for (int64_t c = 0; c < I; c += L::N) {
      const int64_t n = std::min<int64_t>(L::N, I - c);
      Vf gv[L::P], uv[L::P];
      L::load(g + c, n, gv);
      L::load(u + c, n, uv);
      for (int p = 0; p < L::P; ++p) gv[p] = gv[p] * sigmoid(gv[p]) * uv[p];
      L::store(o + c, n, gv);
    }
  }
}

template <typename T>
void swiglu_backward_rows(const T* grad_out, const T* gate_up, T* grad, int64_t rows, int64_t I) {
  using L = Lanes<T>;
  const Vf one(1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate_up + r * 2 * I;
    const T* u = g + I;
    const T* d = grad_out + r * I;
    T* dg = grad + r * 2 * I;
    T* du = dg + I;
    for (int64_t c = 0; c < I; c += L::N) {
      const int64_t n = std::min<int64_t>(L::N, I - c);
      Vf gv[L::P], uv[L::P], dv[L::P], dgv[L::P], duv[L::P];
      L::load(g + c, n, gv);
      L::load(u + c, n, uv);
      L::load(d + c, n, dv);
      for (int p = 0; p < L::P; ++p) {
        const Vf s = sigmoid(gv[p]);
        duv[p] = dv[p] * (gv[p] * s);
        dgv[p] = dv[p] * uv[p] * s * (one + gv[p] * (one - s));
      }
      L::store(dg + c, n, dgv);
      L::store(du + c, n, duv);
    }
  }
}

template <typename T>
void gather_sum_rows(const T* src, const int32_t* row_map, const float* w, int64_t t_begin,
                     int64_t t_end, int64_t k, int64_t h, T* out) {
  using L = Lanes<T>;
  for (int64_t t = t_begin; t < t_end; ++t) {
    T* o = out + t * h;
    for (int64_t c = 0; c < h; c += L::N) {
      const int64_t n = std::min<int64_t>(L::N, h - c);
      Vf acc[L::P], v[L::P];
      for (int p = 0; p < L::P; ++p) acc[p] = Vf(0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t f = t * k + j;
        L::load(src + static_cast<int64_t>(row_map[f]) * h + c, n, v);
        if (w) {
          const Vf wj(w[f]);
          for (int p = 0; p < L::P; ++p) acc[p] = at::vec::fmadd(wj, v[p], acc[p]);
        } else {
          for (int p = 0; p < L::P; ++p) acc[p] = acc[p] + v[p];
        }
      }
      L::store(o + c, n, acc);
    }
  }
}

template <typename T>
void unpermute_backward_rows(const T* grad_y, const T* y_perm, const int32_t* row_map, const float* w,
                             int64_t t_begin, int64_t t_end, int64_t k, int64_t h, T* grad_y_perm,
                             float* grad_w) {
  using L = Lanes<T>;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const T* g = grad_y + t * h;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t f = t * k + j;
      const int64_t r = row_map[f];
      const T* y = y_perm + r * h;
      T* dst = grad_y_perm + r * h;
      const Vf wf(w[f]);
      Vf dot(0.0f);
      for (int64_t c = 0; c < h; c += L::N) {
        const int64_t n = std::min<int64_t>(L::N, h - c);
        Vf gv[L::P], yv[L::P];
        L::load(g + c, n, gv);
        L::load(y + c, n, yv);
        for (int p = 0; p < L::P; ++p) {
          dot = at::vec::fmadd(gv[p], yv[p], dot);
          gv[p] = gv[p] * wf;
        }
        L::store(dst + c, n, gv);
      }
      grad_w[f] = lane_sum(dot);
    }
  }
}

// acc[i] += chunk k of R rows of a (fp32, ld apart) x chunk k of one row of b, i = row * P + part.
// Fixed-size loops over a small array, so that GCC keeps acc in registers (with a loop of unknown
// trip count it kept them on the stack: 5x slower from 3 rows on). One row of b at a time: two
// rows per pass (sharing the loads of a) measured 1.5-2x slower at 1-2 rows.
template <typename T, int R>
inline void small_gemm_nt_step(const float* a, int64_t ld, const T* b, int64_t k, int64_t cnt,
                               Vf (&acc)[R * Lanes<T>::P]) {
  using L = Lanes<T>;
  Vf bv[L::P];
  L::load(b + k, cnt, bv);
#pragma GCC unroll 16
  for (int i = 0; i < R * L::P; ++i) {
    const Vf av = Vf::loadu(a + (i / L::P) * ld + k + (i % L::P) * Vf::size());
    acc[i] = at::vec::fmadd(av, bv[i % L::P], acc[i]);
  }
}

// c[r, n] for R rows of a (fp32, rows padded to ld = K + L::N with zeros) and every row n of b:
// one pass over b.
template <typename T, int R>
void small_gemm_nt_block(const float* a, int64_t ld, const T* b, T* c, int64_t ldc, int64_t N,
                         int64_t K) {
  using L = Lanes<T>;
  const int64_t k_full = K - K % L::N;
  for (int64_t n = 0; n < N; ++n) {
    const T* bn = b + n * K;
    Vf acc[R * L::P];
#pragma GCC unroll 16
    for (int i = 0; i < R * L::P; ++i) acc[i] = Vf(0.0f);
    for (int64_t k = 0; k < k_full; k += L::N) small_gemm_nt_step<T, R>(a, ld, bn, k, L::N, acc);
    if (k_full < K) small_gemm_nt_step<T, R>(a, ld, bn, k_full, K - k_full, acc);
    for (int r = 0; r < R; ++r) {
      Vf sum = acc[r * L::P];
      for (int p = 1; p < L::P; ++p) sum = sum + acc[r * L::P + p];
      c[r * ldc + n] = static_cast<T>(lane_sum(sum));
    }
  }
}

template <typename T>
void small_gemm_nt(const T* a, const T* b, T* c, int64_t ldc, int64_t rows, int64_t N, int64_t K) {
  using L = Lanes<T>;
  // a as fp32 rows padded with zeros to a multiple of L::N (+ one chunk, so that the loads of the
  // last chunk stay inside the buffer): converted once instead of once per row of b.
  const int64_t ld = K + L::N;
  std::vector<float> af(static_cast<size_t>(rows * ld), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < K; ++k) af[r * ld + k] = static_cast<float>(a[r * K + k]);
  }
  // Up to kSmallGemmBlock rows share one pass over b (R x L::P accumulators in registers).
  for (int64_t r0 = 0; r0 < rows; r0 += kSmallGemmBlock) {
    const float* ar = af.data() + r0 * ld;
    T* cr = c + r0 * ldc;
    static_assert(kSmallGemmBlock == 4, "one case per block size");
    switch (std::min(kSmallGemmBlock, rows - r0)) {
      case 1: small_gemm_nt_block<T, 1>(ar, ld, b, cr, ldc, N, K); break;
      case 2: small_gemm_nt_block<T, 2>(ar, ld, b, cr, ldc, N, K); break;
      case 3: small_gemm_nt_block<T, 3>(ar, ld, b, cr, ldc, N, K); break;
      default: small_gemm_nt_block<T, 4>(ar, ld, b, cr, ldc, N, K); break;
    }
  }
}

template <typename T>
void softmax_rows(const T* logits, float* probs, int64_t rows, int64_t E) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = logits + r * E;
    float* p = probs + r * E;
    for (int64_t e = 0; e < E; ++e) p[e] = static_cast<float>(row[e]);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, p[e]);
    const Vf vmx(mx);
    Vf vsum(0.0f);
    int64_t e = 0;
    for (; e + Vf::size() <= E; e += Vf::size()) {
      const Vf x = (Vf::loadu(p + e) - vmx).exp();
      x.store(p + e);
      vsum = vsum + x;
    }
    float sum = lane_sum(vsum);
    if (e < E) {  // the tail through the same exp, so that equal logits get equal probs
      const int n = static_cast<int>(E - e);
      (Vf::loadu(p + e, n) - vmx).exp().store(p + e, n);
      for (int64_t i = e; i < E; ++i) sum += p[i];
    }
    const float inv = 1.0f / sum;
    for (e = 0; e < E; ++e) p[e] *= inv;
  }
}

template <typename T>
VecKernels<T> make_table() {
  return VecKernels<T>{&swiglu_rows<T>, &swiglu_backward_rows<T>, &gather_sum_rows<T>,
                       &unpermute_backward_rows<T>, &small_gemm_nt<T>, &softmax_rows<T>};
}

inline void fill_all(AllVecKernels& out) {
  out.f32 = make_table<float>();
  out.bf16 = make_table<c10::BFloat16>();
  out.f16 = make_table<c10::Half>();
}

}  // namespace
}  // namespace dsmoe::cpu
