// Portable tensor-core (sm_80+) grouped GEMM instantiations for fp16 operands; see
// grouped_gemm_sm80.cuh.
#include "grouped_gemm_sm80.cuh"

namespace dsmoe {
namespace grouped_gemm_cuda {

void sm80_run_fp16(const Problem& p) {
#ifdef DSMOE_WITH_CUTLASS
  sm80::run<cutlass::half_t>(p);
#else
  (void)p;
  TORCH_CHECK(false, "dsmoe.grouped_gemm: this build has no CUTLASS kernels");
#endif
}

}  // namespace grouped_gemm_cuda
}  // namespace dsmoe
