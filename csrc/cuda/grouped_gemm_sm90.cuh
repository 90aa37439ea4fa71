// Hopper grouped GEMM (sm_90a): CUTLASS 3 ptr-array grouped kernels, included by one .cu per
// element type and GEMM shape (forward: 4 kernels, wgrad: 2), so the heavy instantiations build
// in parallel and no compiler process needs more than a few GB.
//
// Algorithm: a setup kernel (one thread per group) reads expert_offsets on the device and writes
// each group's problem shape (M,N,K), operand pointers and leading-dimension strides into a
// workspace; the grouped kernel then runs over all E groups with problem shapes read on the
// device only (no host copy of them exists). It is persistent (one CTA per SM, clusters of 2
// along M sharing B tiles by TMA multicast), warp-specialised (one producer warpgroup issuing
// TMA loads, two consumer warpgroups issuing wgmma, "cooperative" on one tile), and rewrites
// its TMA descriptors in place when it moves to another group. Empty groups get M = 0 and so
// no tiles; in the weight gradient, where K is the group's row count, M is zeroed as well (a
// K = 0 tile would store accumulators no MMA wrote) and the caller zeroes those experts.
//
// Limits: bf16/fp16 operands, fp32 accumulation, output in the operand type; rows and base
// pointers 16-byte aligned (checked by the caller, which routes other shapes elsewhere).
// Tiles: 128x256x64 ("wide") or 128x128x64 ("narrow"), both cooperative with 2x1 clusters.
#pragma once

#include "grouped_gemm.cuh"

#include "../index_math.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#ifdef DSMOE_WITH_CUTLASS

// The order of these headers matters for CUTLASS 3 (cute first, builders before adapters).
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <type_traits>

namespace dsmoe {
namespace grouped_gemm_cuda {
namespace sm90 {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M,N,K)
using ShapeMNK = ProblemShape::UnderlyingProblemShape;

struct WideTile {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
};
struct NarrowTile {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
};

// One grouped GEMM type: element T (cutlass::bfloat16_t or half_t), operand layouts in CUTLASS
// terms (A is MxK, B is KxN; RowMajor B = N contiguous, ColumnMajor B = K contiguous), D
// row-major, no C operand (beta = 0: nothing is read).
template <class T, class LayoutA, class LayoutB, class Config>
struct GroupedGemm {
  static constexpr int kAlign = 16 / sizeof(T);
  using LayoutD = cutlass::layout::RowMajor;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape,
      typename Config::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign, T, LayoutD*, kAlign,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<T, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA*, kAlign, T, LayoutB*,
      kAlign, float, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// A packed CuTe stride whose one dynamic mode (mode 0 or 1) is the leading dimension `ld`.
template <class Stride>
__host__ __device__ Stride leading_dim_stride(int64_t ld) {
  Stride s{};
  if constexpr (std::is_same_v<std::remove_cv_t<std::remove_reference_t<decltype(cute::get<0>(s))>>,
                               int64_t>) {
    cute::get<0>(s) = ld;
  } else {
    cute::get<1>(s) = ld;
  }
  return s;
}

// Per-group arguments in the workspace, one array per field.
template <class G, class T>
struct GroupArrays {
  ShapeMNK* shapes;
  const T** ptr_a;
  const T** ptr_b;
  T** ptr_d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;

