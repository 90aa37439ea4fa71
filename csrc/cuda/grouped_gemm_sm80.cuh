// Portable tensor-core grouped GEMM (sm_80 and newer): CUTLASS 2 GemmGrouped, included by one
// .cu per element type.
//
// Algorithm: the same setup kernel idea as the Hopper path (one thread per group writes its
// problem size, pointers and leading dimensions from expert_offsets on the device), then one
// persistent launch of CUTLASS's grouped kernel with the device-only problem visitor: each CTA
// walks the groups' tile counts with a warp-wide prefix sum to find its next tile, so the host
// never sees a group size. Mainloop: 128x128x32 CTA tiles, 64x64 warp tiles, mma.sync m16n8k16
// (bf16/fp16 in, fp32 accumulate), 4-stage cp.async pipeline; K residues are zero-filled.
// Empty groups have M = 0 and no tiles (the weight gradient too: its K = rows of the group would
// otherwise be 0 with nothing to clear the output; the caller zeroes those experts).
//
// Limits: 16-byte aligned rows and base pointers (8 elements), checked by the caller.
#pragma once

#include "grouped_gemm.cuh"

#include "../index_math.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#ifdef DSMOE_WITH_CUTLASS

#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>

#include <mutex>
#include <unordered_map>

namespace dsmoe {
namespace grouped_gemm_cuda {
namespace sm80 {

template <class T, class LayoutA, class LayoutB>
struct GroupedGemm {
  static constexpr int kAlign = 16 / sizeof(T);
  using Epilogue = cutlass::epilogue::thread::LinearCombination<
      T, kAlign, float, float, cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling>;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      T, LayoutA, cutlass::ComplexTransform::kNone, kAlign, T, LayoutB,
      cutlass::ComplexTransform::kNone, kAlign, T, cutlass::layout::RowMajor, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>,
      cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
      // The grouped kernels ignore the swizzle; the argument exists to match other kernels.
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, 4,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

template <class T>
struct GroupArrays {
  cutlass::gemm::GemmCoord* shapes;
  T** ptr_a;
  T** ptr_b;
  T** ptr_d;
  int64_t* ld_a;
  int64_t* ld_b;
  int64_t* ld_d;

