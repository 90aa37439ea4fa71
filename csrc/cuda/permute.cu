// CUDA permute / unpermute and their backward.
//
// permute computes the routing table on the device, with no device-to-host copy and no sort of
// the whole table. The M = T*k flat entries f = t*k + j are cut into tiles of consecutive
// entries, each tile into one segment per warp. Bucket of an entry: its expert id, or E (an
// overflow bucket after the last expert) for an id outside [0, E).
//   1. histogram: tile_counts[bucket, tile] (integer shared-memory atomics: exact).
//   2. scan: one block turns the bucket-major [E+1, tiles] matrix into exclusive prefix sums,
//      so tile_counts[e, b] becomes the first row of expert e that tile b fills, and
//      expert_offsets[e] = tile_counts[e, 0].
//   3. rank: each warp walks its segment 32 entries at a time in entry order; __match_any_sync
//      groups the lanes of one bucket, and a lane's row is the segment's running count for the
//      bucket plus the number of lower lanes in its group. Per-warp counts (a first pass) are
//      scanned across warps in warp order, so rows follow entry order: stable within an expert.
//   When the whole table fits one tile (M <= 512 entries per warp, decode sizes), one kernel does
//   1-3 in shared memory. row_map is always a permutation of [0, M): ids outside [0, E) land
//   after the last expert (expert_offsets[E] = number of valid entries). Ids >= E are dropped as
//   on the CPU (transformers' expert-parallel sentinels); negative ids too (the CPU kernel
//   raises on those, which would need a device-to-host copy here).
//   4. copy: one thread per 16-byte unit (or the widest unit the row size and alignment allow)
//      of a token row reads it once and writes its k copies; the rows of dropped entries get
//      zeros, as on the CPU.
// unpermute / permute_backward: out[t] = sum_j w[t,j] * src[row_map[t*k+j]], a gather in slot
// order with fp32 accumulation (fp64 for fp64) by one thread per VEC columns of a token row;
// deterministic, no atomics. VEC is 16 bytes when the row width and the pointers allow, else 1.
// unpermute_backward: per token, grad_y_perm[row_map[t*k+j]] = w[t,j] * grad_y[t] and
// grad_weights[t,j] = <grad_y[t], y_perm[row_map[t*k+j]]>, the dot products reduced by a fixed
// tree (shuffles, then shared memory across the token's warps).
// Rows named in row_map outside [0, M) are skipped (the CPU kernel raises).
// Limits: num_experts <= 8192 on CUDA (shared memory of the rank kernel). Expert ids int32 or
// int64, read as given (no cast pass); row_map and expert_offsets are int32.
#include "../check.h"
#include "../op_checks.h"
#include "cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace dsmoe {
namespace {

using namespace dsmoe::cuda;

constexpr int kMaxExperts = 8192;
constexpr int kScanThreads = 1024;
constexpr int kScanItems = 4;
constexpr int kThreads = 256;
// A single fused routing kernel up to this many entries per warp.
constexpr int kFusedSegment = 512;
// Segment of a warp in the multi-tile path, grown when needed so that the scan matrix
// (E+1) x tiles stays below kMaxScan entries.
constexpr int kSegment = 128;
constexpr int64_t kMaxScan = 65536;

// Expert ids are int32 or int64 (transformers' routers give int64; no cast pass).
template <typename id_t>
__device__ __forceinline__ int bucket_of(id_t e, int E) {
  return (e >= 0 && e < id_t(E)) ? int(e) : E;
}

template <typename id_t>
__global__ void __launch_bounds__(kThreads)
    permute_histogram_kernel(const id_t* __restrict__ ids,  // [M]
                             int32_t* __restrict__ tile_counts,  // [E+1, tiles]
                             int64_t M, int E, int64_t tile_entries, int tiles) {
  DSMOE_DYNAMIC_SHARED(int, hist);  // [E+1]
  for (int b = threadIdx.x; b <= E; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * tile_entries;
  const int64_t end = min(M, begin + tile_entries);
  for (int64_t f = begin + threadIdx.x; f < end; f += blockDim.x) atomicAdd(&hist[bucket_of(ids[f], E)], 1);
  __syncthreads();
  for (int b = threadIdx.x; b <= E; b += blockDim.x) {
    tile_counts[static_cast<int64_t>(b) * tiles + blockIdx.x] = hist[b];
  }
}

// Exclusive scan of data[0, n) in place by one block; then offsets[e] = data[e * tiles].
__global__ void __launch_bounds__(kScanThreads)
    permute_scan_kernel(int32_t* __restrict__ data, int32_t* __restrict__ offsets, int64_t n,
                        int E, int tiles) {
  __shared__ int scratch[32];
  int carry = 0;
  for (int64_t base = 0; base < n; base += int64_t(kScanThreads) * kScanItems) {
    const int64_t i0 = base + int64_t(threadIdx.x) * kScanItems;
    int v[kScanItems];
    int local = 0;
#pragma unroll
    for (int q = 0; q < kScanItems; ++q) {
      v[q] = i0 + q < n ? data[i0 + q] : 0;
      local += v[q];
    }
    int total;
    int run = carry + block_exclusive_scan(local, scratch, total);
#pragma unroll
    for (int q = 0; q < kScanItems; ++q) {
      if (i0 + q < n) data[i0 + q] = run;
      run += v[q];
    }
    carry += total;
  }
  __syncthreads();  // the block's global writes above are visible to the block after this
  for (int e = threadIdx.x; e <= E; e += blockDim.x) offsets[e] = data[static_cast<int64_t>(e) * tiles];
}

// Ranks (rows of x_perm) of the entries of one tile. tile_base: the scanned [E+1, tiles] matrix,
// or nullptr when this is the only tile (the kernel then scans the buckets itself and writes
// expert_offsets).
template <typename id_t>
__global__ void __launch_bounds__(kThreads)
    permute_rank_kernel(const id_t* __restrict__ ids,           // [M]
                        const int32_t* __restrict__ tile_base,  // [E+1, tiles] or nullptr
                        int32_t* __restrict__ row_map,          // [M]
                        int32_t* __restrict__ offsets,          // [E+1], single tile only
                        int64_t M, int E, int segment, int tiles) {
  DSMOE_DYNAMIC_SHARED(int, smem);
  const int B = E + 1, nwarps = blockDim.x / 32;
  int* hist = smem;                   // [nwarps][B]: running count of each bucket per warp
  int* scratch = smem + nwarps * B;   // [32]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < nwarps * B; i += blockDim.x) hist[i] = 0;
  __syncthreads();

  const int64_t seg_begin = (static_cast<int64_t>(blockIdx.x) * nwarps + warp) * segment;
  const int64_t seg_end = min(M, seg_begin + segment);
  int* my = hist + warp * B;
  // Pass 1: entries per bucket in this warp's segment.
  for (int64_t f0 = seg_begin; f0 < seg_end; f0 += 32) {  // warp-uniform bounds
    const int64_t f = f0 + lane;
    const int b = f < seg_end ? bucket_of(ids[f], E) : -1;
    const unsigned peers = __match_any_sync(kFullMask, b);
    if (b >= 0 && lane == __ffs(peers) - 1) my[b] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();

  // Turn the per-warp counts into per-warp starting rows.
  if (tile_base == nullptr) {
    // Buckets split into contiguous chunks per thread; chunk sums scanned across the block.
    const int chunk = (B + blockDim.x - 1) / blockDim.x;
    const int b0 = min(B, static_cast<int>(threadIdx.x) * chunk), b1 = min(B, b0 + chunk);
    int local = 0;
    for (int b = b0; b < b1; ++b) {
      for (int w = 0; w < nwarps; ++w) local += hist[w * B + b];
    }
    int total;
    int run = block_exclusive_scan(local, scratch, total);
    for (int b = b0; b < b1; ++b) {
      offsets[b] = run;
      for (int w = 0; w < nwarps; ++w) {
        const int c = hist[w * B + b];
        hist[w * B + b] = run;
        run += c;
      }
    }
  } else {
    for (int b = threadIdx.x; b < B; b += blockDim.x) {
      int run = tile_base[static_cast<int64_t>(b) * tiles + blockIdx.x];
      for (int w = 0; w < nwarps; ++w) {
        const int c = hist[w * B + b];
        hist[w * B + b] = run;
        run += c;
      }
    }
  }
  __syncthreads();

  // Pass 2: the same walk hands out rows in entry order.
  for (int64_t f0 = seg_begin; f0 < seg_end; f0 += 32) {
    const int64_t f = f0 + lane;
    const int b = f < seg_end ? bucket_of(ids[f], E) : -1;
    const unsigned peers = __match_any_sync(kFullMask, b);
    if (b >= 0) row_map[f] = my[b] + __popc(peers & lanemask_lt());
    __syncwarp();
    if (b >= 0 && lane == __ffs(peers) - 1) my[b] += __popc(peers);
    __syncwarp();
  }
}

// x_perm[row_map[t*k+j]] = x[t] for every j, in units of U (16 bytes when possible); rows from
// expert_offsets[E] on (ids outside [0, E): dropped) get zeros, as on the CPU.
template <typename U>
__global__ void __launch_bounds__(kThreads)
    permute_copy_kernel(const U* __restrict__ x,              // [T, units]
                        const int32_t* __restrict__ row_map,  // [T*k]
                        const int32_t* __restrict__ offsets,  // [E+1]
                        U* __restrict__ x_perm,               // [T*k, units]
                        int64_t T, int k, int64_t units, int E) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * units) return;
  const int64_t t = i / units, c = i - t * units;
  const U v = x[i];
  U zero;
  memset(&zero, 0, sizeof(U));
  const int32_t kept = offsets[E];
  const int32_t* rows = row_map + t * k;
  for (int j = 0; j < k; ++j) x_perm[static_cast<int64_t>(rows[j]) * units + c] = rows[j] < kept ? v : zero;
}

// out[t] = sum_j (w ? w[t*k+j] : 1) * src[row_map[t*k+j]], VEC columns per thread.
template <typename scalar_t, int VEC, bool kWeighted>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const scalar_t* __restrict__ src,                        // [M, h]
                       const int32_t* __restrict__ row_map,                     // [T*k]
                       const at::opmath_type<scalar_t>* __restrict__ weights,  // [T*k] or nullptr
                       scalar_t* __restrict__ out,                              // [T, h]
                       int64_t T, int k, int64_t h, int64_t M) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nvec = h / VEC;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * nvec) return;
  const int64_t t = i / nvec, c = (i - t * nvec) * VEC;
  acc_t acc[VEC];
