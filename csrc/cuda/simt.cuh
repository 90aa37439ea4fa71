// SIMT execution layer: lets dsmoe's CUDA kernel sources run on the CPU, unchanged, so CI (no GPU)
// executes them. Included by every .cu file (through cuda_utils.cuh). Two builds:
//
//  * nvcc (__CUDACC__): only the launch helper's prototype needs are met here; CUDA supplies the
//    rest. Nothing below the #else is compiled.
//  * a C++ compiler with DSMOE_SIMT (the emulator build, tools/simt_build.py): this header supplies
//    what the kernels use -- threadIdx/blockIdx/blockDim/gridDim, __shared__ (static: one buffer
//    per block, because a block's threads all run on one OS thread; dynamic: DSMOE_DYNAMIC_SHARED,
//    a per-block buffer poisoned with 0xff at the block's start), __syncthreads, __syncwarp, the
//    warp shuffles, __match_any_sync, __ballot_sync, __any_sync/__all_sync, __popc, __ffs, the lane
//    masks, atomics, __expf, min/max, dim3 and the uint2/uint4 vector types.
//
// Execution model (simt_runtime.cpp): a block's threads are fibers (own stacks, cooperative
// switches) on one OS thread; blocks are spread over a few worker threads. A fiber runs until it
// reaches a barrier or a warp intrinsic; when every fiber is waiting, the scheduler resolves the
// warp intrinsics whose mask lanes have all arrived (same intrinsic, same mask, same source line),
// then the block barrier (every thread of the block at the same __syncthreads). Anything else is a
// divergence bug and is reported as an error naming the kernel, the block, the intrinsic, its
// source line and the lanes that did not arrive -- never a hang. Fibers run in increasing (or, with
// schedule "reverse", decreasing) thread order, so a missing barrier changes results between the
// two orders; under ThreadSanitizer each barrier is a release/acquire and fibers switch without
// synchronising, so TSan reports a shared-memory read that no barrier orders after the write.
// 16-byte vector accesses check their alignment. The launch checks CUDA's limits (block size and
// shape, grid size, dynamic shared memory against the kernel's limit) and raises with the name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#if !defined(__CUDACC__)

#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>

#ifndef DSMOE_SIMT
#define DSMOE_SIMT 1
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)

namespace dsmoe {
namespace simt {

// What the running fiber is. Valid only inside a kernel.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned lane_id();
void* dynamic_shared();

enum class WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kMatchAny, kAny, kAll, kSyncWarp };

// Barrier over the block; warp collective over the lanes of mask. value: the lane's operand (up
// to 8 bytes), arg: srcLane / delta / laneMask, width: the shuffle's segment. Returns the lane's
// result bits.
void syncthreads(const char* file, int line);
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int value_bytes, int arg, int width,
                         const char* file, int line);
// Raises a kernel fault (misaligned access, bad argument): the launch fails with this message.
[[noreturn]] void fault(const char* what, const char* file, int line);

// Kernel launch: runs body once per thread of every block; throws std::runtime_error naming
// `name` on a launch-limit violation or a fault/divergence inside the kernel.
void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem, const void* kernel_id,
            const std::function<void()>& body);
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) for the emulator; 48 KiB when never set.
void set_max_dynamic_smem(const void* kernel_id, size_t bytes);
// Fiber order within a block: false = increasing thread index, true = decreasing.
void set_reverse_schedule(bool reverse);
bool reverse_schedule();
// Worker threads for blocks (default: DSMOE_SIMT_WORKERS or min(4, cores)).
void set_workers(int workers);
// Launches and blocks executed since the process started (CI prints them).
int64_t launch_count();
int64_t block_count();

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp intrinsics move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace simt
}  // namespace dsmoe

#define threadIdx (::dsmoe::simt::thread_idx())
#define blockIdx (::dsmoe::simt::block_idx())
#define blockDim (::dsmoe::simt::block_dim())
#define gridDim (::dsmoe::simt::grid_dim())
#define warpSize 32

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::dsmoe::simt::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::dsmoe::simt::warp_collective(::dsmoe::simt::WarpOp::kSyncWarp, mask, 0, 0, 0, 32, file, line);
}