  static int64_t bytes(int64_t E) {
    return align16(E * sizeof(cutlass::gemm::GemmCoord)) + 3 * align16(E * sizeof(void*)) +
           3 * align16(E * sizeof(int64_t));
  }
  static GroupArrays carve(uint8_t* base, int64_t E) {
    GroupArrays g;
    auto take = [&](int64_t n) {
      uint8_t* p = base;
      base += align16(n);
      return p;
    };
    g.shapes =
        reinterpret_cast<cutlass::gemm::GemmCoord*>(take(E * sizeof(cutlass::gemm::GemmCoord)));
    g.ptr_a = reinterpret_cast<T**>(take(E * sizeof(void*)));
    g.ptr_b = reinterpret_cast<T**>(take(E * sizeof(void*)));
    g.ptr_d = reinterpret_cast<T**>(take(E * sizeof(void*)));
    g.ld_a = reinterpret_cast<int64_t*>(take(E * sizeof(int64_t)));
    g.ld_b = reinterpret_cast<int64_t*>(take(E * sizeof(int64_t)));
    g.ld_d = reinterpret_cast<int64_t*>(take(E * sizeof(int64_t)));
    return g;
  }
};

// One thread per group; same layout rules as the Hopper setup kernel (grouped_gemm_sm90.cuh),
// in CUTLASS 2 terms: B is KxN, RowMajor (ld N) or ColumnMajor (ld K).
template <class T>
__global__ void setup_groups_kernel(GroupArrays<T> out, Shape shape, const T* a, const T* b, T* d,
                                    const int32_t* offsets, int64_t rows, int64_t M, int64_t N,
                                    int64_t K, int64_t E, bool b_k_major) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= E) return;
  int64_t begin, end;
  group_rows(offsets, g, rows, begin, end);
  const int64_t n_rows = end - begin;
  if (shape == Shape::kVariableM) {
    out.shapes[g] = cutlass::gemm::GemmCoord(int(n_rows), int(N), int(K));
    out.ptr_a[g] = const_cast<T*>(a + begin * K);
    out.ptr_b[g] = const_cast<T*>(b + g * K * N);
    out.ptr_d[g] = d + begin * N;
    out.ld_a[g] = K;
    out.ld_b[g] = b_k_major ? K : N;
    out.ld_d[g] = N;
  } else {
    out.shapes[g] = cutlass::gemm::GemmCoord(n_rows > 0 ? int(M) : 0, int(N), int(n_rows));
    out.ptr_a[g] = const_cast<T*>(a + begin * M);
    out.ptr_b[g] = const_cast<T*>(b + begin * N);
    out.ptr_d[g] = d + g * M * N;
    out.ld_a[g] = M;
    out.ld_b[g] = N;
    out.ld_d[g] = N;
  }
}

inline void check_cutlass(cutlass::Status status, const char* what) {
  TORCH_CHECK(status == cutlass::Status::kSuccess, "dsmoe.grouped_gemm (CUDA, sm80): ", what,
              " failed: ", cutlass::cutlassGetStatusString(status));
}

// Persistent CTAs per SM of a kernel type, asked once per device (a host-side query).
template <class Gemm>
int active_blocks_per_sm(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  const int blocks = Gemm::maximum_active_blocks();
  TORCH_CHECK(blocks > 0,
              "dsmoe.grouped_gemm (CUDA, sm80): the grouped kernel cannot run on device ", device,
              " (occupancy query returned ", blocks, ")");
  cache.emplace(device, blocks);
  return blocks;
}

template <class T, class LayoutA, class LayoutB>
void run_gemm(const Problem& p) {
  using Gemm = typename GroupedGemm<T, LayoutA, LayoutB>::Gemm;
  using Arrays = GroupArrays<T>;
  TORCH_CHECK(p.E < (int64_t(1) << 31) && p.rows < (int64_t(1) << 31) && p.N < (int64_t(1) << 31) &&
                  p.M < (int64_t(1) << 31) && p.K < (int64_t(1) << 31),
              "dsmoe.grouped_gemm (CUDA, sm80): every dimension must fit int32");

  auto workspace =
      at::empty({Arrays::bytes(p.E)}, at::TensorOptions().dtype(at::kByte).device(p.device));
  Arrays arrays = Arrays::carve(static_cast<uint8_t*>(workspace.data_ptr()), p.E);
  const int threads = 128;
  const int blocks = int((p.E + threads - 1) / threads);
  setup_groups_kernel<T><<<blocks, threads, 0, p.stream>>>(
      arrays, p.shape, static_cast<const T*>(p.a), static_cast<const T*>(p.b), static_cast<T*>(p.d),
      p.offsets, p.rows, p.M, p.N, p.K, p.E, p.b_k_major);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, 0.0f);
  typename Gemm::Arguments args(arrays.shapes, int(p.E),
                                p.sm_count * active_blocks_per_sm<Gemm>(p.device.index()), epilogue,
                                arrays.ptr_a, arrays.ptr_b, arrays.ptr_d, arrays.ptr_d, arrays.ld_a,
                                arrays.ld_b, arrays.ld_d, arrays.ld_d);
  Gemm gemm;
  check_cutlass(gemm.initialize(args, nullptr, p.stream), "initialize");
  check_cutlass(gemm.run(p.stream), "run");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
void run(const Problem& p) {
  using RowMajor = cutlass::layout::RowMajor;
  using ColumnMajor = cutlass::layout::ColumnMajor;
  if (p.shape == Shape::kVariableK) {
    run_gemm<T, ColumnMajor, RowMajor>(p);
  } else if (p.b_k_major) {
    run_gemm<T, RowMajor, ColumnMajor>(p);
  } else {
    run_gemm<T, RowMajor, RowMajor>(p);
  }
}

}  // namespace sm80
}  // namespace grouped_gemm_cuda
}  // namespace dsmoe

#endif  // DSMOE_WITH_CUTLASS
