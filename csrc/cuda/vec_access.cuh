// Vector accesses of the CUDA kernels: N elements moved as one 2-, 4-, 8- or 16-byte access.
// Needs no torch (the emulator's harness tests use it alone); in the SIMT emulator every access
// checks its alignment, as the GPU faults on a misaligned one.
#pragma once

#include <cstdint>
#include <cstring>

#include "simt.cuh"

namespace dsmoe {
namespace cuda {

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
  simt::check_aligned(p, int(sizeof(Raw)));
  const Raw raw = *reinterpret_cast<const Raw*>(p);
  Vec<T, N> v;
  memcpy(&v, &raw, sizeof(v));
  return v;
}

// Stores to global memory. On the GPU the 16- and 8-byte ones are written in PTX: from plain C++
// the compiler splits them into 4-byte stores (seen with nvcc 13.0 for Vecs built element by
// element). The "memory" clobber keeps the compiler from moving other accesses across them.
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  constexpr int kBytes = sizeof(Vec<T, N>);
  simt::check_aligned(p, kBytes);
#if defined(__CUDACC__)
  if constexpr (kBytes == 16) {
    uint32_t w[4];
    memcpy(w, &v, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]),
                 "r"(w[3])
                 : "memory");
    return;
  } else if constexpr (kBytes == 8) {
    uint32_t w[2];
    memcpy(w, &v, 8);
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]) : "memory");
    return;
  }
#endif
  using Raw = typename RawBits<kBytes>::type;
  Raw raw;
  memcpy(&raw, &v, sizeof(v));
  *reinterpret_cast<Raw*>(p) = raw;
}

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace cuda
}  // namespace dsmoe
