// avx512_gemm.h's kernels, compiled for AVX512 with AVX512-BF16 (the extension's baseline is
// x86-64, so the target is switched here, after every header, and only this file's functions use
// it; they run only where avx512_gemm.cpp has checked the CPU).
#include "avx512_gemm.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
#pragma GCC diagnostic push
// GCC 12's masked-load intrinsics trip it (their pass-through operand is deliberately undefined).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace dsmoe::cpu {
namespace {

constexpr int kPanel = static_cast<int>(kPanelCols);
// Rows per micro-kernel call: 6 rows x 4 vectors = 24 accumulators, plus 4 weight vectors and a
// broadcast, fit the 32 zmm registers (12 x 2 with 32-column panels ran ~2x slower on Zen 4: two
// broadcasts per 4 multiply-adds against one per 4 here).
constexpr int kTileRows = 6;
// Rows of a that share one pass over a packed weight (gemm): such a block of a stays in L2.
constexpr int64_t kABlockBytes = 192 * 1024;

inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}
inline __mmask32 half_mask(int64_t n) {
  return n >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1ull << n) - 1);
}

// What differs between the element types. Words are 32 bits: a bf16 pair (k, k+1) or one fp32.
struct Bf16Ops {
  using Bits = uint16_t;
  static constexpr int64_t kPerWord = 2;
  // The 16 words starting at element p (row-major), elements past `elems` zero.
  static __m512i load16(const Bits* p, int64_t elems) {
    return _mm512_maskz_loadu_epi16(half_mask(std::min<int64_t>(32, elems)), p);
  }
  static __m512i broadcast_word(const Bits* p) {
    uint32_t w;
    std::memcpy(&w, p, sizeof(w));
    return _mm512_set1_epi32(static_cast<int>(w));
  }
  // A word holding only p[0] (an odd K's last element; the other half multiplies zeros).
  static __m512i broadcast_last(const Bits* p) { return _mm512_set1_epi32(p[0]); }
  static __m512 madd(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
  static void store(Bits* c, __mmask16 m, __m512 acc) {
    _mm256_mask_storeu_epi16(c, m, (__m256i)_mm512_cvtneps_pbh(acc));
  }
  static void store1(Bits* c, float v) {
    const c10::BFloat16 x(v);  // round to nearest even, as the tiles' cvtneps
    std::memcpy(c, &x, sizeof(x));
  }
  static void store4(Bits* c, __m128 v) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(c), (__m128i)_mm_cvtneps_pbh(v));
  }
  // Elements per 512-bit vector, and one vector of a row from element k, zero past n elements.
  static constexpr int64_t kVecElems = 32;
  static __m512i load_chunk(const Bits* p, int64_t n) {
    return n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(half_mask(n), p);
  }
  // The 16 words (x[0][j], x[ldx][j]) for j < n (zero past n), from the rows at p and p + ldx;
  // rows counts the rows left from p (the second is zero when only one is).
  static __m512i column_pairs(const Bits* p, int64_t ldx, int64_t rows, int64_t n) {
    if (rows <= 0) return _mm512_setzero_si512();
    const __mmask16 m = lane_mask(n);
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    if (rows == 1) return lo;
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p + ldx));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
  }
  // The first n elements of the 32 in v.
  static void store_elems(Bits* out, __m512i v, int64_t n) { _mm512_mask_storeu_epi16(out, half_mask(n), v); }
  // b [K, N]: words (p, n0..n0+31) = (b[2p][n], b[2p+1][n]): two rows interleaved.
  static void pack_kn_row(const Bits* b, int64_t ldb, int64_t K, int64_t p, int64_t cols, uint32_t* out) {
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    const __mmask32 m = half_mask(cols);
    const __m512i lo_row = _mm512_maskz_loadu_epi16(m, b + 2 * p * ldb);
    const __m512i hi_row = 2 * p + 1 < K ? _mm512_maskz_loadu_epi16(m, b + (2 * p + 1) * ldb)
                                         : _mm512_setzero_si512();
    // unpack*_epi16 interleave within 128-bit lanes; the permutes put the lanes in column order.
    const __m512i lo = _mm512_unpacklo_epi16(lo_row, hi_row);
    const __m512i hi = _mm512_unpackhi_epi16(lo_row, hi_row);
    _mm512_storeu_si512(out, _mm512_permutex2var_epi64(lo, first, hi));
    _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi64(lo, second, hi));
  }
};

