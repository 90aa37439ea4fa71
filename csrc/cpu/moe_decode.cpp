// CPU decode path of the MoE layer: the routed experts (and the shared experts) of a few tokens
// on weights packed once, at the speed of reading each selected expert's weights once.
//
// Decode (T = 1..64 tokens) is bound by reading the weights: at T=1 with k=7 of 63 experts a
// layer reads 8 experts (7 + shared) and does 2 FLOPs per weight element. So:
// * pack_decode_weights stores each expert's gate|up as [ceil(I/8)][h][16] (8 gate rows and the
//   same 8 up rows interleaved per input column) and down as [ceil(h/8)][Ip][8]; rows past I and
//   h are zeros (no alignment rule on h or I). Each block is one contiguous stream that the inner
//   loop reads in address order: broadcast one x value, FMA with a vector of 8 weights, no
//   horizontal sums (moe_decode_impl.h).
// * moe_decode runs all selected experts of the step in two parallel passes:
//   1. work units (expert, block of 8 intermediate columns; two blocks for an expert with one
//      token): gate|up GEMV/GEMM of the expert's tokens, SwiGLU in registers, the fp32
//      intermediate (tokens x Ip per expert, a few hundred KB at most) written to a buffer that
//      stays in cache;
//   2. work units (expert, 16 blocks of 8 output columns): down product of the expert's tokens,
//      one contiguous stream of its packed down weights (two, 8 blocks apart, for one token), to
//      an fp32 row per (token, expert);
//   3. per block of 8 output columns: those rows scaled by the routing weights and summed per
//      token, the selected experts in ascending id order (the shared experts last, weight 1).
//   Units are handed out dynamically (an atomic counter), so 2 threads stay balanced even at
//   T=1, k=7. Each output element is summed by one thread in a fixed order (experts ascending,
//   then a token's slots in order): results do not depend on the thread count; no atomics on
//   data.
// * Weights are read in their dtype (fp32, bf16, fp16), converted to fp32 in registers; all
//   accumulation is fp32, and the intermediate stays fp32 (the plain path rounds it to the
//   dtype, so bf16 results differ from it by bf16 rounding).
// * ISA: AVX2+FMA+F16C (__m256) where ATen's CPU capability is AVX2 or AVX512 (by the rule of
//   vec_kernels.h, so ATEN_CPU_CAPABILITY=default switches it too), else the same loops on 8
//   floats in a struct for the baseline ISA. No AVX-512 build: the loop is bound by memory, not
//   by the vector width.
// Limits: inference only (no autograd formula; dsmoe/ops.py raises on backward); ids >=
// num_experts (expert-parallel sentinels) contribute zero, negative ids are an error.
#include "moe_decode.h"

#include "../check.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DSMOE_DECODE_AVX2 1
#endif

namespace dsmoe::cpu {

// The loops of one ISA for weights of type W.
template <typename W>
struct DecodeKernels {
  // hidden[t * ldh + 0..8) = silu(gate) * up of one gate|up block [h][16], for n token rows.
  void (*gate_up)(const W* block, int64_t h, const float* const* rows, int64_t n, float* hidden,
                  int64_t ldh);
  // out[t][0..8) = down block [Ip][8] x hidden row t, for n rows.
  void (*down)(const W* block, int64_t Ip, const float* hidden, int64_t n, float* out);
  // acc[tokens[r]][0..8) += scales[r] * partial[r][0..8), for r = 0..rows in order.
  void (*add_rows)(const float* partial, int64_t rows, const int32_t* tokens, const float* scales,
                   float* acc);
  // hidden[0..16) = silu(gate) * up of two consecutive gate|up blocks, for one token row.
  void (*gate_up_pair)(const W* block, int64_t h, const float* row, float* hidden);
  void (*down_pair)(const W* block, const W* second, int64_t Ip, const float* hidden, float* out0,
                    float* out1);
};

struct AllDecodeKernels {
  DecodeKernels<float> f32;
  DecodeKernels<c10::BFloat16> bf16;
  DecodeKernels<c10::Half> f16;
};

// ---------------------------------------------------------------- baseline ISA
namespace decode_default {

struct V {
  float v[8];
};
inline V v_set1(float a) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = a;
  return r;
}
inline V v_zero() { return v_set1(0.0f); }
inline V v_bcast(const float* p) { return v_set1(*p); }
inline V v_load(const float* p) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = p[i];
  return r;
}
inline void v_store(float* p, const V& a) {
  for (int i = 0; i < 8; ++i) p[i] = a.v[i];
}
inline V v_add(const V& a, const V& b) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}
inline V v_fma(const V& a, const V& b, const V& c) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
  return r;
}
template <typename W>
inline V v_load_w(const W* p) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
inline void v_prefetch(const void*) {}
inline V v_silu_mul(const V& g, const V& u) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = g.v[i] / (1.0f + std::exp(-g.v[i])) * u.v[i];
  return r;
}

