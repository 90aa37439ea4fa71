// bf16_gemm.h's kernel, compiled for AVX512-BF16 (the extension's baseline is x86-64, so the
// target is switched here, after every header, and only this file's functions use it; they run
// only where bf16_gemm_kernel() has checked the CPU).
#include "bf16_gemm.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
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

constexpr int kPanel = static_cast<int>(kBf16PanelCols);
// Rows per micro-kernel call: 12 rows x 2 vectors = 24 accumulators, plus 2 weight vectors and a
// broadcast fit the 32 zmm registers.
constexpr int kTileRows = 6;
// Rows of a whose panel passes share one pass over the packed weight (a block of a stays in L2).
constexpr int64_t kABlockBytes = 192 * 1024;

inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}
inline __mmask32 half_mask(int64_t n) {
  return n >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1ull << n) - 1);
}

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

// One panel: columns [n0, n0 + kPanel) of B, [ceil(K/2)][kPanel] words, zero past N.
// B = b^T, b [N, K]: word (p, n) = the bf16 pair b[n][2p], b[n][2p+1], i.e. b's rows read as
// 32-bit words and transposed, 16 rows x 16 words at a time.
void pack_panel_nk(const uint16_t* b, int64_t ldb, int64_t N, int64_t K, int64_t n0, uint32_t* panel) {
  const int64_t pairs = (K + 1) / 2;
  for (int quarter = 0; quarter < kPanel / 16; ++quarter) {
    const int64_t nb = n0 + 16 * quarter;
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      // bf16 elements of this 16-word strip that exist in each row (an odd K's last word gets a
      // zero high half).
      const __mmask32 elems = half_mask(std::min<int64_t>(32, K - 2 * p0));
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = nb + i < N ? _mm512_maskz_loadu_epi16(elems, b + (nb + i) * ldb + 2 * p0)
                          : _mm512_setzero_si512();
      }
      transpose16(r);
      const int64_t words = std::min<int64_t>(16, pairs - p0);
      for (int64_t j = 0; j < words; ++j) {
        _mm512_storeu_si512(panel + (p0 + j) * kPanel + 16 * quarter, r[j]);
      }
    }
  }
}

// b [K, N]: word (p, n) = b[2p][n], b[2p+1][n]: two rows interleaved.
void pack_panel_kn(const uint16_t* b, int64_t ldb, int64_t N, int64_t K, int64_t n0, uint32_t* panel) {
  const int64_t pairs = (K + 1) / 2;
  // unpack*_epi16 interleave within 128-bit lanes; these put the lanes back in column order.
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int sub = 0; sub < kPanel / 32; ++sub) {  // 32 columns per pair of rows loaded
    const int64_t nb = n0 + 32 * sub;
    const __mmask32 cols = nb < N ? half_mask(N - nb) : 0;
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512i lo_row = _mm512_maskz_loadu_epi16(cols, b + 2 * p * ldb + nb);
      const __m512i hi_row = 2 * p + 1 < K ? _mm512_maskz_loadu_epi16(cols, b + (2 * p + 1) * ldb + nb)
                                           : _mm512_setzero_si512();
      const __m512i lo = _mm512_unpacklo_epi16(lo_row, hi_row);
      const __m512i hi = _mm512_unpackhi_epi16(lo_row, hi_row);
      uint32_t* out = panel + p * kPanel + 32 * sub;
      _mm512_storeu_si512(out, _mm512_permutex2var_epi64(lo, first, hi));
      _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi64(lo, second, hi));
    }
  }
}

void pack_panel(const uint16_t* b, int64_t ldb, bool b_nk, int64_t N, int64_t K, int64_t n0,
                uint32_t* panel) {
  if (b_nk) {
    pack_panel_nk(b, ldb, N, K, n0, panel);
  } else {
    pack_panel_kn(b, ldb, N, K, n0, panel);
  }
}

void pack(const c10::BFloat16* b, int64_t ldb, bool b_nk, int64_t N, int64_t K, uint32_t* packed) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    pack_panel(reinterpret_cast<const uint16_t*>(b), ldb, b_nk, N, K, n0, packed + n0 * pairs);
  }
}

// Cache lines of b that one panel's packing reads, as count lines at base + i * stride (+ a
// second line at + 64 bytes when two_lines): the rows of an nn.Linear slice are contiguous, a
// [K, N] panel takes kPanel columns (128 bytes) of every row.
struct PanelLines {
  const char* base = nullptr;
  int64_t stride = 0;
  int64_t count = 0;
  bool two_lines = false;
};

PanelLines panel_lines(const uint16_t* b, int64_t ldb, bool b_nk, int64_t N, int64_t K, int64_t n0) {
  PanelLines l;
  if (n0 >= N) return l;
  if (b_nk) {
    const int64_t rows = std::min<int64_t>(kPanel, N - n0);
    l.base = reinterpret_cast<const char*>(b + n0 * ldb);
    l.stride = 64;
    l.count = ((rows - 1) * ldb + K) * 2 / 64 + 1;
  } else {
    l.base = reinterpret_cast<const char*>(b + n0);
    l.stride = ldb * 2;
    l.count = K;
    l.two_lines = N - n0 > 32;
  }
  return l;
}