struct Fp32Ops {
  using Bits = float;
  static constexpr int64_t kPerWord = 1;
  static __m512i load16(const Bits* p, int64_t elems) {
    return _mm512_castps_si512(_mm512_maskz_loadu_ps(lane_mask(std::min<int64_t>(16, elems)), p));
  }
  static __m512i broadcast_word(const Bits* p) { return _mm512_castps_si512(_mm512_set1_ps(*p)); }
  static __m512i broadcast_last(const Bits* p) { return broadcast_word(p); }
  static __m512 madd(__m512 acc, __m512i a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  }
  static void store(Bits* c, __mmask16 m, __m512 acc) { _mm512_mask_storeu_ps(c, m, acc); }
  static void store1(Bits* c, float v) { *c = v; }
  static void store4(Bits* c, __m128 v) { _mm_storeu_ps(c, v); }
  static constexpr int64_t kVecElems = 16;
  static __m512i load_chunk(const Bits* p, int64_t n) {
    return _mm512_castps_si512(n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lane_mask(n), p));
  }
  static __m512i column_pairs(const Bits* p, int64_t, int64_t rows, int64_t n) {
    if (rows <= 0) return _mm512_setzero_si512();
    return _mm512_castps_si512(_mm512_maskz_loadu_ps(lane_mask(n), p));
  }
  static void store_elems(Bits* out, __m512i v, int64_t n) {
    _mm512_mask_storeu_ps(out, lane_mask(n), _mm512_castsi512_ps(v));
  }
  // b [K, N]: words (p, n0..n0+31) = b[p][n]: a row copied.
  static void pack_kn_row(const Bits* b, int64_t ldb, int64_t, int64_t p, int64_t cols, uint32_t* out) {
    const Bits* row = b + p * ldb;
    _mm512_storeu_ps(out, _mm512_maskz_loadu_ps(lane_mask(std::min<int64_t>(16, cols)), row));
    _mm512_storeu_ps(out + 16, cols > 16 ? _mm512_maskz_loadu_ps(lane_mask(cols - 16), row + 16)
                                          : _mm512_setzero_ps());
  }
};

// 16x16 transpose of 32-bit words: out[j] = (in[0][j], ..., in[15][j]).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3.
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  __m512i out[16];
  for (int j = 0; j < 4; ++j) {
    const __m512i x0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);   // a0 a2 b0 b2
    const __m512i x1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);   // a1 a3 b1 b3
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    const __m512i y1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    out[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);       // lanes 0 of a b c d
    out[4 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);   // lanes 1
    out[8 + j] = _mm512_shuffle_i32x4(x0, y0, 0xdd);   // lanes 2
    out[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xdd);  // lanes 3
  }
  for (int j = 0; j < 16; ++j) r[j] = out[j];
}

template <typename Ops>
int64_t words_of(int64_t K) {
  return (K + Ops::kPerWord - 1) / Ops::kPerWord;
}

// One panel: columns [n0, n0 + kPanel) of B, [words][kPanel] words, zero past N and K.
// B = b^T, b [N, K]: word (p, n) = word p of b's row n: b's rows read as words and transposed,
// 16 rows x 16 words at a time.
template <typename Ops>
void pack_panel_nk(const typename Ops::Bits* b, int64_t ldb, int64_t N, int64_t K, int64_t n0,
                   uint32_t* panel) {
  const int64_t words = words_of<Ops>(K);
  for (int quarter = 0; quarter < kPanel / 16; ++quarter) {
    const int64_t nb = n0 + 16 * quarter;
    for (int64_t p0 = 0; p0 < words; p0 += 16) {
      const int64_t elems = K - p0 * Ops::kPerWord;  // an odd bf16 K: last word's high half zero
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = nb + i < N ? Ops::load16(b + (nb + i) * ldb + p0 * Ops::kPerWord, elems)
                          : _mm512_setzero_si512();
      }
      transpose16(r);
      const int64_t n_words = std::min<int64_t>(16, words - p0);
      for (int64_t j = 0; j < n_words; ++j) {
        _mm512_storeu_si512(panel + (p0 + j) * kPanel + 16 * quarter, r[j]);
      }
    }
  }
}

template <typename Ops>
void pack_panel_kn(const typename Ops::Bits* b, int64_t ldb, int64_t N, int64_t K, int64_t n0,
                   uint32_t* panel) {
  const int64_t words = words_of<Ops>(K);
  for (int sub = 0; sub < kPanel / 32; ++sub) {  // 32 columns per step
    const int64_t nb = n0 + 32 * sub;
    const int64_t cols = std::max<int64_t>(0, std::min<int64_t>(32, N - nb));
    for (int64_t p = 0; p < words; ++p) {
      Ops::pack_kn_row(b + nb, ldb, K, p, cols, panel + p * kPanel + 32 * sub);
    }
  }
}