  static int64_t bytes(int64_t E) {
    return align16(E * sizeof(ShapeMNK)) + 3 * align16(E * sizeof(void*)) +
           align16(E * sizeof(typename G::StrideA)) + align16(E * sizeof(typename G::StrideB)) +
           align16(E * sizeof(typename G::StrideD));
  }
  static GroupArrays carve(uint8_t* base, int64_t E) {
    GroupArrays g;
    auto take = [&](int64_t n) {
      uint8_t* p = base;
      base += align16(n);
      return p;
    };
    g.shapes = reinterpret_cast<ShapeMNK*>(take(E * sizeof(ShapeMNK)));
    g.ptr_a = reinterpret_cast<const T**>(take(E * sizeof(void*)));
    g.ptr_b = reinterpret_cast<const T**>(take(E * sizeof(void*)));
    g.ptr_d = reinterpret_cast<T**>(take(E * sizeof(void*)));
    g.stride_a = reinterpret_cast<typename G::StrideA*>(take(E * sizeof(typename G::StrideA)));
    g.stride_b = reinterpret_cast<typename G::StrideB*>(take(E * sizeof(typename G::StrideB)));
    g.stride_d = reinterpret_cast<typename G::StrideD*>(take(E * sizeof(typename G::StrideD)));
    return g;
  }
};

// One thread per group: its rows from expert_offsets (clamped, so malformed offsets never
// address outside the tensors), then its shape, pointers and strides. 64-bit address math.
template <class G, class T>
__global__ void setup_groups_kernel(GroupArrays<G, T> out, Shape shape, const T* a, const T* b,
                                    T* d, const int32_t* offsets, int64_t rows, int64_t M,
                                    int64_t N, int64_t K, int64_t E, bool b_k_major) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= E) return;
  int64_t begin, end;
  group_rows(offsets, g, rows, begin, end);
  const int64_t n_rows = end - begin;
  if (shape == Shape::kVariableM) {
    out.shapes[g] = ShapeMNK(int(n_rows), int(N), int(K));
    out.ptr_a[g] = a + begin * K;
    out.ptr_b[g] = b + g * K * N;
    out.ptr_d[g] = d + begin * N;
    out.stride_a[g] = leading_dim_stride<typename G::StrideA>(K);
    out.stride_b[g] = leading_dim_stride<typename G::StrideB>(b_k_major ? K : N);
    out.stride_d[g] = leading_dim_stride<typename G::StrideD>(N);
  } else {
    // A is read transposed: column-major MxK with K = this group's rows.
    out.shapes[g] = ShapeMNK(n_rows > 0 ? int(M) : 0, int(N), int(n_rows));
    out.ptr_a[g] = a + begin * M;
    out.ptr_b[g] = b + begin * N;
    out.ptr_d[g] = d + g * M * N;
    out.stride_a[g] = leading_dim_stride<typename G::StrideA>(M);
    out.stride_b[g] = leading_dim_stride<typename G::StrideB>(N);
    out.stride_d[g] = leading_dim_stride<typename G::StrideD>(N);
  }
}

inline void check_cutlass(cutlass::Status status, const char* what) {
  TORCH_CHECK(status == cutlass::Status::kSuccess, "dsmoe.grouped_gemm (CUDA, sm90): ", what,
              " failed: ", cutlass::cutlassGetStatusString(status));
}

template <class G, class T>
void run_gemm(const Problem& p) {
  using Gemm = typename G::Gemm;
  using Arrays = GroupArrays<G, T>;
  TORCH_CHECK(p.E < (int64_t(1) << 31) && p.rows < (int64_t(1) << 31) && p.N < (int64_t(1) << 31) &&
                  p.M < (int64_t(1) << 31) && p.K < (int64_t(1) << 31),
              "dsmoe.grouped_gemm (CUDA, sm90): every dimension must fit int32");

  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.hw_info.device_id = p.device.index();
  args.hw_info.sm_count = p.sm_count;
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {cute::_0{}, cute::_0{}, 0};
  fusion.dBeta = {cute::_0{}, cute::_0{}, 0};

  // Workspace: the per-group arrays, then CUTLASS's own (TMA descriptors per SM). Its size
  // depends on E and the SM count only; the arrays' addresses are needed before CUTLASS can be
  // asked, and its answer does not depend on them.
  const int64_t arrays_bytes = align16(Arrays::bytes(p.E));
  args.problem_shape = {int(p.E), nullptr, nullptr};
  const int64_t cutlass_bytes = int64_t(Gemm::get_workspace_size(args));
  auto workspace = at::empty({arrays_bytes + cutlass_bytes + 128},
                             at::TensorOptions().dtype(at::kByte).device(p.device));
  // 128-byte alignment for CUTLASS's TMA descriptors.
  uint8_t* base = static_cast<uint8_t*>(workspace.data_ptr());
  const uintptr_t after_arrays = reinterpret_cast<uintptr_t>(base + arrays_bytes);
  uint8_t* cutlass_ws = reinterpret_cast<uint8_t*>((after_arrays + 127) / 128 * 128);
  Arrays arrays = Arrays::carve(base, p.E);
  // CUTLASS keeps per-SM copies of the TMA descriptors there, and the kernel's descriptor update
  // (tensormap.cp_fenceproxy) reads bytes of them that nothing wrote: compute-sanitizer's
  // initcheck reported it on an H200 (2026-12-04). Zeroed (a few KB), every byte is defined.
  if (cutlass_bytes > 0) C10_CUDA_CHECK(cudaMemsetAsync(cutlass_ws, 0, size_t(cutlass_bytes), p.stream));

  const int threads = 128;
  const int blocks = int((p.E + threads - 1) / threads);
  setup_groups_kernel<G, T><<<blocks, threads, 0, p.stream>>>(
      arrays, p.shape, static_cast<const T*>(p.a), static_cast<const T*>(p.b), static_cast<T*>(p.d),
      p.offsets, p.rows, p.M, p.N, p.K, p.E, p.b_k_major);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  args.problem_shape = {int(p.E), arrays.shapes, nullptr};  // shapes on the device only
  args.mainloop.ptr_A = arrays.ptr_a;
  args.mainloop.dA = arrays.stride_a;
  args.mainloop.ptr_B = arrays.ptr_b;
  args.mainloop.dB = arrays.stride_b;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = arrays.ptr_d;
  args.epilogue.dD = arrays.stride_d;

  Gemm gemm;
  check_cutlass(gemm.can_implement(args), "can_implement");
  check_cutlass(gemm.initialize(args, cutlass_ws, p.stream), "initialize");
  check_cutlass(gemm.run(p.stream), "run");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward and dgrad (M varies per group): A row-major; B [K,N] (RowMajor) or [N,K] (ColumnMajor).
template <class T>
void run_forward(const Problem& p, Tile tile) {
  using RowMajor = cutlass::layout::RowMajor;
  using ColumnMajor = cutlass::layout::ColumnMajor;
  const bool narrow = pick_tile(p, tile) == Tile::kNarrow;
  if (p.b_k_major) {
    if (narrow) run_gemm<GroupedGemm<T, RowMajor, ColumnMajor, NarrowTile>, T>(p);
    else run_gemm<GroupedGemm<T, RowMajor, ColumnMajor, WideTile>, T>(p);
  } else {
    if (narrow) run_gemm<GroupedGemm<T, RowMajor, RowMajor, NarrowTile>, T>(p);
    else run_gemm<GroupedGemm<T, RowMajor, RowMajor, WideTile>, T>(p);
  }
}

// Weight gradient (K varies per group): A read transposed (column-major), B row-major.
template <class T>
void run_wgrad(const Problem& p, Tile tile) {
  using RowMajor = cutlass::layout::RowMajor;
  using ColumnMajor = cutlass::layout::ColumnMajor;
  if (pick_tile(p, tile) == Tile::kNarrow) {
    run_gemm<GroupedGemm<T, ColumnMajor, RowMajor, NarrowTile>, T>(p);
  } else {
    run_gemm<GroupedGemm<T, ColumnMajor, RowMajor, WideTile>, T>(p);
  }
}

}  // namespace sm90
}  // namespace grouped_gemm_cuda
}  // namespace dsmoe

#endif  // DSMOE_WITH_CUTLASS
