// The inner loops of moe_decode (csrc/cpu/moe_decode.cpp), written once against an 8-lane fp32
// vector type `V` that the including file defines: included once for AVX2+FMA+F16C (inside a
// `#pragma GCC target` region, V = __m256) and once for the baseline ISA (V = 8 floats in a
// struct, which the compiler vectorises with SSE2). Everything lands in the namespace the
// includer opened, so the two builds never mix.
//
// Packed layouts (moe_decode.cpp's pack_decode_weights):
//   gate_up [nb][h][16]: block b, column c holds gate rows 8b..8b+7 (lanes 0..7) and up rows
//     8b..8b+7 (lanes 8..15) of column c; rows past I are zeros.
//   down [nbh][Ip][8]: block b, column i holds rows 8b..8b+7 of down's column i; Ip = 8 * nb.
// Each loop broadcasts one input value and multiplies it with a vector of weights (no
// horizontal sums), reading each block's weights once per tile of tokens, in address order.

// Every loop over the CS x NT accumulators is unrolled (#pragma GCC unroll) so that GCC keeps
// them in registers; rolled, it kept them on the stack.
//
// Up to this many tokens share one pass over a gate|up block (2 accumulators each) and a
// down block (1 accumulator each); more tokens re-read the block from L2.
constexpr int kGateUpTile = 4;
constexpr int kDownTile = 8;
// Software prefetch this far ahead in a block's stream: one core keeps more cache-line reads in
// flight than the hardware prefetcher alone asks for (bf16 at T=1: ~15% faster on one thread).
constexpr int64_t kPrefetchBytes = 1024;

// Gate|up block b of one expert for the tokens `rows` (fp32 rows of x, h apart): writes
// silu(gate) * up of the 8 columns of the block into hidden[r * ldh + 8b ..]. One token keeps two
// chains per accumulator (even and odd columns) so that the FMA latency does not bound it.
template <typename W, int NT>
inline void gate_up_tile(const W* block, int64_t h, const float* const* rows, float* hidden,
                         int64_t ldh) {
  constexpr int CS = NT == 1 ? 2 : 1;
  V g[CS][NT], u[CS][NT];
#pragma GCC unroll 16
  for (int s = 0; s < CS; ++s) {
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) g[s][t] = u[s][t] = v_zero();
  }
  int64_t c = 0;
  for (; c + CS <= h; c += CS) {
    // past the end of the block: harmless (a prefetch never faults)
    // one prefetch per cache line of this step (fp32 with two chains: 2 lines)
#pragma GCC unroll 4
    for (int64_t l = 0; l < (CS * 16 * int64_t(sizeof(W)) + 63) / 64; ++l)
      v_prefetch(reinterpret_cast<const char*>(block + c * 16) + kPrefetchBytes + l * 64);
#pragma GCC unroll 16
    for (int s = 0; s < CS; ++s) {
      const W* w = block + (c + s) * 16;
      const V wg = v_load_w(w), wu = v_load_w(w + 8);
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        const V xb = v_bcast(rows[t] + c + s);
        g[s][t] = v_fma(xb, wg, g[s][t]);
        u[s][t] = v_fma(xb, wu, u[s][t]);
      }
    }
  }
  for (; c < h; ++c) {
    const W* w = block + c * 16;
    const V wg = v_load_w(w), wu = v_load_w(w + 8);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      const V xb = v_bcast(rows[t] + c);
      g[0][t] = v_fma(xb, wg, g[0][t]);
      u[0][t] = v_fma(xb, wu, u[0][t]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) {
    V gs = g[0][t], us = u[0][t];
#pragma GCC unroll 16
    for (int s = 1; s < CS; ++s) {
      gs = v_add(gs, g[s][t]);
      us = v_add(us, u[s][t]);
    }
    v_store(hidden + t * ldh, v_silu_mul(gs, us));
  }
}