#include "moe_decode_impl.h"

}  // namespace decode_default

// ---------------------------------------------------------------- AVX2 + FMA + F16C
#ifdef DSMOE_DECODE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace decode_avx2 {

using V = __m256;
inline V v_set1(float a) { return _mm256_set1_ps(a); }
inline V v_zero() { return _mm256_setzero_ps(); }
inline V v_bcast(const float* p) { return _mm256_broadcast_ss(p); }
inline V v_load(const float* p) { return _mm256_loadu_ps(p); }
inline void v_store(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V v_add(V a, V b) { return _mm256_add_ps(a, b); }
inline V v_fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
template <typename W>
inline V v_load_w(const W* p);
template <>
inline V v_load_w<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
inline V v_load_w<c10::BFloat16>(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widen to 32 bits and shift
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}
template <>
inline V v_load_w<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// exp(x) for x clamped to [-88.38, 88.38]: Cephes' expf (range reduction by ln 2, degree-5
// polynomial), relative error ~1e-7.
inline V v_exp(V x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  const V fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  V y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
inline void v_prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
inline V v_silu_mul(V g, V u) {
  const V e = v_exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

#include "moe_decode_impl.h"

}  // namespace decode_avx2
#pragma GCC pop_options
#endif

namespace {

struct ChosenDecode {
  AllDecodeKernels k;
};

const ChosenDecode& chosen_decode() {
  static const ChosenDecode c = [] {
    ChosenDecode r;
    decode_default::fill_decode_kernels(r.k);
#ifdef DSMOE_DECODE_AVX2
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX2" || cap == "AVX512") {
      decode_avx2::fill_decode_kernels(r.k);
    }
#endif
    return r;
  }();
  return c;
}

template <typename W>
const DecodeKernels<W>& decode_kernels();
template <>
const DecodeKernels<float>& decode_kernels<float>() {
  return chosen_decode().k.f32;
}
template <>
const DecodeKernels<c10::BFloat16>& decode_kernels<c10::BFloat16>() {
  return chosen_decode().k.bf16;
}
template <>
const DecodeKernels<c10::Half>& decode_kernels<c10::Half>() {
  return chosen_decode().k.f16;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_decode_dtype(const char* op, const char* name, const at::Tensor& t) {
  check_dtype(op, name, t, {at::kFloat, at::kBFloat16, at::kHalf});
}

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "dsmoe.", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
}

// ---------------------------------------------------------------- packing

struct PackShape {
  int64_t E, h, I, nb, Ip, nbh;
};

PackShape check_pack_inputs(const char* op, const at::Tensor& w_gate_up, const at::Tensor& w_down) {
  check_dim(op, "w_gate_up", w_gate_up, 3, "[num_experts, 2 * intermediate, hidden]");
  check_dim(op, "w_down", w_down, 3, "[num_experts, hidden, intermediate]");
  check_decode_dtype(op, "w_gate_up", w_gate_up);
  check_same_dtype(op, "w_down", w_down, "w_gate_up", w_gate_up);
  check_cpu(op, "w_gate_up", w_gate_up);
  check_cpu(op, "w_down", w_down);
  const int64_t E = w_gate_up.size(0), h = w_gate_up.size(2);
  TORCH_CHECK(w_gate_up.size(1) >= 2 && w_gate_up.size(1) % 2 == 0, "dsmoe.", op,
              ": w_gate_up.size(1) must be 2 * intermediate (even, >= 2), got shape ",
              w_gate_up.sizes());
  TORCH_CHECK(h >= 1, "dsmoe.", op, ": hidden must be >= 1, got shape ", w_gate_up.sizes());
  const int64_t I = w_gate_up.size(1) / 2;
  check_size(op, "w_down", w_down, 0, E, "num_experts of w_gate_up");
  check_size(op, "w_down", w_down, 1, h, "hidden = w_gate_up.size(2)");
  check_size(op, "w_down", w_down, 2, I, "intermediate = w_gate_up.size(1) / 2");
  const int64_t nb = ceil_div(I, 8);
  return {E, h, I, nb, nb * 8, ceil_div(h, 8)};
}

// The packing as one parallel pass that reads each weight once and writes each packed element
// once (zeros in the padding), on the raw bits (T: an unsigned type of the element's size).
// Units are blocks of 8 rows (a few KB to tens of KB of output), so a unit's scattered writes
// stay in cache.
template <typename T>
void pack_bits(const T* gate_up, const T* down, T* gu_out, T* down_out, const PackShape& s) {
  const int64_t E = s.E, h = s.h, I = s.I, nb = s.nb, Ip = s.Ip, nbh = s.nbh;
  at::parallel_for(0, E * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t e = unit / nb, b = unit % nb;
      T* dst = gu_out + unit * h * 16;
      for (int64_t r = 0; r < 8; ++r) {
        const int64_t row = b * 8 + r;
        if (row < I) {
          const T* g = gate_up + (e * 2 * I + row) * h;
          const T* u = gate_up + (e * 2 * I + I + row) * h;
          for (int64_t c = 0; c < h; ++c) {
            dst[c * 16 + r] = g[c];
            dst[c * 16 + 8 + r] = u[c];
          }
        } else {
          for (int64_t c = 0; c < h; ++c) dst[c * 16 + r] = dst[c * 16 + 8 + r] = T(0);
        }
      }
    }
  });
  at::parallel_for(0, E * nbh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t e = unit / nbh, b = unit % nbh;
      T* dst = down_out + unit * Ip * 8;
      for (int64_t r = 0; r < 8; ++r) {
        const int64_t row = b * 8 + r;
        if (row < h) {
          const T* src = down + (e * h + row) * I;
          for (int64_t i = 0; i < I; ++i) dst[i * 8 + r] = src[i];
          for (int64_t i = I; i < Ip; ++i) dst[i * 8 + r] = T(0);
        } else {
          for (int64_t i = 0; i < Ip; ++i) dst[i * 8 + r] = T(0);
        }
      }
    }
  });
}

