// Helpers shared by the CUDA kernels of dsmoe (gate.cu, permute.cu, swiglu.cu, grouped_gemm.cu):
// aligned vector accesses, fixed-order (deterministic) warp and block reductions, launch sizes,
// the one launch function, and the registration macro.
//
// The same sources build for the GPU (nvcc) and for the SIMT emulator (a C++ compiler with
// DSMOE_SIMT; see simt.cuh): in the emulator build the few host-side CUDA names the entry points
// use (CUDAGuard, the current stream, device properties, the launch check) are stand-ins, tensors
// live on the CPU, and the kernels register as the CPU kernels of the `dsmoe_simt` op namespace
// (same schemas as `dsmoe`, csrc/registration.cpp), so tests call torch.ops.dsmoe_simt.*.
#pragma once

#include <ATen/ATen.h>

#if defined(__CUDACC__)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <tuple>
#include <type_traits>
#include <utility>

#include "simt.cuh"
#include "vec_access.cuh"

#if !defined(__CUDACC__)
// Host-side stand-ins for the emulator build (CPU tensors, synchronous launches).
using cudaStream_t = struct CUstream_st*;
struct cudaDeviceProp {
  int multiProcessorCount;
  int major;
  int minor;
};
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
namespace at {
namespace cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
// An H100 SXM unless DSMOE_SIMT_SM_COUNT says otherwise: the host code sizes grids from it.
inline const cudaDeviceProp* getDeviceProperties(int64_t) {
  static const cudaDeviceProp props = [] {
    const char* env = std::getenv("DSMOE_SIMT_SM_COUNT");
    return cudaDeviceProp{env != nullptr ? std::atoi(env) : 132, 9, 0};
  }();
  return &props;
}
inline const cudaDeviceProp* getCurrentDeviceProperties() { return getDeviceProperties(0); }
}  // namespace cuda
}  // namespace at
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define DSMOE_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(dsmoe_simt, CPU, m)
#else
#define DSMOE_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(dsmoe, CUDA, m)
#endif

namespace dsmoe {
namespace cuda {

// Launches kernel<<<grid, block, dynamic_smem, stream>>>(args...) after checking CUDA's launch
// limits (an error naming the kernel instead of a launch failure), then checks the launch. In the
// emulator build the kernel runs on the CPU before this returns. Call through DSMOE_LAUNCH.
template <typename... KArgs, typename... Args>
void launch_kernel(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dynamic_smem,
                   cudaStream_t stream, Args&&... args) {
#if defined(__CUDACC__)
  size_t limit = simt::kDefaultDynamicSmemLimit;
  if (dynamic_smem > limit) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    limit = size_t(attr.maxDynamicSharedSizeBytes);
  }
  const std::string error = simt::launch_config_error(grid, block, dynamic_smem, limit);
  TORCH_CHECK(error.empty(), "dsmoe: launch of ", name, ": ", error);
  kernel<<<grid, block, dynamic_smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  (void)stream;
  std::tuple<KArgs...> params(std::forward<Args>(args)...);  // converted as a launch converts them
  try {
    simt::launch(name, grid, block, dynamic_smem, reinterpret_cast<const void*>(kernel),
                 [&] { std::apply(kernel, params); });
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "dsmoe SIMT: ", e.what());
  }
#endif
}

// DSMOE_LAUNCH(kernel, grid, block, dynamic_smem, stream, args...); a kernel name holding commas
// goes in parentheses: DSMOE_LAUNCH((k<a, b>), ...).
#define DSMOE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::dsmoe::cuda::launch_kernel(#kernel, kernel, grid, block, smem, stream, __VA_ARGS__)

constexpr unsigned kFullMask = 0xffffffffu;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// exp in the accumulation type (the fp32 one becomes the fast intrinsic under --use_fast_math).
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// max that ignores a NaN operand, as std::max(running, x) does on the CPU when x is NaN.
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

// Sum / max over aligned groups of `width` lanes (a power of two <= 32) with a fixed xor
// butterfly: every lane of a group gets the same value, identical from run to run (a + b and
// b + a round the same, so the two halves of each pair agree bit for bit).
template <int width, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int o = width / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <int width, typename T>
__device__ __forceinline__ T group_max(T v) {
#pragma unroll
  for (int o = width / 2; o > 0; o /= 2) v = max_acc(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Lanes of the warp below the calling lane (PTX %lanemask_lt).
__device__ __forceinline__ unsigned lanemask_lt() {
#if defined(DSMOE_SIMT)
  return (1u << simt::lane_id()) - 1u;
#else
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
#endif
}

// Exclusive prefix sum of one int per thread across the block (blockDim.x a multiple of 32, at
// most 1024); `total` receives the block's sum. `scratch` holds 32 ints of shared memory. Every
// thread of the block must call it; it ends with a barrier, so scratch can be reused at once.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += y;
    }
    scratch[lane] = w;  // inclusive prefix over warps
  }
  __syncthreads();
  const int before = warp > 0 ? scratch[warp - 1] : 0;
  total = scratch[nwarps - 1];
  __syncthreads();
  return before + x - v;
}

// Grid of 1-D blocks that gives every index of [0, n) its own thread.
inline dim3 grid_for(int64_t n, int threads) {
  const int64_t blocks = ceil_div(n, threads);
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "dsmoe: launch of ", n, " threads is too large");
  return dim3(static_cast<unsigned>(blocks > 0 ? blocks : 1));
}

}  // namespace cuda
}  // namespace dsmoe
