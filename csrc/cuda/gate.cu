// CUDA routing gate: fused softmax + top-k + optional renormalisation + per-sequence statistics,
// and its backward in one kernel.
//
// Layout: a group of G lanes (a power of two, G <= 32, aligned inside its warp) owns one token
// row at a time; lane l of the group holds experts e = v * G + l for v < VPT (E <= G * VPT).
// G and VPT are compile-time (E <= 256: VPT = 8 and G = E/8 rounded up to a power of two, so a
// warp routes 32/G tokens at once; E <= 1024: G = 32 and VPT = 16 or 32). Nothing is indexed
// by a run-time value inside a thread, so the row stays in registers.
//
// Forward, per token: softmax in fp32 (fp64 for fp64 logits) with a group max and sum; then k
// rounds of a group argmax over the keys probs + selection_bias. The order is the one of
// index_math.h topk_insert on the CPU: larger key first, equal keys to the lower expert id, NaN
// keys never chosen while a non-NaN key is left; once only NaN keys are left, the lowest unused
// ids fill the remaining slots (the CPU's fallback). Each round's winner is the same in every
// lane (a strict total order reduced by a fixed butterfly). topk_insert itself is not called:
// it shifts its list by a run-time position, which would move the row to local memory; the tests
// compare ids with the CPU exactly, on tie-heavy inputs too. The fp32 exp is the fast one (the
// build uses --use_fast_math), so probs differ from the CPU's by a few ulp: keys closer than that
// may be ordered differently. weights = probs of the winners,
// divided by (their sum + 1e-20) when normalize, summed in slot order as on the CPU.
// Statistics: tokens_per_expert [S,E] and score_sums [S,E] per sequence. Each block owns a tile of
// one sequence's tokens; token counts go to an integer shared-memory histogram (exact, order-free),
// probabilities are summed per lane in registers, then across the groups of a warp (butterfly)
// and across warps in warp order through shared memory: no float atomics, the same bits on every
// run. A sequence split over several tiles writes per-tile partials that a second kernel adds up
// in a fixed order; a sequence of at most 4 tokens per group (decode) stays in one block.
//
// Backward, per token: recompute the softmax, d probs = d score_sums[s] + the scatter of d weights
// (through the renormalisation when asked), then d logits = p * (dp - sum(dp * p))
// (index_math.h softmax_backward_elem).
//
// Limits: num_experts <= 1024 on CUDA (registers); any k <= E; any T. Above 512 experts each
// thread keeps four arrays of VPT = 32 accumulators (probs, bias, score sums; d probs in the
// backward): 128+ registers in fp32, twice that in fp64, which the compiler may spill to local
// memory. Correctness there is tested (E = 1000 and 1024, on the GPU and in the SIMT emulator);
// its speed has not been measured. Expert ids passed to the
// backward that lie outside [0, E) are ignored (the CPU kernel raises; here that would need a
// device-to-host copy).
#include "../check.h"
#include "../index_math.h"
#include "../op_checks.h"
#include "cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>

namespace dsmoe {
namespace {

using namespace dsmoe::cuda;

constexpr int kThreads = 256;
constexpr int kMaxExperts = 1024;
constexpr int kStatus = 24;  // a candidate's tag: status << kStatus | expert id (ids < 2^24)

// Softmax of the token row held by a group: p[v] = probs of expert v * G + lane (0 outside
// [0, E) and when !active). Every lane of the warp must call it (it shuffles).
template <typename scalar_t, typename acc_t, int G, int VPT>
__device__ __forceinline__ void group_softmax(const scalar_t* __restrict__ row, int E, int lane,
                                              bool active, acc_t (&p)[VPT]) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * G + lane;
    p[v] = (active && e < E) ? static_cast<acc_t>(row[e]) : acc_t(0);
    if (active && e < E) mx = max_acc(mx, p[v]);
  }
  mx = group_max<G>(mx);
  acc_t sum = 0;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * G + lane;
    p[v] = (active && e < E) ? exp_acc(p[v] - mx) : acc_t(0);
    sum += p[v];
  }
  sum = group_sum<G>(sum);
  const acc_t inv = active ? acc_t(1) / sum : acc_t(0);  // an idle group keeps zeros, not NaN