void pack_into(const char* op, const at::Tensor& w_gate_up, const at::Tensor& w_down, at::Tensor& gu,
               at::Tensor& down, const PackShape& s) {
  const at::Tensor src_gu = w_gate_up.contiguous(), src_down = w_down.contiguous();
  if (gu.numel() == 0 && down.numel() == 0) return;  // no experts
  if (w_gate_up.element_size() == 4) {
    pack_bits(static_cast<const uint32_t*>(src_gu.data_ptr()), static_cast<const uint32_t*>(src_down.data_ptr()),
              static_cast<uint32_t*>(gu.data_ptr()), static_cast<uint32_t*>(down.data_ptr()), s);
  } else {
    TORCH_CHECK(w_gate_up.element_size() == 2, "dsmoe.", op, ": unexpected element size");
    pack_bits(static_cast<const uint16_t*>(src_gu.data_ptr()), static_cast<const uint16_t*>(src_down.data_ptr()),
              static_cast<uint16_t*>(gu.data_ptr()), static_cast<uint16_t*>(down.data_ptr()), s);
  }
}

std::tuple<at::Tensor, at::Tensor> pack_decode_weights_cpu(const at::Tensor& w_gate_up,
                                                           const at::Tensor& w_down) {
  const PackShape s = check_pack_inputs("pack_decode_weights", w_gate_up, w_down);
  at::Tensor gu = at::empty({s.E, s.nb, s.h, 16}, w_gate_up.options());
  at::Tensor down = at::empty({s.E, s.nbh, s.Ip, 8}, w_gate_up.options());
  pack_into("pack_decode_weights", w_gate_up, w_down, gu, down, s);
  return {gu, down};
}

}  // namespace