template <typename Ops>
void pack_panel(const typename Ops::Bits* b, int64_t ldb, bool b_nk, int64_t N, int64_t K,
                int64_t n0, uint32_t* panel) {
  if (b_nk) {
    pack_panel_nk<Ops>(b, ldb, N, K, n0, panel);
  } else {
    pack_panel_kn<Ops>(b, ldb, N, K, n0, panel);
  }
}

// Cache lines of b that one panel's packing reads, as count lines at base + i * stride (+ a
// second line at + 64 bytes when two_lines): the rows of an nn.Linear slice are contiguous; a
// [K, N] panel takes kPanel columns (128 bytes of bf16, 256 of fp32) of every row.
struct PanelLines {
  const char* base = nullptr;
  int64_t stride = 0;
  int64_t count = 0;
  int lines_per_step = 1;
};

template <typename Ops>
PanelLines panel_lines(const typename Ops::Bits* b, int64_t ldb, bool b_nk, int64_t N, int64_t K,
                       int64_t n0) {
  constexpr int64_t kElem = sizeof(typename Ops::Bits);
  PanelLines l;
  if (n0 >= N) return l;
  const int64_t cols = std::min<int64_t>(kPanel, N - n0);
  if (b_nk) {
    l.base = reinterpret_cast<const char*>(b + n0 * ldb);
    l.stride = 64;
    l.count = ((cols - 1) * ldb + K) * kElem / 64 + 1;
  } else {
    l.base = reinterpret_cast<const char*>(b + n0);
    l.stride = ldb * kElem;
    l.count = K;
    l.lines_per_step = static_cast<int>((cols * kElem + 63) / 64);
  }
  return l;
}

// c[ROWS, up to kPanel columns] = a[ROWS, K] @ one packed panel; accumulators stay in registers.
// Also prefetches lines [pf_begin, pf_end) of pf into L2, one step of them per word of the
// reduction, so that the next panel's weight arrives from memory while this one computes.
template <typename Ops, int ROWS>
void tile(const typename Ops::Bits* a, int64_t lda, const uint32_t* panel, int64_t K,
          typename Ops::Bits* c, int64_t ldc, const __mmask16* masks, const PanelLines& pf,
          int64_t pf_begin, int64_t pf_end) {
  constexpr int V = kPanel / 16;
  constexpr int64_t W = Ops::kPerWord;
  __m512 acc[ROWS][V];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const int64_t whole_words = K / W;
  int64_t line = pf_begin;
  for (int64_t p = 0; p < whole_words; ++p) {
    if (line < pf_end) {
      const char* q = pf.base + line * pf.stride;
      for (int i = 0; i < pf.lines_per_step; ++i) _mm_prefetch(q + 64 * i, _MM_HINT_T1);
      ++line;
    }
    __m512i b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_si512(panel + p * kPanel + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const __m512i av = Ops::broadcast_word(a + r * lda + W * p);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = Ops::madd(acc[r][v], av, b[v]);
    }
  }
  if (K % W != 0) {  // bf16, odd K: the last element alone
    const int64_t p = whole_words;
    __m512i b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_si512(panel + p * kPanel + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const __m512i av = Ops::broadcast_last(a + r * lda + K - 1);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = Ops::madd(acc[r][v], av, b[v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) Ops::store(c + r * ldc + 16 * v, masks[v], acc[r][v]);
  }
}

template <typename Ops>
using TileFn = void (*)(const typename Ops::Bits*, int64_t, const uint32_t*, int64_t,
                        typename Ops::Bits*, int64_t, const __mmask16*, const PanelLines&, int64_t,
                        int64_t);

template <typename Ops, int... R>
constexpr std::array<TileFn<Ops>, sizeof...(R)> make_tiles(std::integer_sequence<int, R...>) {
  return {&tile<Ops, R + 1>...};
}

struct PanelMasks {
  __mmask16 v[kPanel / 16];
  PanelMasks(int64_t N, int64_t n0) {
    for (int i = 0; i < kPanel / 16; ++i) {
      v[i] = N - n0 > 16 * i ? lane_mask(N - n0 - 16 * i) : static_cast<__mmask16>(0);
    }
  }
};

// Rows [m0, m1) of c, columns of one panel; the tiles share out the prefetch of pf.
template <typename Ops>
void panel_rows(const typename Ops::Bits* a, int64_t lda, const uint32_t* panel, int64_t N,
                int64_t K, int64_t n0, typename Ops::Bits* c, int64_t ldc, int64_t m0, int64_t m1,
                const PanelLines& pf) {
  static constexpr auto kTiles = make_tiles<Ops>(std::make_integer_sequence<int, kTileRows>{});
  const PanelMasks masks(N, n0);
  const int64_t tiles = (m1 - m0 + kTileRows - 1) / kTileRows;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r = m0 + t * kTileRows;
    const int64_t rows = std::min<int64_t>(kTileRows, m1 - r);
    kTiles[rows - 1](a + r * lda, lda, panel, K, c + r * ldc + n0, ldc, masks.v, pf,
                     t * pf.count / tiles, (t + 1) * pf.count / tiles);
  }
}

template <typename T, typename Ops>
void pack(const T* b_in, int64_t ldb, bool b_nk, int64_t N, int64_t K, uint32_t* packed) {
  const auto* b = reinterpret_cast<const typename Ops::Bits*>(b_in);
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    pack_panel<Ops>(b, ldb, b_nk, N, K, n0, packed + n0 * words_of<Ops>(K));
  }
}