inline __m512i broadcast_pair(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return _mm512_set1_epi32(static_cast<int>(w));
}

// c[ROWS, up to kPanel columns] = a[ROWS, K] @ one packed panel; accumulators stay in registers.
// Also prefetches lines [pf_begin, pf_end) of pf into L2, one per step of the reduction, so that
// the next panel's weight arrives from memory while this one computes.
template <int ROWS>
void tile(const uint16_t* a, int64_t lda, const uint32_t* panel, int64_t K, uint16_t* c,
          int64_t ldc, const __mmask16* masks, const PanelLines& pf, int64_t pf_begin,
          int64_t pf_end) {
  constexpr int V = kPanel / 16;
  __m512 acc[ROWS][V];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const int64_t whole_pairs = K / 2;
  int64_t line = pf_begin;
  for (int64_t p = 0; p < whole_pairs; ++p) {
    if (line < pf_end) {
      const char* q = pf.base + line * pf.stride;
      _mm_prefetch(q, _MM_HINT_T1);
      if (pf.two_lines) _mm_prefetch(q + 64, _MM_HINT_T1);
      ++line;
    }
    __m512bh b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(panel + p * kPanel + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh av = (__m512bh)broadcast_pair(a + r * lda + 2 * p);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, b[v]);
    }
  }
  if (K % 2 != 0) {  // the last element alone: its pair's second half (past the row) is zero
    const int64_t p = whole_pairs;
    __m512bh b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(panel + p * kPanel + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(a[r * lda + K - 1]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, b[v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      _mm256_mask_storeu_epi16(c + r * ldc + 16 * v, masks[v], (__m256i)_mm512_cvtneps_pbh(acc[r][v]));
    }
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, uint16_t*, int64_t,
                        const __mmask16*, const PanelLines&, int64_t, int64_t);

template <int... R>
constexpr auto make_tiles(std::integer_sequence<int, R...>) {
  return std::array<TileFn, sizeof...(R)>{&tile<R + 1>...};
}
constexpr auto kTiles = make_tiles(std::make_integer_sequence<int, kTileRows>{});

struct PanelMasks {
  __mmask16 v[kPanel / 16];
  PanelMasks(int64_t N, int64_t n0) {
    for (int i = 0; i < kPanel / 16; ++i) {
      v[i] = N - n0 > 16 * i ? lane_mask(N - n0 - 16 * i) : static_cast<__mmask16>(0);
    }
  }
};

// Rows [m0, m1) of c, columns of one panel; the tiles share out the prefetch of pf.
void panel_rows(const uint16_t* a, int64_t lda, const uint32_t* panel, int64_t N, int64_t K,
                int64_t n0, uint16_t* c, int64_t ldc, int64_t m0, int64_t m1, const PanelLines& pf) {
  const PanelMasks masks(N, n0);
  const int64_t tiles = (m1 - m0 + kTileRows - 1) / kTileRows;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r = m0 + t * kTileRows;
    const int64_t rows = std::min<int64_t>(kTileRows, m1 - r);
    kTiles[rows - 1](a + r * lda, lda, panel, K, c + r * ldc + n0, ldc, masks.v, pf,
                     t * pf.count / tiles, (t + 1) * pf.count / tiles);
  }
}

void gemm(const c10::BFloat16* a_in, int64_t lda, const uint32_t* packed, int64_t N, int64_t K,
          c10::BFloat16* c_in, int64_t ldc, int64_t M) {
  const auto* a = reinterpret_cast<const uint16_t*>(a_in);
  auto* c = reinterpret_cast<uint16_t*>(c_in);
  const int64_t pairs = (K + 1) / 2;
  const int64_t block =
      std::max<int64_t>(kTileRows, kABlockBytes / std::max<int64_t>(1, 2 * K) / kTileRows * kTileRows);
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t m1 = std::min(M, m0 + block);
    for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
      panel_rows(a, lda, packed + n0 * pairs, N, K, n0, c, ldc, m0, m1, PanelLines{});
    }
  }
}

void gemm_streamed(const c10::BFloat16* a_in, int64_t lda, const c10::BFloat16* b_in, int64_t ldb,
                   bool b_nk, int64_t N, int64_t K, c10::BFloat16* c_in, int64_t ldc, int64_t M,
                   uint32_t* panel) {
  const auto* a = reinterpret_cast<const uint16_t*>(a_in);
  const auto* b = reinterpret_cast<const uint16_t*>(b_in);
  auto* c = reinterpret_cast<uint16_t*>(c_in);
  pack_panel(b, ldb, b_nk, N, K, 0, panel);
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t next = n0 + kPanel;
    panel_rows(a, lda, panel, N, K, n0, c, ldc, 0, M, panel_lines(b, ldb, b_nk, N, K, next));
    if (next < N) pack_panel(b, ldb, b_nk, N, K, next, panel);
  }
}

}  // namespace

bool fill_bf16_gemm_avx512(Bf16Gemm& out) {
  out.pack = &pack;
  out.gemm = &gemm;
  out.gemm_streamed = &gemm_streamed;
  return true;
}

}  // namespace dsmoe::cpu

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else

namespace dsmoe::cpu {
bool fill_bf16_gemm_avx512(Bf16Gemm&) { return false; }
}  // namespace dsmoe::cpu

#endif
