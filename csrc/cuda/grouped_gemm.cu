// CUDA grouped GEMM and its weight gradient: entry points, path choice, and the CUDA-core
// fallback kernels. The tensor-core paths live in grouped_gemm_sm90_*.cu (Hopper, CUTLASS 3) and
// grouped_gemm_sm80_*.cu (sm_80+, CUTLASS 2); grouped_gemm.cuh describes what they share.
//
// grouped_gemm:       c[g] = a[g] @ b[e]  (b[e] [K,N], or [N,K] with trans_b), M varies per group.
// grouped_gemm_wgrad: d b[e] = a[g]^T @ grad_c[g] ([K,N]; [N,K] with trans_b), K varies per
//                     group; fp32 accumulation; zeros for experts with no rows.
//
// Group offsets stay on the device: nothing here reads them on the host, every workspace has a
// size that depends on E (and the SM count) only, and all work goes to the current stream, so
// both ops can be captured in a CUDA graph and replayed with new routing.
//
// Path choice (per call): bf16/fp16 with 16-byte aligned rows (K and N multiples of 8) and a
// CUTLASS build -> the Hopper kernels on sm_90 when this build has an sm_90a image, else the
// sm_80 kernels on sm_80+; everything else (fp32, fp64, odd K/N, older GPUs, no CUTLASS) -> the
// CUDA-core kernels below. The settings (settings.h; dsmoe.set_backend) cuda_gemm_path=sm80|simt
// prefer a slower path where it applies (tests and benchmarks use it), cuda_gemm_tile=wide|narrow
// forces the Hopper tile (default: chosen from N), cuda_gemm_verbose=1 prints each call's choice.
//
// CUDA-core kernels: 64x64 output tiles, 256 threads with 4x4 outputs each, K in steps of 16
// through shared memory, accumulation in fp32 (fp64 for fp64). Forward tiles are numbered per
// group (a prefix sum of ceil(rows_g / 64) computed on the device); the weight gradient gives
// each block one output tile of one expert and loops over that expert's rows.
#include "cuda_utils.cuh"
#include "grouped_gemm.cuh"

#include "../check.h"
#include "../index_math.h"
#include "../op_checks.h"
#include "../settings.h"

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