// Declared in moe_decode.h, for dsmoe._C.
void pack_decode_weights_into(const at::Tensor& w_gate_up, const at::Tensor& w_down, at::Tensor gu,
                              at::Tensor down) {
  const char* op = "pack_decode_weights_into";
  const PackShape s = check_pack_inputs(op, w_gate_up, w_down);
  TORCH_CHECK(gu.sizes() == at::IntArrayRef({s.E, s.nb, s.h, 16}) && gu.is_contiguous() &&
                  gu.dtype() == w_gate_up.dtype() && gu.device().is_cpu(),
              "dsmoe.", op, ": gate_up_out must be a contiguous CPU tensor of shape [", s.E, ", ", s.nb,
              ", ", s.h, ", 16] and dtype ", w_gate_up.scalar_type(), ", got ", gu.sizes(), " ",
              gu.scalar_type());
  TORCH_CHECK(down.sizes() == at::IntArrayRef({s.E, s.nbh, s.Ip, 8}) && down.is_contiguous() &&
                  down.dtype() == w_gate_up.dtype() && down.device().is_cpu(),
              "dsmoe.", op, ": down_out must be a contiguous CPU tensor of shape [", s.E, ", ", s.nbh,
              ", ", s.Ip, ", 8] and dtype ", w_gate_up.scalar_type(), ", got ", down.sizes(), " ",
              down.scalar_type());
  pack_into(op, w_gate_up, w_down, gu, down, s);
}