#pragma unroll
  for (int v = 0; v < VPT; ++v) p[v] *= inv;
}

// The top-k order: does candidate a (tag, key) come before b? Status 2: a non-NaN key; 1: only a
// NaN key (the fallback, lowest id first); 0: nothing left in this lane.
template <typename acc_t>
__device__ __forceinline__ bool topk_before(int tag_a, acc_t key_a, int tag_b, acc_t key_b) {
  const int sa = tag_a >> kStatus, sb = tag_b >> kStatus;
  if (sa != sb) return sa > sb;
  if (sa == 2 && key_a != key_b) return key_a > key_b;
  return (tag_a & ((1 << kStatus) - 1)) < (tag_b & ((1 << kStatus) - 1));
}

// One block: the tokens [tile_begin, tile_end) of sequence s, where block b = s * tiles + tile.
// stats_counts / stats_sums are [S, E] (tiles == 1) or per-tile partials [S * tiles, E].
template <typename scalar_t, typename acc_t, int G, int VPT>
__global__ void __launch_bounds__(kThreads)
    gate_forward_kernel(const scalar_t* __restrict__ logits,  // [T, E]
                        const acc_t* __restrict__ bias,       // [E] or nullptr
                        acc_t* __restrict__ weights,          // [T, k]
                        int32_t* __restrict__ expert_ids,     // [T, k]
                        int32_t* __restrict__ stats_counts,   // [S * tiles, E]
                        acc_t* __restrict__ stats_sums,       // [S * tiles, E]
                        int64_t L, int E, int k, int tiles, int64_t tile_tokens, bool normalize) {
  DSMOE_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* s_sums = reinterpret_cast<acc_t*>(smem_raw);   // [E]
  int* s_counts = reinterpret_cast<int*>(s_sums + E);   // [E]

  const int s = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const int64_t begin = s * L + tile * tile_tokens;
  const int64_t end = s * L + min(L, (tile + 1) * tile_tokens);
  const int lane = threadIdx.x % G, group = threadIdx.x / G;
  constexpr int kGroups = kThreads / G;

  for (int e = threadIdx.x; e < E; e += kThreads) s_counts[e] = 0;
  __syncthreads();

  acc_t bias_v[VPT], sums[VPT];
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * G + lane;
    bias_v[v] = (bias != nullptr && e < E) ? bias[e] : acc_t(0);
    sums[v] = 0;
  }

  // Every group runs the same number of iterations (shuffles need the whole warp); a group past
  // the tile's end computes on zeros and writes nothing.
  for (int64_t base = begin; base < end; base += kGroups) {
    const int64_t t = base + group;
    const bool active = t < end;
    acc_t p[VPT];
    group_softmax<scalar_t, acc_t, G, VPT>(logits + (active ? t : 0) * E, E, lane, active, p);
    unsigned taken = 0;  // bit v: expert v * G + lane is chosen or does not exist
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      if (v * G + lane >= E) taken |= 1u << v;
      if (active) sums[v] += p[v];
    }
    acc_t wsum = 0;
    for (int j = 0; j < k; ++j) {
      int tag = 0;  // status 0: nothing left here
      acc_t key = 0, prob = 0;
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        if (taken & (1u << v)) continue;
        const acc_t kv = p[v] + bias_v[v];
        const int e = v * G + lane;
        if (kv == kv) {
          if ((tag >> kStatus) < 2 || kv > key) {
            tag = (2 << kStatus) | e;
            key = kv;
            prob = p[v];
          }
        } else if (tag == 0) {
          tag = (1 << kStatus) | e;
          key = kv;
          prob = p[v];
        }
      }