namespace dsmoe {
namespace grouped_gemm_cuda {
namespace {

// ---------------------------------------------------------------- CUDA-core fallback kernels

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

// tile_starts[g] = sum over groups before g of ceil(rows_g / kTileM); tile_starts[E] = total.
// One block of 1024 threads; groups in chunks of its size with the running total carried between
// chunks (block_exclusive_scan ends with a barrier, so carry is read before it changes).
__global__ void __launch_bounds__(1024)
    tile_starts_kernel(const int32_t* offsets, int64_t rows, int64_t E, int32_t* tile_starts) {
  __shared__ int32_t scratch[32];
  int32_t carry = 0;
  for (int64_t chunk = 0; chunk < E; chunk += 1024) {
    const int64_t g = chunk + threadIdx.x;
    int32_t tiles = 0;
    if (g < E) {
      int64_t begin, end;
      group_rows(offsets, g, rows, begin, end);
      tiles = int32_t((end - begin + kTileM - 1) / kTileM);
    }
    int chunk_total;
    const int32_t before = cuda::block_exclusive_scan(tiles, scratch, chunk_total);
    if (g < E) tile_starts[g] = carry + before;
    carry += chunk_total;
  }
  if (threadIdx.x == 0) tile_starts[E] = carry;
}

// Rows of c outside [offsets[0], offsets[E]) belong to no group (ids outside [0, E) that permute
// put after the last expert, padding): zeros, so that nothing downstream reads garbage. The
// offsets are read on the device; a grid-stride loop over the rows x N elements.
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    zero_ungrouped_rows_kernel(scalar_t* __restrict__ c, const int32_t* __restrict__ offsets, int64_t rows,
                               int64_t N, int64_t E) {
  int64_t first, last;  // grouped rows [first, last)
  group_rows(offsets, 0, rows, first, last);
  int64_t unused;
  group_rows(offsets, E - 1, rows, unused, last);
  const int64_t before = first * N, after = (rows - last) * N;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < before + after; i += stride) {
    c[i < before ? i : last * N + (i - before)] = scalar_t(0);
  }
}

// Multiply-accumulate of one kTileK step: acc[i][j] += As[k][ty + 16 i] * Bs[k][tx + 16 j].
template <typename acc_t>
__device__ __forceinline__ void mma_tile(const acc_t (*As)[kTileM + 1],
                                         const acc_t (*Bs)[kTileN + 1], int ty, int tx,
                                         acc_t (&acc)[4][4]) {
#pragma unroll
  for (int k = 0; k < kTileK; ++k) {
    acc_t av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = As[k][ty + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = Bs[k][tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
  }
}

// Forward: grid.x = tile slots (>= total tiles), grid.y = column tiles.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    simt_forward_kernel(const scalar_t* __restrict__ a,  // [rows, K]
                        const scalar_t* __restrict__ b,  // [E, K, N] or [E, N, K]
                        scalar_t* __restrict__ c,        // [rows, N]
                        const int32_t* __restrict__ offsets,      // [E+1]
                        const int32_t* __restrict__ tile_starts,  // [E+1]
                        int64_t rows, int64_t K, int64_t N, int64_t E, bool b_k_major) {
  __shared__ acc_t As[kTileK][kTileM + 1];
  __shared__ acc_t Bs[kTileK][kTileN + 1];
  const int32_t tile = int32_t(blockIdx.x);
  if (tile >= tile_starts[E]) return;
  // The group owning this tile: the last g with tile_starts[g] <= tile (empty groups share
  // their start with the next group, so the last one is the group that has tiles).
  int64_t lo = 0, hi = E - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_starts[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  const int64_t g = lo;
  int64_t begin, end;
  group_rows(offsets, g, rows, begin, end);
  const int64_t row0 = begin + int64_t(tile - tile_starts[g]) * kTileM;
  const int64_t col0 = int64_t(blockIdx.y) * kTileN;
  const scalar_t* bg = b + g * K * N;

  const int t = threadIdx.x, ty = t / 16, tx = t % 16;
  acc_t acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int e = t + kThreads * q;
      {  // A tile: 64 rows x 16 k, consecutive threads along k
        const int r = e / kTileK, kk = e % kTileK;
        const int64_t row = row0 + r, k = k0 + kk;
        As[kk][r] = (row < end && k < K) ? acc_t(a[row * K + k]) : acc_t(0);
      }
      if (b_k_major) {  // B stored [N, K]: consecutive threads along k
        const int n = e / kTileK, kk = e % kTileK;
        const int64_t col = col0 + n, k = k0 + kk;
        Bs[kk][n] = (col < N && k < K) ? acc_t(bg[col * K + k]) : acc_t(0);
      } else {  // B stored [K, N]: consecutive threads along n
        const int kk = e / kTileN, n = e % kTileN;
        const int64_t col = col0 + n, k = k0 + kk;
        Bs[kk][n] = (col < N && k < K) ? acc_t(bg[k * N + col]) : acc_t(0);
      }
    }
    __syncthreads();
    mma_tile<acc_t>(As, Bs, ty, tx, acc);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col < N) c[row * N + col] = scalar_t(acc[i][j]);
    }
  }
}

