// Helpers shared by the memory-bound CUDA kernels of dsmoe (gate.cu, permute.cu, swiglu.cu):
// aligned vector accesses, fixed-order (deterministic) warp and block reductions, launch sizes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>

namespace dsmoe {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// N elements of T read or written as one access: 16 bytes when N * sizeof(T) == 16.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The plain integer type of B bytes; accesses go through it so that a Vec of c10::BFloat16 or
// c10::Half is moved by one instruction (as a struct copy, nvcc splits the store into pieces).
template <int B>
struct RawBits;
template <>
struct RawBits<16> { using type = uint4; };
template <>
struct RawBits<8> { using type = uint2; };
template <>
struct RawBits<4> { using type = uint32_t; };
template <>
struct RawBits<2> { using type = uint16_t; };

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  using Raw = typename RawBits<sizeof(Vec<T, N>)>::type;
  const Raw raw = *reinterpret_cast<const Raw*>(p);
  Vec<T, N> v;
  memcpy(&v, &raw, sizeof(v));
  return v;
}

// Stores to global memory. The 16- and 8-byte ones are written in PTX: from plain C++ the
// compiler splits them into 4-byte stores (seen with nvcc 13.0 for Vecs built element by element).
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  constexpr int kBytes = sizeof(Vec<T, N>);
  if constexpr (kBytes == 16) {
    uint32_t w[4];
    memcpy(w, &v, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]),
                 "r"(w[3]));
  } else if constexpr (kBytes == 8) {
    uint32_t w[2];
    memcpy(w, &v, 8);
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]));
  } else {
    using Raw = typename RawBits<kBytes>::type;
    Raw raw;
    memcpy(&raw, &v, sizeof(v));
    *reinterpret_cast<Raw*>(p) = raw;
  }
}

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
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