// Two consecutive gate|up blocks of one expert for one token (two streams read side by side):
// hidden[0..16) = silu(gate) * up of the blocks' 16 columns.
template <typename W>
void gate_up_pair(const W* block, int64_t h, const float* row, float* hidden) {
  const W* b1 = block + h * 16;
  V g0 = v_zero(), u0 = v_zero(), g1 = v_zero(), u1 = v_zero();
  V g0b = v_zero(), u0b = v_zero(), g1b = v_zero(), u1b = v_zero();
  int64_t c = 0;
  for (; c + 2 <= h; c += 2) {
#pragma GCC unroll 4
    for (int64_t l = 0; l < (2 * 16 * int64_t(sizeof(W)) + 63) / 64; ++l) {
      v_prefetch(reinterpret_cast<const char*>(block + c * 16) + kPrefetchBytes + l * 64);
      v_prefetch(reinterpret_cast<const char*>(b1 + c * 16) + kPrefetchBytes + l * 64);
    }
    const V x0 = v_bcast(row + c), x1 = v_bcast(row + c + 1);
    g0 = v_fma(x0, v_load_w(block + c * 16), g0);
    u0 = v_fma(x0, v_load_w(block + c * 16 + 8), u0);
    g1 = v_fma(x0, v_load_w(b1 + c * 16), g1);
    u1 = v_fma(x0, v_load_w(b1 + c * 16 + 8), u1);
    g0b = v_fma(x1, v_load_w(block + c * 16 + 16), g0b);
    u0b = v_fma(x1, v_load_w(block + c * 16 + 24), u0b);
    g1b = v_fma(x1, v_load_w(b1 + c * 16 + 16), g1b);
    u1b = v_fma(x1, v_load_w(b1 + c * 16 + 24), u1b);
  }
  for (; c < h; ++c) {
    const V x0 = v_bcast(row + c);
    g0 = v_fma(x0, v_load_w(block + c * 16), g0);
    u0 = v_fma(x0, v_load_w(block + c * 16 + 8), u0);
    g1 = v_fma(x0, v_load_w(b1 + c * 16), g1);
    u1 = v_fma(x0, v_load_w(b1 + c * 16 + 8), u1);
  }
  v_store(hidden, v_silu_mul(v_add(g0, g0b), v_add(u0, u0b)));
  v_store(hidden + 8, v_silu_mul(v_add(g1, g1b), v_add(u1, u1b)));
}

template <typename W>
void gate_up_block(const W* block, int64_t h, const float* const* rows, int64_t n, float* hidden,
                   int64_t ldh) {
  for (int64_t t0 = 0; t0 < n; t0 += kGateUpTile) {
    const float* const* r = rows + t0;
    float* o = hidden + t0 * ldh;
    switch (std::min<int64_t>(kGateUpTile, n - t0)) {
      case 1: gate_up_tile<W, 1>(block, h, r, o, ldh); break;
      case 2: gate_up_tile<W, 2>(block, h, r, o, ldh); break;
      case 3: gate_up_tile<W, 3>(block, h, r, o, ldh); break;
      default: gate_up_tile<W, 4>(block, h, r, o, ldh); break;
    }
  }
}

// Down block of one expert for NT hidden rows (fp32, Ip apart and long):
// out[t][0..8) = hidden[t] . down rows 8b..8b+7. Fewer than four tokens split the columns over
// several chains.
template <typename W, int NT>
inline void down_tile(const W* block, int64_t Ip, const float* hidden, float* out) {
  constexpr int CS = NT == 1 ? 4 : (NT < 4 ? 2 : 1);
  V acc[CS][NT];
#pragma GCC unroll 16
  for (int s = 0; s < CS; ++s) {
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) acc[s][t] = v_zero();
  }
  // Ip is a multiple of 8, so of CS.
  for (int64_t i = 0; i < Ip; i += CS) {
#pragma GCC unroll 4
    for (int64_t l = 0; l < (CS * 8 * int64_t(sizeof(W)) + 63) / 64; ++l)
      v_prefetch(reinterpret_cast<const char*>(block + i * 8) + kPrefetchBytes + l * 64);
#pragma GCC unroll 16
    for (int s = 0; s < CS; ++s) {
      const V w = v_load_w(block + (i + s) * 8);
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) acc[s][t] = v_fma(v_bcast(hidden + t * Ip + i + s), w, acc[s][t]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) {
    V sum = acc[0][t];
#pragma GCC unroll 16
    for (int s = 1; s < CS; ++s) sum = v_add(sum, acc[s][t]);
    v_store(out + t * 8, sum);
  }
}