namespace {

// ---------------------------------------------------------------- decode

// One expert of the step: where its packed weights are, and its rows (token, routing weight).
struct Slot {
  const void* gate_up;  // [nb][h][16]
  const void* down;     // [nbh][Ip][8]
  int64_t nb;
  int64_t row_begin;     // first row in tokens/scales/row_ptrs
  int64_t rows;          // tokens routed to it
  int64_t hidden_begin;  // offset of its [rows][Ip] fp32 intermediate
};

void check_packed(const char* op, const char* gu_name, const at::Tensor& gu, const char* down_name,
                  const at::Tensor& down, const at::Tensor& x) {
  const int64_t h = x.size(1);
  check_dim(op, gu_name, gu, 4, "[num_experts, ceil(intermediate / 8), hidden, 16]");
  check_dim(op, down_name, down, 4, "[num_experts, ceil(hidden / 8), 8 * ceil(intermediate / 8), 8]");
  check_same_dtype(op, gu_name, gu, "x", x);
  check_same_dtype(op, down_name, down, "x", x);
  check_cpu(op, gu_name, gu);
  check_cpu(op, down_name, down);
  check_size(op, gu_name, gu, 2, h, "hidden = x.size(1)");
  check_size(op, gu_name, gu, 3, 16, "the packed block width (pack_decode_weights)");
  check_size(op, down_name, down, 0, gu.size(0), "num_experts of the packed gate_up");
  check_size(op, down_name, down, 1, ceil_div(h, 8), "ceil(hidden / 8)");
  check_size(op, down_name, down, 2, gu.size(1) * 8, "8 * packed gate_up.size(1)");
  check_size(op, down_name, down, 3, 8, "the packed block width (pack_decode_weights)");
  TORCH_CHECK(gu.size(1) >= 1, "dsmoe.", op, ": ", gu_name, " must have intermediate >= 1, got shape ",
              gu.sizes());
}

// Output blocks of 8 columns per unit of pass 2: one expert's down weights for 16 blocks are one
// contiguous stream of 16 * Ip * 8 elements (180 KB in fp32 at I = 352). Measured against one
// block of every expert per unit (the earlier pass 2: 8 streams of 11 KB), alternated call by
// call in one process, h1280 I352 E63 k7 + shared, 2 threads: 1-16% faster at T = 1..64
// (BENCHMARKS.md).
constexpr int64_t kDownGroup = 16;
// An expert with one token reads the blocks b and b + 8 of its unit side by side (two streams):
// against one block at a time, alternated call by call in one process, 9-16% faster at T = 1
// (fp32, bf16), 3-4% at T = 4 (BENCHMARKS.md). Its gate|up blocks go two at a time likewise.
constexpr int64_t kDownPair = kDownGroup / 2;

template <typename W>
void run_decode(const at::Tensor& xf, const std::vector<Slot>& slots, const int32_t* tokens,
                const float* scales, const float* const* row_ptrs, int64_t hidden_size,
                at::Tensor& y) {
  const DecodeKernels<W>& kern = decode_kernels<W>();
  const int64_t T = xf.size(0), h = xf.size(1), nbh = ceil_div(h, 8);
  // an expert with one token reads its gate|up blocks two at a time (two streams side by side,
  // as one core keeps more reads in flight that way): 8-19% faster at T = 1-4 than one block
  // per unit, alternated call by call in one process (BENCHMARKS.md)
  auto paired = [](const Slot& sl) { return sl.rows == 1; };
  std::vector<int64_t> unit_begin(slots.size() + 1, 0);
  for (size_t s = 0; s < slots.size(); ++s)
    unit_begin[s + 1] = unit_begin[s] + (paired(slots[s]) ? ceil_div(slots[s].nb, 2) : slots[s].nb);
  const int64_t units = unit_begin.back();
  std::vector<float> hidden(static_cast<size_t>(hidden_size));

  // Runs body(unit) for unit in [0, n), handed out one at a time to the threads.
  auto dynamic_for = [](int64_t n, const auto& body) {
    std::atomic<int64_t> next{0};
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) body(u);
    });
  };

  // 1. gate|up + SwiGLU per (slot, intermediate block)
  dynamic_for(units, [&](int64_t u) {
    const size_t s = std::upper_bound(unit_begin.begin(), unit_begin.end(), u) - unit_begin.begin() - 1;
    const Slot& sl = slots[s];
    if (paired(sl)) {
      const int64_t b = 2 * (u - unit_begin[s]);
      const W* block = static_cast<const W*>(sl.gate_up) + b * h * 16;
      float* out = hidden.data() + sl.hidden_begin + b * 8;
      if (b + 1 < sl.nb) {
        kern.gate_up_pair(block, h, row_ptrs[sl.row_begin], out);
      } else {  // the last block of an odd count
        kern.gate_up(block, h, row_ptrs + sl.row_begin, 1, out, sl.nb * 8);
      }
      return;
    }
    const int64_t b = u - unit_begin[s];
    const W* block = static_cast<const W*>(sl.gate_up) + b * h * 16;
    kern.gate_up(block, h, row_ptrs + sl.row_begin, sl.rows, hidden.data() + sl.hidden_begin + b * 8,
                 sl.nb * 8);
  });

  // 2. down per (slot, group of output blocks): one long contiguous stream of the expert's
  //    packed down weights per unit; each row's unscaled product goes to partial[b][row][8]
  const int64_t rows_total = slots.back().row_begin + slots.back().rows;
  // every element is written once by pass 2 before pass 3 reads it; NaN until then, so that a
  // unit that skipped one shows in the output
  std::vector<float> partial(static_cast<size_t>(nbh * rows_total * 8),
                             std::numeric_limits<float>::quiet_NaN());
  const int64_t groups = ceil_div(nbh, kDownGroup);
  dynamic_for(static_cast<int64_t>(slots.size()) * groups, [&](int64_t u) {
    const Slot& sl = slots[u / groups];
    const int64_t Ip = sl.nb * 8;
    const int64_t b_end = std::min(nbh, (u % groups + 1) * kDownGroup);
    const int64_t b_begin = (u % groups) * kDownGroup;
    if (paired(sl)) {
      // one token: blocks b and b + kDownPair read side by side (two streams)
      for (int64_t b = b_begin; b < b_end; ++b) {
        if ((b - b_begin) % (2 * kDownPair) >= kDownPair) continue;  // done with its partner
        const W* block = static_cast<const W*>(sl.down) + b * Ip * 8;
        float* o = partial.data() + (b * rows_total + sl.row_begin) * 8;
        if (b + kDownPair < b_end) {
          kern.down_pair(block, block + kDownPair * Ip * 8, Ip, hidden.data() + sl.hidden_begin, o,
                         o + kDownPair * rows_total * 8);
        } else {
          kern.down(block, Ip, hidden.data() + sl.hidden_begin, 1, o);
        }
      }
      return;
    }
    for (int64_t b = b_begin; b < b_end; ++b) {
      const W* block = static_cast<const W*>(sl.down) + b * Ip * 8;
      kern.down(block, Ip, hidden.data() + sl.hidden_begin, sl.rows,
                partial.data() + (b * rows_total + sl.row_begin) * 8);
    }
  });

  // 3. per output block: the rows in slot order (experts ascending, shared last), scaled
  W* out = y.data_ptr<W>();
  dynamic_for(nbh, [&](int64_t b) {
    std::vector<float> acc(static_cast<size_t>(T * 8), 0.0f);
    kern.add_rows(partial.data() + b * rows_total * 8, rows_total, tokens, scales, acc.data());
    const int64_t cols = std::min<int64_t>(8, h - b * 8);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t c = 0; c < cols; ++c) out[t * h + b * 8 + c] = static_cast<W>(acc[t * 8 + c]);
    }
  });
}

