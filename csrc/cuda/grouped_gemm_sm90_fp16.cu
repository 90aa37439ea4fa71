// Hopper (sm_90a) grouped GEMM kernels for fp16 operands,
// forward and dgrad (M varies per group); see grouped_gemm_sm90.cuh.
//
// NDEBUG before any include: a device-side assert inside CUTLASS's mainloop is a function call
// that makes ptxas serialise every wgmma (warning C7510), costing much of the kernel's speed.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_sm90.cuh"

namespace dsmoe {
namespace grouped_gemm_cuda {

void sm90_forward_fp16(const Problem& p, Tile tile) {
#ifdef DSMOE_WITH_CUTLASS
  sm90::run_forward<cutlass::half_t>(p, tile);
#else
  (void)p;
  (void)tile;
  TORCH_CHECK(false, "dsmoe.grouped_gemm: this build has no CUTLASS kernels");
#endif
}

}  // namespace grouped_gemm_cuda
}  // namespace dsmoe