// Weight gradient: out[g] [M, N] = x[rows of g]^T @ y[rows of g], x [rows, M], y [rows, N].
// grid.x = output tiles of one expert, grid.y strides over experts. Empty experts get zeros.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    simt_wgrad_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                      scalar_t* __restrict__ out,  // [E, M, N]
                      const int32_t* __restrict__ offsets, int64_t rows, int64_t M, int64_t N,
                      int64_t E) {
  __shared__ acc_t Xs[kTileK][kTileM + 1];
  __shared__ acc_t Ys[kTileK][kTileN + 1];
  const int64_t tiles_n = (N + kTileN - 1) / kTileN;
  const int64_t m0 = int64_t(blockIdx.x) / tiles_n * kTileM;
  const int64_t n0 = int64_t(blockIdx.x) % tiles_n * kTileN;
  const int t = threadIdx.x, ty = t / 16, tx = t % 16;
  for (int64_t g = blockIdx.y; g < E; g += gridDim.y) {
    int64_t begin, end;
    group_rows(offsets, g, rows, begin, end);
    acc_t acc[4][4] = {};
    for (int64_t r0 = begin; r0 < end; r0 += kTileK) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int e = t + kThreads * q;
        const int kk = e / kTileM, i = e % kTileM;  // consecutive threads along the columns
        const int64_t r = r0 + kk;
        Xs[kk][i] = (r < end && m0 + i < M) ? acc_t(x[r * M + m0 + i]) : acc_t(0);
        Ys[kk][i] = (r < end && n0 + i < N) ? acc_t(y[r * N + n0 + i]) : acc_t(0);
      }
      __syncthreads();
      mma_tile<acc_t>(Xs, Ys, ty, tx, acc);
      __syncthreads();
    }
    scalar_t* og = out + g * M * N;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m >= M) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (n < N) og[m * N + n] = scalar_t(acc[i][j]);
      }
    }
  }
}

// Zeroes out[g] ([group_bytes] bytes each) for every expert g with no rows; the tensor-core
// paths compute only the others. 16-byte stores when every group starts 16-byte aligned.
__global__ void zero_empty_groups_kernel(uint8_t* out, int64_t group_bytes,
                                         const int32_t* offsets, int64_t rows, int64_t E) {
  for (int64_t g = blockIdx.y; g < E; g += gridDim.y) {
    int64_t begin, end;
    group_rows(offsets, g, rows, begin, end);
    if (end > begin) continue;
    uint8_t* base = out + g * group_bytes;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (group_bytes % 16 == 0) {
      uint4* v = reinterpret_cast<uint4*>(base);
      for (int64_t i = first; i < group_bytes / 16; i += stride) v[i] = make_uint4(0, 0, 0, 0);
    } else {
      for (int64_t i = first; i < group_bytes; i += stride) base[i] = 0;
    }
  }
}

// ---------------------------------------------------------------- path choice

enum class Path { kSm90, kSm80, kSimt };

#if defined(DSMOE_WITH_CUTLASS)
// Marks which image of this file the device loaded: only the sm_90a one has an 8 KB shared
// array (far above the 1 KB some tools count as reserved), which cudaFuncGetAttributes reports
// without running anything. Never launched.
constexpr int kProbeInts = 2048;
__global__ void sm90a_probe_kernel(int* sink) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ int marker[kProbeInts];
  marker[threadIdx.x % kProbeInts] = int(threadIdx.x);
  __syncthreads();
  if (sink != nullptr) sink[threadIdx.x] = marker[(threadIdx.x + 1) % kProbeInts];
#else
  if (sink != nullptr) sink[threadIdx.x] = 0;
#endif
}

bool has_sm90a_image(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, bool> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, sm90a_probe_kernel);
  bool yes = false;
  if (err == cudaSuccess) {
    yes = attr.binaryVersion == 90 && attr.sharedSizeBytes >= kProbeInts * sizeof(int);
  } else {
    (void)cudaGetLastError();  // no image for this device: clear the error, use another path
  }
  cache.emplace(device, yes);
  return yes;
}
#endif  // DSMOE_WITH_CUTLASS

Path choose_path(const Problem& p, at::ScalarType dtype) {
  const CudaGemmPath preferred = cuda_gemm_path_setting();
  if (preferred == CudaGemmPath::kSimt) return Path::kSimt;
#ifdef DSMOE_WITH_CUTLASS
  const bool tensor_cores =
      (dtype == at::kBFloat16 || dtype == at::kHalf) && rows_16b_aligned(p);
  if (!tensor_cores) return Path::kSimt;
  const auto* props = at::cuda::getDeviceProperties(p.device.index());
  const bool sm80 = props->major >= 8;
  const bool sm90 = props->major == 9 && has_sm90a_image(p.device.index());
  if (preferred == CudaGemmPath::kSm80 && sm80) return Path::kSm80;
  if (sm90) return Path::kSm90;
  if (sm80) return Path::kSm80;
#else
  (void)p;
  (void)dtype;
#endif
  return Path::kSimt;
}