at::Tensor moe_decode_cpu(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& expert_ids,
                          const at::Tensor& packed_gate_up, const at::Tensor& packed_down,
                          const c10::optional<at::Tensor>& shared_gate_up,
                          const c10::optional<at::Tensor>& shared_down) {
  const char* op = "moe_decode";
  check_dim(op, "x", x, 2, "[num_tokens, hidden]");
  check_decode_dtype(op, "x", x);
  check_cpu(op, "x", x);
  check_dim(op, "weights", weights, 2, "[num_tokens, k]");
  check_dtype(op, "weights", weights, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_dim(op, "expert_ids", expert_ids, 2, "[num_tokens, k]");
  check_dtype(op, "expert_ids", expert_ids, {at::kInt, at::kLong});
  check_size(op, "weights", weights, 0, x.size(0), "num_tokens of x");
  check_size(op, "expert_ids", expert_ids, 0, x.size(0), "num_tokens of x");
  check_size(op, "expert_ids", expert_ids, 1, weights.size(1), "k of weights");
  check_cpu(op, "weights", weights);
  check_cpu(op, "expert_ids", expert_ids);
  TORCH_CHECK(x.size(1) >= 1, "dsmoe.moe_decode: x must have hidden >= 1, got shape ", x.sizes());
  check_packed(op, "packed_gate_up", packed_gate_up, "packed_down", packed_down, x);
  TORCH_CHECK(shared_gate_up.has_value() == shared_down.has_value(),
              "dsmoe.moe_decode: shared_gate_up and shared_down must be given together");
  if (shared_gate_up.has_value()) {
    check_packed(op, "shared_gate_up", *shared_gate_up, "shared_down", *shared_down, x);
    check_size(op, "shared_gate_up", *shared_gate_up, 0, 1, "one shared expert (the shared MLP packed as E=1)");
  }

  const int64_t T = x.size(0), h = x.size(1), k = expert_ids.size(1), E = packed_gate_up.size(0);
  at::Tensor y = at::empty({T, h}, x.options());
  if (T == 0) return y;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor gu = packed_gate_up.contiguous(), dn = packed_down.contiguous();
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const at::Tensor wf = weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* w = wf.data_ptr<float>();

  // rows per expert in token order (a counting sort; T * k is a few hundred)
  std::vector<int64_t> count(static_cast<size_t>(E) + 1, 0);
  for (int64_t f = 0; f < T * k; ++f) {
    TORCH_CHECK(id[f] >= 0, "dsmoe.moe_decode: expert_ids[", f / k, ", ", f % k, "]=", id[f],
                " is negative");
    if (id[f] < E) ++count[id[f] + 1];
  }
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  const int64_t routed_rows = count[E];
  const int64_t total_rows = routed_rows + (shared_gate_up.has_value() ? T : 0);
  std::vector<int32_t> tokens(static_cast<size_t>(total_rows));
  std::vector<float> scales(static_cast<size_t>(total_rows));
  std::vector<const float*> row_ptrs(static_cast<size_t>(total_rows));
  {
    std::vector<int64_t> fill(count.begin(), count.end() - 1);
    for (int64_t f = 0; f < T * k; ++f) {
      if (id[f] >= E) continue;
      const int64_t r = fill[id[f]]++;
      tokens[r] = static_cast<int32_t>(f / k);
      scales[r] = w[f];
    }
    for (int64_t t = 0; t < T && shared_gate_up.has_value(); ++t) {
      tokens[routed_rows + t] = static_cast<int32_t>(t);
      scales[routed_rows + t] = 1.0f;
    }
  }
  const float* xp = xf.data_ptr<float>();
  for (int64_t r = 0; r < total_rows; ++r) row_ptrs[r] = xp + static_cast<int64_t>(tokens[r]) * h;

  const int64_t nb = gu.size(1), nbh = ceil_div(h, 8);
  const int64_t elem = gu.element_size();
  const char* gu_base = static_cast<const char*>(gu.data_ptr());
  const char* dn_base = static_cast<const char*>(dn.data_ptr());
  std::vector<Slot> slots;
  int64_t hidden_size = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = count[e + 1] - count[e];
    if (rows == 0) continue;
    slots.push_back(Slot{gu_base + e * nb * h * 16 * elem, dn_base + e * nbh * nb * 8 * 8 * elem, nb,
                         count[e], rows, hidden_size});
    hidden_size += rows * nb * 8;
  }
  at::Tensor sgu, sdn;
  if (shared_gate_up.has_value()) {
    sgu = shared_gate_up->contiguous();
    sdn = shared_down->contiguous();
    slots.push_back(Slot{sgu.data_ptr(), sdn.data_ptr(), sgu.size(1), routed_rows, T, hidden_size});
    hidden_size += T * sgu.size(1) * 8;
  }
  if (slots.empty()) return y.zero_();

  switch (x.scalar_type()) {
    case at::kFloat:
      run_decode<float>(xf, slots, tokens.data(), scales.data(), row_ptrs.data(), hidden_size, y);
      break;
    case at::kBFloat16:
      run_decode<c10::BFloat16>(xf, slots, tokens.data(), scales.data(), row_ptrs.data(), hidden_size, y);
      break;
    default:
      run_decode<c10::Half>(xf, slots, tokens.data(), scales.data(), row_ptrs.data(), hidden_size, y);
      break;
  }
  return y;
}

}  // namespace
}  // namespace dsmoe::cpu

TORCH_LIBRARY_IMPL(dsmoe, CPU, m) {
  m.impl("pack_decode_weights", &dsmoe::cpu::pack_decode_weights_cpu);
  m.impl("moe_decode", &dsmoe::cpu::moe_decode_cpu);
}