#pragma unroll
      for (int o = G / 2; o > 0; o /= 2) {
        const int tag_o = __shfl_xor_sync(kFullMask, tag, o);
        const acc_t key_o = __shfl_xor_sync(kFullMask, key, o);
        const acc_t prob_o = __shfl_xor_sync(kFullMask, prob, o);
        if (topk_before(tag_o, key_o, tag, key)) {
          tag = tag_o;
          key = key_o;
          prob = prob_o;
        }
      }
      const int id = tag & ((1 << kStatus) - 1);
      if (id % G == lane) taken |= 1u << (id / G);
      wsum += prob;
      if (active && j % G == lane) {
        expert_ids[t * k + j] = id;
        weights[t * k + j] = prob;
        atomicAdd(&s_counts[id], 1);  // integer: exact whatever the order
      }
    }
    if (normalize && active) {
      const acc_t denom = wsum + acc_t(1e-20);
      for (int j = lane; j < k; j += G) weights[t * k + j] = weights[t * k + j] / denom;
    }
  }

  // Sum the probabilities over the groups of the warp, then over the warps in warp order.
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
#pragma unroll
    for (int o = G; o < 32; o *= 2) sums[v] += __shfl_xor_sync(kFullMask, sums[v], o);
  }
  const int warp = threadIdx.x / 32;
  for (int w = 0; w < kThreads / 32; ++w) {
    if (warp == w && threadIdx.x % 32 < G) {
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        const int e = v * G + lane;
        if (e < E) s_sums[e] = (w == 0 ? acc_t(0) : s_sums[e]) + sums[v];
      }
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < E; e += kThreads) {
    stats_sums[static_cast<int64_t>(blockIdx.x) * E + e] = s_sums[e];
    stats_counts[static_cast<int64_t>(blockIdx.x) * E + e] = s_counts[e];
  }
}

// Adds the per-tile partials of each sequence in a fixed order. Block (32 experts x 32 slices);
// slice y sums tiles y, y + 32, ...; then slice 0 adds the 32 slice sums in order.
template <typename acc_t>
__global__ void __launch_bounds__(1024)
    gate_stats_reduce_kernel(const int32_t* __restrict__ part_counts,  // [S * tiles, E]
                             const acc_t* __restrict__ part_sums,      // [S * tiles, E]
                             int32_t* __restrict__ counts,             // [S, E]
                             acc_t* __restrict__ sums,                 // [S, E]
                             int E, int tiles) {
  __shared__ acc_t s_sums[32][33];
  __shared__ int s_counts[32][33];
  const int chunks = (E + 31) / 32;
  const int s = blockIdx.x / chunks;
  const int e = (blockIdx.x % chunks) * 32 + threadIdx.x;
  acc_t a = 0;
  int c = 0;
  if (e < E) {
    for (int tile = threadIdx.y; tile < tiles; tile += 32) {
      const int64_t idx = (static_cast<int64_t>(s) * tiles + tile) * E + e;
      a += part_sums[idx];
      c += part_counts[idx];
    }
  }
  s_sums[threadIdx.y][threadIdx.x] = a;
  s_counts[threadIdx.y][threadIdx.x] = c;
  __syncthreads();
  if (threadIdx.y == 0 && e < E) {
    acc_t total = 0;
    int count = 0;
    for (int y = 0; y < 32; ++y) {
      total += s_sums[y][threadIdx.x];
      count += s_counts[y][threadIdx.x];
    }
    sums[static_cast<int64_t>(s) * E + e] = total;
    counts[static_cast<int64_t>(s) * E + e] = count;
  }
}