Tile preferred_tile() {
  switch (cuda_gemm_tile_setting()) {
    case CudaGemmTile::kWide:
      return Tile::kWide;
    case CudaGemmTile::kNarrow:
      return Tile::kNarrow;
    default:
      return Tile::kAuto;
  }
}

// The cuda_gemm_verbose setting (DSMOE_GROUPED_GEMM_VERBOSE=1) prints the path of every call on
// stderr (tests check dispatch).
void report(const char* op, Path path, const Problem& p) {
  if (!cuda_gemm_verbose_setting()) return;
  const char* name = path == Path::kSm90 ? "sm90" : path == Path::kSm80 ? "sm80" : "simt";
  const char* tile = "-";
  if (path == Path::kSm90) tile = pick_tile(p, preferred_tile()) == Tile::kWide ? "wide" : "narrow";
  std::fprintf(stderr, "dsmoe.%s: path=%s tile=%s E=%lld rows=%lld M=%lld N=%lld K=%lld\n", op,
               name, tile, static_cast<long long>(p.E), static_cast<long long>(p.rows),
               static_cast<long long>(p.M), static_cast<long long>(p.N),
               static_cast<long long>(p.K));
}

void run_tensor_cores(Path path, const Problem& p, at::ScalarType dtype) {
#if defined(DSMOE_SIMT)
  // The emulator has no tensor cores; choose_path never picks them without CUTLASS.
  (void)path;
  (void)p;
  (void)dtype;
  TORCH_CHECK(false, "dsmoe.grouped_gemm: no tensor-core path in the SIMT emulator");
#else
  const bool bf16 = dtype == at::kBFloat16;
  if (path == Path::kSm90) {
    const Tile tile = preferred_tile();
    if (p.shape == Shape::kVariableM) {
      if (bf16) sm90_forward_bf16(p, tile); else sm90_forward_fp16(p, tile);
    } else {
      if (bf16) sm90_wgrad_bf16(p, tile); else sm90_wgrad_fp16(p, tile);
    }
  } else {
    if (bf16) sm80_run_bf16(p); else sm80_run_fp16(p);
  }
#endif
}

int64_t grid_rows_limit() { return (int64_t(1) << 31) - 1; }

// ---------------------------------------------------------------- entry points

at::Tensor grouped_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                             const at::Tensor& offsets_in, bool trans_b) {
  check_grouped_gemm_args(a_in, b_in, offsets_in, trans_b);
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const int64_t rows = a.size(0), K = a.size(1), E = b.size(0);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  auto c = at::empty({rows, N}, a.options());
  if (rows == 0 || N == 0) return c;
  if (K == 0) return c.zero_();

  const c10::cuda::CUDAGuard guard(a.device());
  Problem p;
  p.shape = Shape::kVariableM;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.d = c.data_ptr();
  p.offsets = offsets.data_ptr<int32_t>();
  p.rows = rows;
  p.N = N;
  p.K = K;
  p.E = E;
  p.b_k_major = trans_b;
  p.device = a.device();
  p.stream = at::cuda::getCurrentCUDAStream();
  p.sm_count = at::cuda::getDeviceProperties(a.device().index())->multiProcessorCount;

  const Path path = choose_path(p, a.scalar_type());
  report("grouped_gemm", path, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "dsmoe_grouped_gemm_zero", [&] {
    const int64_t blocks = std::min<int64_t>((rows * N + 255) / 256, int64_t(p.sm_count) * 2);
    DSMOE_LAUNCH(zero_ungrouped_rows_kernel<scalar_t>, static_cast<unsigned>(std::max<int64_t>(blocks, 1)), 256, 0,
                 p.stream, c.data_ptr<scalar_t>(), p.offsets, rows, N, E);
  });
  if (path != Path::kSimt) {
    run_tensor_cores(path, p, a.scalar_type());
    return c;
  }

  const int64_t slots = (rows + kTileM - 1) / kTileM + E;
  const int64_t col_tiles = (N + kTileN - 1) / kTileN;
  TORCH_CHECK(slots <= grid_rows_limit() && col_tiles <= 65535,
              "dsmoe.grouped_gemm (CUDA): problem too large for the CUDA-core kernel (rows=", rows,
              ", N=", N, ")");
  auto tile_starts = at::empty({E + 1}, offsets.options());
  DSMOE_LAUNCH(tile_starts_kernel, 1, 1024, 0, p.stream, p.offsets, rows, E, tile_starts.data_ptr<int32_t>());
  const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(col_tiles));
  const auto dtype = a.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dsmoe_grouped_gemm", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    DSMOE_LAUNCH((simt_forward_kernel<scalar_t, acc_t>), grid, kThreads, 0, p.stream, a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), p.offsets,
        tile_starts.data_ptr<int32_t>(), rows, K, N, E, trans_b);
  });
  return c;
}