template <typename T, typename Ops>
void gemm(const T* a_in, int64_t lda, const uint32_t* packed, int64_t N, int64_t K, T* c_in,
          int64_t ldc, int64_t M) {
  const auto* a = reinterpret_cast<const typename Ops::Bits*>(a_in);
  auto* c = reinterpret_cast<typename Ops::Bits*>(c_in);
  const int64_t row_bytes = std::max<int64_t>(1, K * static_cast<int64_t>(sizeof(T)));
  const int64_t block = std::max<int64_t>(kTileRows, kABlockBytes / row_bytes / kTileRows * kTileRows);
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t m1 = std::min(M, m0 + block);
    for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
      panel_rows<Ops>(a, lda, packed + n0 * words_of<Ops>(K), N, K, n0, c, ldc, m0, m1, PanelLines{});
    }
  }
}

template <typename T, typename Ops>
void gemm_streamed(const T* a_in, int64_t lda, const T* b_in, int64_t ldb, bool b_nk, int64_t N,
                   int64_t K, T* c_in, int64_t ldc, int64_t M, uint32_t* panel) {
  const auto* a = reinterpret_cast<const typename Ops::Bits*>(a_in);
  const auto* b = reinterpret_cast<const typename Ops::Bits*>(b_in);
  auto* c = reinterpret_cast<typename Ops::Bits*>(c_in);
  pack_panel<Ops>(b, ldb, b_nk, N, K, 0, panel);
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t next = n0 + kPanel;
    panel_rows<Ops>(a, lda, panel, N, K, n0, c, ldc, 0, M, panel_lines<Ops>(b, ldb, b_nk, N, K, next));
    if (next < N) pack_panel<Ops>(b, ldb, b_nk, N, K, next, panel);
  }
}

// out [C, R] (row stride ldo) = x^T, x [R, C] (row stride ldx): 16 words (32 bf16 or 16 fp32
// rows of x) by 16 columns at a time, as words built from x's columns and transposed.
template <typename T, typename Ops>
void transpose(const T* x_in, int64_t ldx, int64_t R, int64_t C, T* out_in, int64_t ldo) {
  const auto* x = reinterpret_cast<const typename Ops::Bits*>(x_in);
  auto* out = reinterpret_cast<typename Ops::Bits*>(out_in);
  constexpr int64_t W = Ops::kPerWord;
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const int64_t cols = std::min<int64_t>(16, C - c0);
    for (int64_t r0 = 0; r0 < R; r0 += 16 * W) {
      __m512i w[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t r = r0 + W * i;
        w[i] = Ops::column_pairs(x + r * ldx + c0, ldx, R - r, cols);
      }
      transpose16(w);
      const int64_t rows = std::min<int64_t>(16 * W, R - r0);
      for (int64_t j = 0; j < cols; ++j) Ops::store_elems(out + (c0 + j) * ldo + r0, w[j], rows);
    }
  }
}

// Rows of a few tokens (decode): c[r, n] = dot(a[r, :], b[n, :]) for ROWS rows and b [N, K]
// (nn.Linear layout) read once, in order, straight from memory: nothing to pack for a product
// this small. For bf16 vdpbf16ps multiplies the stored pairs as they are (no conversion). Each
// dot product runs two accumulators (even and odd chunks) so that one row of a is not bound by
// the multiply-add latency; four rows of b are summed across lanes together.
constexpr int kSmallWeightRows = 4;