#define DSMOE_SIMT_SHFL(fn, op)                                                                          \
  template <typename T>                                                                                  \
  inline T fn(unsigned mask, T var, int arg, int width = 32, const char* file = __builtin_FILE(),       \
              int line = __builtin_LINE()) {                                                             \
    return ::dsmoe::simt::from_bits<T>(::dsmoe::simt::warp_collective(                                  \
        ::dsmoe::simt::WarpOp::op, mask, ::dsmoe::simt::to_bits(var), sizeof(T), arg, width, file, line)); \
  }
DSMOE_SIMT_SHFL(__shfl_sync, kShflIdx)
DSMOE_SIMT_SHFL(__shfl_up_sync, kShflUp)
DSMOE_SIMT_SHFL(__shfl_down_sync, kShflDown)
DSMOE_SIMT_SHFL(__shfl_xor_sync, kShflXor)
#undef DSMOE_SIMT_SHFL

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return unsigned(::dsmoe::simt::warp_collective(::dsmoe::simt::WarpOp::kBallot, mask, pred != 0, 4, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return int(::dsmoe::simt::warp_collective(::dsmoe::simt::WarpOp::kAny, mask, pred != 0, 4, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return int(::dsmoe::simt::warp_collective(::dsmoe::simt::WarpOp::kAll, mask, pred != 0, 4, 0, 32, file, line));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return unsigned(::dsmoe::simt::warp_collective(::dsmoe::simt::WarpOp::kMatchAny, mask,
                                                 ::dsmoe::simt::to_bits(value), sizeof(T), 0, 32, file, line));
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

// CUDA's integer/float min and max overloads (mixed argument types promote as on the device).
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return C(a) < C(b) ? C(b) : C(a);
}

// Atomics: real atomics, since blocks run on several OS threads at once.
template <typename T>
inline T atomicAdd(T* address, T val) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
  } else {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(address, &old, T(old + val), true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
  }
}
template <typename T>
inline T atomicMax(T* address, T val) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < val && !__atomic_compare_exchange_n(address, &old, val, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* address, T val) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (val < old && !__atomic_compare_exchange_n(address, &old, val, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicExch(T* address, T val) {
  return __atomic_exchange_n(address, val, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicCAS(T* address, T compare, T val) {
  __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}

// Dynamic shared memory of the block (the launch's dynamic_smem bytes, 16-byte aligned).
#define DSMOE_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::dsmoe::simt::dynamic_shared())

#else  // __CUDACC__

#define DSMOE_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]

#endif  // __CUDACC__

namespace dsmoe {
namespace simt {

// CUDA's launch limits: what is wrong with this configuration, or "" when it may launch. One
// check for the device build (before <<<>>>) and the emulator.
inline std::string launch_config_error(dim3 grid, dim3 block, size_t dynamic_smem, size_t smem_limit) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || threads > 1024 || block.z > 64) {
    return "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) +
           ") exceeds CUDA's limits (1..1024 threads, z <= 64)";
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    return "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
           ") exceeds CUDA's limits (x in 1..2^31-1, y and z in 1..65535)";
  }
  if (dynamic_smem > smem_limit) {
    return std::to_string(dynamic_smem) + " bytes of dynamic shared memory exceed the kernel's limit of " +
           std::to_string(smem_limit) + " (cudaFuncSetAttribute raises it)";
  }
  return "";
}
constexpr size_t kDefaultDynamicSmemLimit = 48 << 10;

// Checks a vector access of `bytes` bytes at p for its natural alignment: a fault in the
// emulator (the GPU would raise a misaligned-address error), nothing on the device.
#if defined(__CUDACC__)
__device__ __forceinline__ void check_aligned(const void*, int) {}
#else
inline void check_aligned(const void* p, int bytes, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  if (bytes > 1 && reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) != 0) {
    fault(bytes == 16 ? "misaligned 16-byte vector access" : "misaligned vector access", file, line);
  }
}
#endif

}  // namespace simt
}  // namespace dsmoe