at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& a_in, const at::Tensor& grad_c_in,
                                   const at::Tensor& offsets_in, bool trans_b) {
  check_grouped_gemm_wgrad_args(a_in, grad_c_in, offsets_in);
  const auto a = a_in.contiguous();
  const auto grad_c = grad_c_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const int64_t rows = a.size(0), K = a.size(1), N = grad_c.size(1);
  const int64_t E = offsets.size(0) - 1;
  auto out = trans_b ? at::empty({E, N, K}, a.options()) : at::empty({E, K, N}, a.options());
  if (out.numel() == 0) return out;
  if (rows == 0) return out.zero_();

  const c10::cuda::CUDAGuard guard(a.device());
  // out[e] = x^T @ y over the expert's rows: x = a, y = grad_c ([K,N]); swapped with trans_b.
  const at::Tensor& x = trans_b ? grad_c : a;
  const at::Tensor& y = trans_b ? a : grad_c;
  Problem p;
  p.shape = Shape::kVariableK;
  p.a = x.data_ptr();
  p.b = y.data_ptr();
  p.d = out.data_ptr();
  p.offsets = offsets.data_ptr<int32_t>();
  p.rows = rows;
  p.M = x.size(1);
  p.N = y.size(1);
  p.E = E;
  p.device = a.device();
  p.stream = at::cuda::getCurrentCUDAStream();
  p.sm_count = at::cuda::getDeviceProperties(a.device().index())->multiProcessorCount;

  const int64_t experts_per_launch = std::min<int64_t>(E, 65535);
  const Path path = choose_path(p, a.scalar_type());
  report("grouped_gemm_wgrad", path, p);
  if (path != Path::kSimt) {
    const int64_t group_bytes = p.M * p.N * int64_t(out.element_size());
    const int64_t chunks = std::min<int64_t>((group_bytes / 16 + 255) / 256 + 1, 1024);
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(experts_per_launch));
    DSMOE_LAUNCH(zero_empty_groups_kernel, grid, 256, 0, p.stream, static_cast<uint8_t*>(p.d), group_bytes, p.offsets, rows, E);
    run_tensor_cores(path, p, a.scalar_type());
    return out;
  }

  const int64_t tiles = ((p.M + kTileM - 1) / kTileM) * ((p.N + kTileN - 1) / kTileN);
  TORCH_CHECK(tiles <= grid_rows_limit(), "dsmoe.grouped_gemm_wgrad (CUDA): output of ", p.M, "x",
              p.N, " per expert is too large for the CUDA-core kernel");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(experts_per_launch));
  const auto dtype = a.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dsmoe_grouped_gemm_wgrad", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    DSMOE_LAUNCH((simt_wgrad_kernel<scalar_t, acc_t>), grid, kThreads, 0, p.stream, x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), p.offsets, rows,
        p.M, p.N, E);
  });
  return out;
}

}  // namespace
}  // namespace grouped_gemm_cuda

DSMOE_CUDA_LIBRARY_IMPL(m) {
  // c[g] = a[g] @ b[e] per expert row group; offsets read on the device only.
  m.impl("grouped_gemm", &grouped_gemm_cuda::grouped_gemm_cuda);
  // Per-expert a[g]^T @ grad_c[g] (variable K), fp32 accumulation, zeros for empty experts.
  m.impl("grouped_gemm_wgrad", &grouped_gemm_cuda::grouped_gemm_wgrad_cuda);
}

}  // namespace dsmoe