// (sum of v[0], ..., sum of v[3]).
inline __m128 sum4(const __m512 v[4]) {
  __m128 q[4];
  for (int j = 0; j < 4; ++j) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v[j]),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[j]), 1)));
    q[j] = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
  return _mm_hadd_ps(_mm_hadd_ps(q[0], q[1]), _mm_hadd_ps(q[2], q[3]));
}

// done[r] = a[r, :] . b_row, lanes not yet summed.
template <typename Ops, int ROWS>
inline void small_dot(const typename Ops::Bits* a, int64_t lda, const typename Ops::Bits* b_row,
                      int64_t K, __m512 (&done)[ROWS]) {
  constexpr int64_t V = Ops::kVecElems;
  __m512 even[ROWS], odd[ROWS];
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 * V <= K; k += 2 * V) {
    const __m512i w0 = _mm512_loadu_si512(b_row + k);
    const __m512i w1 = _mm512_loadu_si512(b_row + k + V);
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      even[r] = Ops::madd(even[r], _mm512_loadu_si512(a + r * lda + k), w0);
      odd[r] = Ops::madd(odd[r], _mm512_loadu_si512(a + r * lda + k + V), w1);
    }
  }
  for (; k < K; k += V) {
    const __m512i w = Ops::load_chunk(b_row + k, K - k);
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) even[r] = Ops::madd(even[r], Ops::load_chunk(a + r * lda + k, K - k), w);
  }
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) done[r] = _mm512_add_ps(even[r], odd[r]);
}

template <typename Ops, int ROWS>
void small_rows(const typename Ops::Bits* a, int64_t lda, const typename Ops::Bits* b, int64_t ldb,
                typename Ops::Bits* c, int64_t ldc, int64_t N, int64_t K) {
  constexpr int NB = kSmallWeightRows;
  int64_t n = 0;
  for (; n + NB <= N; n += NB) {
    __m512 done[NB][ROWS];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) small_dot<Ops, ROWS>(a, lda, b + (n + j) * ldb, K, done[j]);
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const __m512 v[NB] = {done[0][r], done[1][r], done[2][r], done[3][r]};
      Ops::store4(c + r * ldc + n, sum4(v));
    }
  }
  for (; n < N; ++n) {  // the last N % 4 rows of b
    __m512 done[ROWS];
    small_dot<Ops, ROWS>(a, lda, b + n * ldb, K, done);
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) Ops::store1(c + r * ldc + n, _mm512_reduce_add_ps(done[r]));
  }
}

template <typename T, typename Ops>
void small_gemm_nt(const T* a_in, const T* b_in, T* c_in, int64_t ldc, int64_t rows, int64_t N,
                   int64_t K) {
  const auto* a = reinterpret_cast<const typename Ops::Bits*>(a_in);
  const auto* b = reinterpret_cast<const typename Ops::Bits*>(b_in);
  auto* c = reinterpret_cast<typename Ops::Bits*>(c_in);
  for (int64_t r0 = 0; r0 < rows; r0 += kSmallGemmMaxRows) {
    const auto* ar = a + r0 * K;
    auto* cr = c + r0 * ldc;
    static_assert(kSmallGemmMaxRows == 4, "one case per row count");
    switch (std::min<int64_t>(kSmallGemmMaxRows, rows - r0)) {
      case 1: small_rows<Ops, 1>(ar, K, b, K, cr, ldc, N, K); break;
      case 2: small_rows<Ops, 2>(ar, K, b, K, cr, ldc, N, K); break;
      case 3: small_rows<Ops, 3>(ar, K, b, K, cr, ldc, N, K); break;
      default: small_rows<Ops, 4>(ar, K, b, K, cr, ldc, N, K); break;
    }
  }
}

template <typename T, typename Ops>
void fill(Avx512Gemm<T>& out) {
  out.pack = &pack<T, Ops>;
  out.gemm = &gemm<T, Ops>;
  out.gemm_streamed = &gemm_streamed<T, Ops>;
  out.small_gemm_nt = &small_gemm_nt<T, Ops>;
  out.transpose = &transpose<T, Ops>;
}

}  // namespace

bool fill_avx512_gemm(Avx512Gemm<c10::BFloat16>& bf16, Avx512Gemm<float>& fp32) {
  fill<c10::BFloat16, Bf16Ops>(bf16);
  fill<float, Fp32Ops>(fp32);
  return true;
}

}  // namespace dsmoe::cpu

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else

namespace dsmoe::cpu {
bool fill_avx512_gemm(Avx512Gemm<c10::BFloat16>&, Avx512Gemm<float>&) { return false; }
}  // namespace dsmoe::cpu

#endif