#pragma unroll
  for (int q = 0; q < VEC; ++q) acc[q] = 0;
  const int32_t* rows = row_map + t * k;
#pragma unroll 4
  for (int j = 0; j < k; ++j) {
    const int64_t r = rows[j];
    if (r < 0 || r >= M) continue;
    const acc_t w = kWeighted ? weights[t * k + j] : acc_t(1);
    const auto v = load_vec<VEC>(src + r * h + c);
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] += w * static_cast<acc_t>(v.v[q]);
  }
  Vec<scalar_t, VEC> o;
#pragma unroll
  for (int q = 0; q < VEC; ++q) o.v[q] = static_cast<scalar_t>(acc[q]);
  store_vec<VEC>(out + t * h + c, o);
}

// Slots of one token handled per pass of unpermute_backward (dot products kept in registers).
constexpr int kSlotChunk = 8;

// tpt threads (a power of two, 32..kThreads) per token; VEC columns per thread and step.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    unpermute_backward_kernel(const scalar_t* __restrict__ grad_y,                 // [T, h]
                              const scalar_t* __restrict__ y_perm,                 // [M, h]
                              const int32_t* __restrict__ row_map,                 // [T*k]
                              const at::opmath_type<scalar_t>* __restrict__ weights,  // [T*k]
                              scalar_t* __restrict__ grad_y_perm,                  // [M, h]
                              at::opmath_type<scalar_t>* __restrict__ grad_weights,   // [T*k]
                              int64_t T, int k, int64_t h, int64_t M, int tpt) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kThreads / 32][kSlotChunk];
  const int64_t nvec = h / VEC;
  const int tokens_per_block = kThreads / tpt;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * tokens_per_block + threadIdx.x / tpt;
  const int li = threadIdx.x % tpt, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool active = t < T;  // every thread reaches the barriers below
  for (int j0 = 0; j0 < k; j0 += kSlotChunk) {
    acc_t dots[kSlotChunk];
#pragma unroll
    for (int jj = 0; jj < kSlotChunk; ++jj) dots[jj] = 0;
    if (active) {
      for (int64_t cv = li; cv < nvec; cv += tpt) {
        const int64_t c = cv * VEC;
        const auto g = load_vec<VEC>(grad_y + t * h + c);
#pragma unroll
        for (int jj = 0; jj < kSlotChunk; ++jj) {
          const int j = j0 + jj;
          if (j >= k) break;
          const int64_t f = t * k + j;
          const int64_t r = row_map[f];
          if (r < 0 || r >= M) continue;
          const acc_t w = weights[f];
          const auto y = load_vec<VEC>(y_perm + r * h + c);
          Vec<scalar_t, VEC> o;
#pragma unroll
          for (int q = 0; q < VEC; ++q) {
            const acc_t gq = static_cast<acc_t>(g.v[q]);
            dots[jj] += gq * static_cast<acc_t>(y.v[q]);
            o.v[q] = static_cast<scalar_t>(w * gq);
          }
          store_vec<VEC>(grad_y_perm + r * h + c, o);
        }
      }
    }
#pragma unroll
    for (int jj = 0; jj < kSlotChunk; ++jj) dots[jj] = group_sum<32>(dots[jj]);
    if (tpt == 32) {
      if (active && lane < kSlotChunk && j0 + lane < k) {
        acc_t mine = 0;
#pragma unroll
        for (int jj = 0; jj < kSlotChunk; ++jj) mine = jj == lane ? dots[jj] : mine;
        grad_weights[t * k + j0 + lane] = mine;
      }
    } else {
      if (lane == 0) {
#pragma unroll
        for (int jj = 0; jj < kSlotChunk; ++jj) partial[warp][jj] = dots[jj];
      }
      __syncthreads();
      if (active && li < kSlotChunk && j0 + li < k) {
        const int first = (threadIdx.x / tpt) * (tpt / 32);
        acc_t total = 0;
        for (int w = 0; w < tpt / 32; ++w) total += partial[first + w][li];
        grad_weights[t * k + j0 + li] = total;
      }
      __syncthreads();
    }
  }
}