template <typename scalar_t, typename acc_t, int G, int VPT>
__global__ void __launch_bounds__(kThreads)
    gate_backward_kernel(const acc_t* __restrict__ grad_weights,  // [T, k]
                         const acc_t* __restrict__ grad_sums,     // [S, E]
                         const scalar_t* __restrict__ logits,     // [T, E]
                         const int32_t* __restrict__ expert_ids,  // [T, k]
                         scalar_t* __restrict__ grad_logits,      // [T, E]
                         int64_t T, int64_t L, int E, int k, bool normalize) {
  const int lane = threadIdx.x % G;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
  const bool active = t < T;  // no early return: the whole warp shuffles
  acc_t p[VPT], dp[VPT];
  group_softmax<scalar_t, acc_t, G, VPT>(logits + (active ? t : 0) * E, E, lane, active, p);
  const acc_t* gs = grad_sums + (active ? t / L : 0) * E;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * G + lane;
    dp[v] = (active && e < E) ? gs[e] : acc_t(0);
  }
  const int32_t* ids = expert_ids + (active ? t : 0) * k;
  const acc_t* gw = grad_weights + (active ? t : 0) * k;
  if (normalize) {
    // w_j = p_j / D with D = sum_l p_l + 1e-20: dp_j += g_j / D - sum_l g_l p_l / D^2.
    acc_t sum = 0, gdot = 0;
    for (int j = 0; j < k && active; ++j) {
      const int id = ids[j];
      const acc_t g = gw[j];
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        if (v * G + lane == id) {
          sum += p[v];
          gdot += g * p[v];
        }
      }
    }
    sum = group_sum<G>(sum);
    gdot = group_sum<G>(gdot);
    const acc_t D = sum + acc_t(1e-20);
    for (int j = 0; j < k && active; ++j) {
      const int id = ids[j];
      const acc_t g = gw[j];
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        if (v * G + lane == id) dp[v] += g / D - gdot / (D * D);
      }
    }
  } else {
    for (int j = 0; j < k && active; ++j) {
      const int id = ids[j];
      const acc_t g = gw[j];
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        if (v * G + lane == id) dp[v] += g;
      }
    }
  }
  acc_t dot = 0;
#pragma unroll
  for (int v = 0; v < VPT; ++v) dot += dp[v] * p[v];
  dot = group_sum<G>(dot);
  if (!active) return;
  scalar_t* out = grad_logits + t * E;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * G + lane;
    if (e < E) out[e] = static_cast<scalar_t>(softmax_backward_elem<acc_t>(p[v], dp[v], dot));
  }
}

// Calls f(G, VPT) as integral constants for the layout that fits E experts.
template <typename F>
void with_layout(int64_t E, F&& f) {
  using std::integral_constant;
  if (E <= 16) {
    f(integral_constant<int, 2>{}, integral_constant<int, 8>{});
  } else if (E <= 32) {
    f(integral_constant<int, 4>{}, integral_constant<int, 8>{});
  } else if (E <= 64) {
    f(integral_constant<int, 8>{}, integral_constant<int, 8>{});
  } else if (E <= 128) {
    f(integral_constant<int, 16>{}, integral_constant<int, 8>{});
  } else if (E <= 256) {
    f(integral_constant<int, 32>{}, integral_constant<int, 8>{});
  } else if (E <= 512) {
    f(integral_constant<int, 32>{}, integral_constant<int, 16>{});
  } else {
    f(integral_constant<int, 32>{}, integral_constant<int, 32>{});
  }
}

