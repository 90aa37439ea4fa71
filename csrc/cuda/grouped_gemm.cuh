// Grouped GEMM on CUDA: what the entry points in grouped_gemm.cu share with the tensor-core paths
// in grouped_gemm_sm90_*.cu (CUTLASS 3, Hopper) and grouped_gemm_sm80_*.cu (CUTLASS 2, sm_80+).
//
// Every path takes the same GEMM-level description: E groups, one of the three GEMM dimensions
// varying per group and read from expert_offsets on the device (never on the host), the other
// two fixed. Problem shapes, pointers and strides of each group are written by a small device
// kernel into a workspace whose size depends on E only, so every launch is CUDA-graph
// capturable and needs no device-to-host copy. Groups with no rows get a zero extent and no
// tiles.
#pragma once

#include <ATen/ATen.h>
#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace dsmoe {
namespace grouped_gemm_cuda {

// The two shapes of grouped GEMM that the ops need. Row-major everywhere unless said otherwise.
//  kVariableM (forward, dgrad): for group g with rows [begin, end) of expert_offsets,
//    D[begin:end, :N] = A[begin:end, :K] @ B[g], where B[g] is [K,N] (b_k_major false) or is
//    stored [N,K] (b_k_major true: nn.Linear weights); A is [rows, K], B [E, ...], D [rows, N].
//  kVariableK (wgrad): D[g] ([M,N]) = A[begin:end, :M]^T @ B[begin:end, :N], with A [rows, M],
//    B [rows, N] and D [E, M, N]. Groups with no rows are left untouched (the caller zeroes them).
enum class Shape { kVariableM, kVariableK };

// Tile preference of the tensor-core paths. kAuto picks per problem (see pick_tile()).
enum class Tile { kAuto, kWide, kNarrow };

struct Problem {
  Shape shape = Shape::kVariableM;
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  const int32_t* offsets = nullptr;  // [E+1] int32 on the device
  int64_t rows = 0;                  // rows of A (and of D or B): expert_offsets[E] when valid
  int64_t M = 0;                     // kVariableK only (kVariableM: per group)
  int64_t N = 0;
  int64_t K = 0;                     // kVariableM only (kVariableK: per group)
  int64_t E = 0;
  bool b_k_major = false;            // kVariableM only
  c10::Device device = c10::Device(c10::kCUDA, 0);
  cudaStream_t stream = nullptr;
  int sm_count = 0;
};

// The wide tile (128x256 on Hopper) wastes a large share of its columns when N is just over a
// multiple of 256 (N = 352: 512 computed for 352 kept); the narrow one (128x128) then wins.
inline Tile pick_tile(const Problem& p, Tile preference) {
  if (preference != Tile::kAuto) return preference;
  const int64_t wide = (p.N + 255) / 256 * 256, narrow = (p.N + 127) / 128 * 128;
  // Prefer the wide tile (twice the operand reuse) unless it computes >= 12% more columns.
  return wide * 100 >= narrow * 112 ? Tile::kNarrow : Tile::kWide;
}

// Both tensor-core paths need 16-byte aligned rows and base pointers (TMA on Hopper, 128-bit
// cp.async on sm_80): every fixed dimension a multiple of 8 elements of 16 bits.
inline bool rows_16b_aligned(const Problem& p) {
  const auto ok_ptr = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool dims = p.shape == Shape::kVariableM ? (p.K % 8 == 0 && p.N % 8 == 0)
                                                 : (p.M % 8 == 0 && p.N % 8 == 0);
  return dims && ok_ptr(p.a) && ok_ptr(p.b) && ok_ptr(p.d);
}

// Hopper path (CUTLASS 3 ptr-array grouped GEMM, TMA + wgmma, warp-specialised persistent
// kernels). Defined when built with CUTLASS; runs only on sm_90 with an sm_90a image.
// grouped_gemm_sm90_{bf16,fp16}.cu: kVariableM; grouped_gemm_sm90_wgrad_{bf16,fp16}.cu: kVariableK.
void sm90_forward_bf16(const Problem& p, Tile tile);
void sm90_forward_fp16(const Problem& p, Tile tile);
void sm90_wgrad_bf16(const Problem& p, Tile tile);
void sm90_wgrad_fp16(const Problem& p, Tile tile);

// Portable tensor-core path (CUTLASS 2 GemmGrouped, mma.sync + cp.async, device-side problem
// visitor) for sm_80 and newer. Defined when built with CUTLASS.
void sm80_run_bf16(const Problem& p);
void sm80_run_fp16(const Problem& p);

// Bytes of device memory for E groups of per-group arguments, each array 16-byte aligned.
inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

}  // namespace grouped_gemm_cuda
}  // namespace dsmoe