// Widest unit (16, 8, 4 or 2 bytes; at least the element size) dividing the row size in bytes
// and the alignment of both pointers.
int copy_unit(int64_t row_bytes, int64_t elem, const void* a, const void* b) {
  for (int unit = 16; unit > elem; unit /= 2) {
    if (row_bytes % unit == 0 && reinterpret_cast<uintptr_t>(a) % unit == 0 &&
        reinterpret_cast<uintptr_t>(b) % unit == 0) {
      return unit;
    }
  }
  return static_cast<int>(elem);
}

template <typename scalar_t>
bool vec16_ok(int64_t h, std::initializer_list<const void*> ptrs) {
  if (h % kVec16<scalar_t> != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x_in,
                                                            const at::Tensor& ids_in,
                                                            int64_t num_experts) {
  check_permute_args(x_in, ids_in, num_experts);
  TORCH_CHECK(num_experts <= kMaxExperts, "dsmoe.permute: the CUDA kernel supports num_experts <= ",
              kMaxExperts, ", got ", num_experts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = x.size(0), h = x.size(1), k = ids.size(1), M = T * k, E = num_experts;
  auto x_perm = at::empty({M, h}, x.options());
  auto row_map = at::empty({M}, ids.options().dtype(at::kInt));
  auto offsets = at::empty({E + 1}, ids.options().dtype(at::kInt));
  if (M == 0) {
    offsets.zero_();
    return {x_perm, row_map, offsets};
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int B = static_cast<int>(E) + 1;
  // As many warps (<= 8) as the per-warp bucket counts leave room for in 48 KB of shared memory.
  const int nwarps = std::max(1, std::min(8, (48 * 1024 / 4 - 32) / B));
  const int threads = nwarps * 32;
  const size_t rank_smem = (static_cast<size_t>(nwarps) * B + 32) * sizeof(int);
  int32_t* map_p = row_map.data_ptr<int32_t>();
  auto route = [&](auto* id_p) {
    using id_t = std::remove_const_t<std::remove_pointer_t<decltype(id_p)>>;
    if (M <= int64_t(nwarps) * kFusedSegment) {
      const int segment = static_cast<int>(ceil_div(ceil_div(M, nwarps), 32) * 32);
      DSMOE_LAUNCH(permute_rank_kernel<id_t>, 1, threads, rank_smem, stream, id_p, nullptr, map_p, offsets.data_ptr<int32_t>(),
                                                             M, static_cast<int>(E), segment, 1);
    } else {
      int64_t segment = kSegment;
      while (B * ceil_div(M, nwarps * segment) > kMaxScan && segment < (int64_t(1) << 24)) segment *= 2;
      const int64_t tile_entries = nwarps * segment;
      const int64_t tiles = ceil_div(M, tile_entries);
      auto tile_counts = at::empty({B * tiles}, ids.options().dtype(at::kInt));
      DSMOE_LAUNCH(permute_histogram_kernel<id_t>, static_cast<unsigned>(tiles), threads, B * sizeof(int), stream, id_p, tile_counts.data_ptr<int32_t>(), M, static_cast<int>(E), tile_entries, static_cast<int>(tiles));
      DSMOE_LAUNCH(permute_scan_kernel, 1, kScanThreads, 0, stream, tile_counts.data_ptr<int32_t>(),
                                                          offsets.data_ptr<int32_t>(), B * tiles,
                                                          static_cast<int>(E), static_cast<int>(tiles));
      DSMOE_LAUNCH(permute_rank_kernel<id_t>, static_cast<unsigned>(tiles), threads, rank_smem, stream, id_p, tile_counts.data_ptr<int32_t>(), map_p, nullptr, M, static_cast<int>(E),
          static_cast<int>(segment), static_cast<int>(tiles));
    }
  };
  if (ids.scalar_type() == at::kLong) {
    route(ids.data_ptr<int64_t>());
  } else {
    route(ids.data_ptr<int32_t>());
  }

  if (h > 0) {
    const int64_t elem = x.element_size(), row_bytes = h * elem;
    const int unit = copy_unit(row_bytes, elem, x.data_ptr(), x_perm.data_ptr());
    const int64_t units = row_bytes / unit;
    const dim3 grid = grid_for(T * units, kThreads);
    const int kk = static_cast<int>(k);
    switch (unit) {
      case 16:
        DSMOE_LAUNCH(permute_copy_kernel<uint4>, grid, kThreads, 0, stream, static_cast<const uint4*>(x.data_ptr()), map_p, offsets.data_ptr<int32_t>(), static_cast<uint4*>(x_perm.data_ptr()), T, kk, units, static_cast<int>(E));
        break;
      case 8:
        DSMOE_LAUNCH(permute_copy_kernel<uint2>, grid, kThreads, 0, stream, static_cast<const uint2*>(x.data_ptr()), map_p, offsets.data_ptr<int32_t>(), static_cast<uint2*>(x_perm.data_ptr()), T, kk, units, static_cast<int>(E));
        break;
      case 4:
        DSMOE_LAUNCH(permute_copy_kernel<uint32_t>, grid, kThreads, 0, stream, static_cast<const uint32_t*>(x.data_ptr()), map_p, offsets.data_ptr<int32_t>(), static_cast<uint32_t*>(x_perm.data_ptr()), T, kk,
            units, static_cast<int>(E));
        break;
      default:
        DSMOE_LAUNCH(permute_copy_kernel<uint16_t>, grid, kThreads, 0, stream, static_cast<const uint16_t*>(x.data_ptr()), map_p, offsets.data_ptr<int32_t>(), static_cast<uint16_t*>(x_perm.data_ptr()), T, kk,
            units, static_cast<int>(E));
        break;
    }
  }
  return {x_perm, row_map, offsets};
}

// out = the (weighted) gather-sum of src rows; weights nullptr for permute_backward.
template <typename scalar_t>
void launch_gather(const at::Tensor& src, const at::Tensor& row_map, const at::Tensor* weights,
                   at::Tensor& out, int64_t T, int64_t k, int64_t h, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* s = src.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int32_t* map = row_map.data_ptr<int32_t>();
  const acc_t* w = weights ? weights->data_ptr<acc_t>() : nullptr;
  const int64_t M = src.size(0);
  const int kk = static_cast<int>(k);
  auto go = [&](auto vec_c) {
    constexpr int V = decltype(vec_c)::value;
    const dim3 grid = grid_for(T * (h / V), kThreads);
    if (w) {
      DSMOE_LAUNCH((gather_rows_kernel<scalar_t, V, true>), grid, kThreads, 0, stream, s, map, w, o, T, kk, h, M);
    } else {
      DSMOE_LAUNCH((gather_rows_kernel<scalar_t, V, false>), grid, kThreads, 0, stream, s, map, w, o, T, kk, h, M);
    }
  };
  if (vec16_ok<scalar_t>(h, {s, o})) {
    go(std::integral_constant<int, kVec16<scalar_t>>{});
  } else {
    go(std::integral_constant<int, 1>{});
  }
}

at::ScalarType acc_dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_k_fits_int(const char* op, int64_t k) {
  TORCH_CHECK(k < (int64_t(1) << 31), "dsmoe.", op, ": k=", k, " does not fit int32");
}

at::Tensor permute_backward_cuda(const at::Tensor& grad_in, const at::Tensor& row_map_in, int64_t k) {
  check_permute_backward_args(grad_in, row_map_in, k);
  check_k_fits_int("permute_backward", k);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = grad_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const int64_t T = grad.size(0) / k, h = grad.size(1);
  auto out = at::empty({T, h}, grad.options());
  if (T == 0 || h == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "dsmoe_permute_backward_cuda", [&] {
    launch_gather<scalar_t>(grad, row_map, nullptr, out, T, k, h, stream);
  });
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y_perm_in, const at::Tensor& row_map_in,
                          const at::Tensor& weights_in) {
  check_unpermute_args("unpermute", y_perm_in, row_map_in, weights_in);
  check_k_fits_int("unpermute", weights_in.size(1));
  const c10::cuda::CUDAGuard guard(y_perm_in.device());
  const auto y_perm = y_perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const auto weights = weights_in.contiguous().to(acc_dtype_of(y_perm));
  const int64_t T = weights.size(0), k = weights.size(1), h = y_perm.size(1);
  auto out = at::empty({T, h}, y_perm.options());
  if (T == 0 || h == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "dsmoe_unpermute_cuda", [&] {
    launch_gather<scalar_t>(y_perm, row_map, &weights, out, T, k, h, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_y_in,
                                                           const at::Tensor& y_perm_in,
                                                           const at::Tensor& row_map_in,
                                                           const at::Tensor& weights_in) {
  check_unpermute_backward_args(grad_y_in, y_perm_in, row_map_in, weights_in);
  check_k_fits_int("unpermute_backward", weights_in.size(1));
  const c10::cuda::CUDAGuard guard(y_perm_in.device());
  const auto grad_y = grad_y_in.contiguous().to(y_perm_in.scalar_type());
  const auto y_perm = y_perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const auto weights = weights_in.contiguous().to(acc_dtype_of(y_perm));
  const int64_t T = weights.size(0), k = weights.size(1), h = y_perm.size(1), M = y_perm.size(0);
  auto grad_y_perm = at::empty_like(y_perm);
  auto grad_weights = at::empty({T, k}, weights.options());
  if (T > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "dsmoe_unpermute_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gy = grad_y.data_ptr<scalar_t>();
      const scalar_t* yp = y_perm.data_ptr<scalar_t>();
      scalar_t* gyp = grad_y_perm.data_ptr<scalar_t>();
      auto go = [&](auto vec_c) {
        constexpr int V = decltype(vec_c)::value;
        const int64_t nvec = h / V;
        int tpt = 32;  // threads per token: enough for one VEC per thread, at most the block
        while (tpt < kThreads && tpt < nvec) tpt *= 2;
        DSMOE_LAUNCH((unpermute_backward_kernel<scalar_t, V>), grid_for(T, kThreads / tpt), kThreads, 0, stream, gy, yp, row_map.data_ptr<int32_t>(), weights.data_ptr<acc_t>(), gyp,
            grad_weights.data_ptr<acc_t>(), T, static_cast<int>(k), h, M, tpt);
      };
      if (vec16_ok<scalar_t>(h, {gy, yp, gyp})) {
        go(std::integral_constant<int, kVec16<scalar_t>>{});
      } else {
        go(std::integral_constant<int, 1>{});
      }
    });
  }
  return {grad_y_perm, grad_weights.to(weights_in.scalar_type())};
}

}  // namespace

DSMOE_CUDA_LIBRARY_IMPL(m) {
  m.impl("permute", &permute_cuda);                        // histogram + scan + stable rank + copy
  m.impl("permute_backward", &permute_backward_cuda);      // gather-sum of a token's k rows
  m.impl("unpermute", &unpermute_cuda);                    // weighted gather-sum, fp32 accumulation
  m.impl("unpermute_backward", &unpermute_backward_cuda);  // d y_perm and d weights
}

}  // namespace dsmoe