void check_cuda_experts(const char* op, int64_t E) {
  TORCH_CHECK(E <= kMaxExperts, "dsmoe.", op, ": the CUDA kernel supports num_experts <= ",
              kMaxExperts, ", got logits with ", E, " columns");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_cuda(
    const at::Tensor& logits_in, int64_t k, bool normalize,
    const c10::optional<at::Tensor>& bias_in, int64_t num_seqs) {
  check_gate_args(logits_in, k, bias_in, num_seqs);
  check_cuda_experts("gate", logits_in.size(1));
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), S = num_seqs, L = T / S;
  const auto acc_dtype = gate_acc_dtype(logits);
  auto weights = at::empty({T, k}, logits.options().dtype(acc_dtype));
  auto expert_ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) {
    return {weights, expert_ids, at::zeros({S, E}, logits.options().dtype(at::kInt)),
            at::zeros({S, E}, logits.options().dtype(acc_dtype))};
  }
  auto tokens_per_expert = at::empty({S, E}, logits.options().dtype(at::kInt));
  auto score_sums = at::empty({S, E}, logits.options().dtype(acc_dtype));
  c10::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous().to(acc_dtype);
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "dsmoe_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_layout(E, [&](auto g_c, auto vpt_c) {
      constexpr int G = decltype(g_c)::value, VPT = decltype(vpt_c)::value;
      constexpr int groups = kThreads / G;
      // About one wave of blocks over the whole input; a tile never spans two sequences.
      const int64_t target_blocks = int64_t(sm_count()) * 8;
      const int64_t per_group = std::max<int64_t>(1, ceil_div(T, groups * target_blocks));
      // A short sequence (decode) stays in one block: a few more tokens per group cost less
      // than a second launch for the reduction.
      const int64_t tile_tokens = L <= 4 * groups ? L : groups * per_group;
      const int64_t tiles = ceil_div(L, tile_tokens);
      TORCH_CHECK(S * tiles <= int64_t(0x7fffffff), "dsmoe.gate: too many tokens for one launch");
      at::Tensor part_counts = tokens_per_expert, part_sums = score_sums;
      if (tiles > 1) {
        part_counts = at::empty({S * tiles, E}, tokens_per_expert.options());
        part_sums = at::empty({S * tiles, E}, score_sums.options());
      }
      const size_t smem = static_cast<size_t>(E) * (sizeof(acc_t) + sizeof(int));
      DSMOE_LAUNCH((gate_forward_kernel<scalar_t, acc_t, G, VPT>), static_cast<unsigned>(S * tiles), kThreads, smem, stream, logits.data_ptr<scalar_t>(), bias.has_value() ? bias->data_ptr<acc_t>() : nullptr,
          weights.data_ptr<acc_t>(), expert_ids.data_ptr<int32_t>(), part_counts.data_ptr<int32_t>(),
          part_sums.data_ptr<acc_t>(), L, static_cast<int>(E), static_cast<int>(k),
          static_cast<int>(tiles), tile_tokens, normalize);
      if (tiles > 1) {
        const int64_t blocks = S * ceil_div(E, 32);
        TORCH_CHECK(blocks <= int64_t(0x7fffffff), "dsmoe.gate: too many sequences for one launch");
        DSMOE_LAUNCH(gate_stats_reduce_kernel<acc_t>, static_cast<unsigned>(blocks), dim3(32, 32), 0, stream, part_counts.data_ptr<int32_t>(), part_sums.data_ptr<acc_t>(),
            tokens_per_expert.data_ptr<int32_t>(), score_sums.data_ptr<acc_t>(), static_cast<int>(E),
            static_cast<int>(tiles));
      }
    });
  });
  return {weights, expert_ids, tokens_per_expert, score_sums};
}

at::Tensor gate_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& grad_sums_in,
                              const at::Tensor& logits_in, const at::Tensor& expert_ids_in,
                              bool normalize, int64_t num_seqs) {
  check_gate_backward_args(grad_weights_in, grad_sums_in, logits_in, expert_ids_in, num_seqs);
  check_cuda_experts("gate_backward", logits_in.size(1));
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto expert_ids = expert_ids_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = expert_ids.size(1), L = T / num_seqs;
  const auto acc_dtype = gate_acc_dtype(logits);
  const auto grad_weights = grad_weights_in.contiguous().to(acc_dtype);
  const auto grad_sums = grad_sums_in.contiguous().to(acc_dtype);
  auto grad_logits = at::empty_like(logits);
  if (T == 0) return grad_logits;
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "dsmoe_gate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_layout(E, [&](auto g_c, auto vpt_c) {
      constexpr int G = decltype(g_c)::value, VPT = decltype(vpt_c)::value;
      DSMOE_LAUNCH((gate_backward_kernel<scalar_t, acc_t, G, VPT>), grid_for(T, kThreads / G), kThreads, 0, stream, grad_weights.data_ptr<acc_t>(), grad_sums.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(),
          expert_ids.data_ptr<int32_t>(), grad_logits.data_ptr<scalar_t>(), T, L,
          static_cast<int>(E), static_cast<int>(k), normalize);
    });
  });
  return grad_logits;
}

}  // namespace

DSMOE_CUDA_LIBRARY_IMPL(m) {
  m.impl("gate", &gate_cuda);                    // fused softmax + top-k + statistics
  m.impl("gate_backward", &gate_backward_cuda);  // d logits, one kernel
}

}  // namespace dsmoe