// Two down blocks of one expert (block, second) for one hidden row, read side by side:
// out0[0..8) and out1[0..8), the same sums in the same order as down_tile<W, 1>.
template <typename W>
void down_pair(const W* block, const W* second, int64_t Ip, const float* hidden, float* out0,
               float* out1) {
  constexpr int CS = 4;
  V a[CS], c[CS];
#pragma GCC unroll 4
  for (int s = 0; s < CS; ++s) a[s] = c[s] = v_zero();
  for (int64_t i = 0; i < Ip; i += CS) {
#pragma GCC unroll 4
    for (int64_t l = 0; l < (CS * 8 * int64_t(sizeof(W)) + 63) / 64; ++l) {
      v_prefetch(reinterpret_cast<const char*>(block + i * 8) + kPrefetchBytes + l * 64);
      v_prefetch(reinterpret_cast<const char*>(second + i * 8) + kPrefetchBytes + l * 64);
    }
#pragma GCC unroll 4
    for (int s = 0; s < CS; ++s) {
      const V x = v_bcast(hidden + i + s);
      a[s] = v_fma(x, v_load_w(block + (i + s) * 8), a[s]);
      c[s] = v_fma(x, v_load_w(second + (i + s) * 8), c[s]);
    }
  }
  V sa = a[0], sc = c[0];
#pragma GCC unroll 4
  for (int s = 1; s < CS; ++s) {
    sa = v_add(sa, a[s]);
    sc = v_add(sc, c[s]);
  }
  v_store(out0, sa);
  v_store(out1, sc);
}

// The n rows of one expert (hidden row t -> out row t, [n][8]).
template <typename W>
void down_block(const W* block, int64_t Ip, const float* hidden, int64_t n, float* out) {
  for (int64_t t0 = 0; t0 < n; t0 += kDownTile) {
    const float* hd = hidden + t0 * Ip;
    float* o = out + t0 * 8;
    switch (std::min<int64_t>(kDownTile, n - t0)) {
      case 1: down_tile<W, 1>(block, Ip, hd, o); break;
      case 2: down_tile<W, 2>(block, Ip, hd, o); break;
      case 3: down_tile<W, 3>(block, Ip, hd, o); break;
      case 4: down_tile<W, 4>(block, Ip, hd, o); break;
      case 5: down_tile<W, 5>(block, Ip, hd, o); break;
      case 6: down_tile<W, 6>(block, Ip, hd, o); break;
      case 7: down_tile<W, 7>(block, Ip, hd, o); break;
      default: down_tile<W, 8>(block, Ip, hd, o); break;
    }
  }
}

// acc[tokens[r]][0..8) += scales[r] * partial[r][0..8), r in order: one FMA per product, so a
// token that chose an expert twice gets it twice.
inline void add_scaled_rows(const float* partial, int64_t rows, const int32_t* tokens,
                            const float* scales, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = acc + static_cast<int64_t>(tokens[r]) * 8;
    v_store(o, v_fma(v_set1(scales[r]), v_load(partial + r * 8), v_load(o)));
  }
}

template <typename W>
DecodeKernels<W> decode_kernels_of() {
  return DecodeKernels<W>{&gate_up_block<W>, &down_block<W>, &add_scaled_rows, &gate_up_pair<W>,
                          &down_pair<W>};
}

inline void fill_decode_kernels(AllDecodeKernels& out) {
  out.f32 = decode_kernels_of<float>();
  out.bf16 = decode_kernels_of<c10::BFloat16>();
  out.f16 = decode_kernels_of<c10::Half>();
}
