// CUDA SwiGLU: out[r, c] = silu(gate_up[r, c]) * gate_up[r, I + c] on gate_up [M, 2I] (gate
// half first), and its backward, which recomputes silu instead of storing it.
//
// One thread per VEC consecutive columns of one row. VEC = 16 bytes of the dtype (8 bf16/fp16,
// 4 fp32, 2 fp64) when I is a multiple of VEC and every base pointer is 16-byte aligned, so each
// half of a row starts on a 16-byte boundary; otherwise VEC = 1 (any I, any alignment). Math in
// fp32 (fp64 for fp64) through the element functions of index_math.h that the CPU kernel uses.
// Bytes: forward reads 2*M*I and writes M*I elements; backward reads 3*M*I and writes 2*M*I.
#include "../check.h"
#include "../index_math.h"
#include "../op_checks.h"
#include "cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace dsmoe {
namespace {

using namespace dsmoe::cuda;

constexpr int kThreads = 256;

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(const scalar_t* __restrict__ gate_up,  // [M, 2I]
                          scalar_t* __restrict__ out,            // [M, I]
                          int64_t M, int64_t I) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nvec = I / VEC;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * nvec) return;
  const int64_t r = i / nvec, c = (i - r * nvec) * VEC;
  const scalar_t* row = gate_up + r * 2 * I;
  const auto g = load_vec<VEC>(row + c);
  const auto u = load_vec<VEC>(row + I + c);
  Vec<scalar_t, VEC> o;
#pragma unroll
  for (int q = 0; q < VEC; ++q) {
    o.v[q] = static_cast<scalar_t>(
        swiglu_forward_elem<acc_t>(static_cast<acc_t>(g.v[q]), static_cast<acc_t>(u.v[q])));
  }
  store_vec<VEC>(out + r * I + c, o);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const scalar_t* __restrict__ grad_out,  // [M, I]
                           const scalar_t* __restrict__ gate_up,   // [M, 2I]
                           scalar_t* __restrict__ grad,            // [M, 2I]
                           int64_t M, int64_t I) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nvec = I / VEC;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * nvec) return;
  const int64_t r = i / nvec, c = (i - r * nvec) * VEC;
  const scalar_t* row = gate_up + r * 2 * I;
  const auto g = load_vec<VEC>(row + c);
  const auto u = load_vec<VEC>(row + I + c);
  const auto d = load_vec<VEC>(grad_out + r * I + c);
  Vec<scalar_t, VEC> dg, du;
#pragma unroll
  for (int q = 0; q < VEC; ++q) {
    acc_t dgq, duq;
    swiglu_backward_elem<acc_t>(static_cast<acc_t>(g.v[q]), static_cast<acc_t>(u.v[q]),
                                static_cast<acc_t>(d.v[q]), dgq, duq);
    dg.v[q] = static_cast<scalar_t>(dgq);
    du.v[q] = static_cast<scalar_t>(duq);
  }
  scalar_t* grow = grad + r * 2 * I;
  store_vec<VEC>(grow + c, dg);
  store_vec<VEC>(grow + I + c, du);
}

// True when rows of width I (and 2I) can be read and written in 16-byte vectors.
template <typename scalar_t>
bool use_vec16(int64_t I, std::initializer_list<const void*> ptrs) {
  if (I % kVec16<scalar_t> != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

at::Tensor swiglu_cuda(const at::Tensor& gate_up_in) {
  check_swiglu_args("swiglu", gate_up_in);
  const c10::cuda::CUDAGuard guard(gate_up_in.device());
  const auto gate_up = gate_up_in.contiguous();
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({M, I}, gate_up.options());
  if (M == 0 || I == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "dsmoe_swiglu_cuda", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (use_vec16<scalar_t>(I, {in, o})) {
      constexpr int V = kVec16<scalar_t>;
      DSMOE_LAUNCH((swiglu_forward_kernel<scalar_t, V>), grid_for(M * (I / V), kThreads), kThreads, 0, stream, in, o, M, I);
    } else {
      DSMOE_LAUNCH((swiglu_forward_kernel<scalar_t, 1>), grid_for(M * I, kThreads), kThreads, 0, stream, in, o, M, I);
    }
  });
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& gate_up_in) {
  check_swiglu_backward_args(grad_out_in, gate_up_in);
  const c10::cuda::CUDAGuard guard(gate_up_in.device());
  const auto gate_up = gate_up_in.contiguous();
  const auto grad_out = grad_out_in.contiguous().to(gate_up.scalar_type());
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  auto grad = at::empty_like(gate_up);
  if (M == 0 || I == 0) return grad;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "dsmoe_swiglu_backward_cuda", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    scalar_t* gr = grad.data_ptr<scalar_t>();
    if (use_vec16<scalar_t>(I, {in, go, gr})) {
      constexpr int V = kVec16<scalar_t>;
      DSMOE_LAUNCH((swiglu_backward_kernel<scalar_t, V>), grid_for(M * (I / V), kThreads), kThreads, 0, stream, go, in, gr, M, I);
    } else {
      DSMOE_LAUNCH((swiglu_backward_kernel<scalar_t, 1>), grid_for(M * I, kThreads), kThreads, 0, stream, go, in, gr, M, I);
    }
  });
  return grad;
}

}  // namespace

DSMOE_CUDA_LIBRARY_IMPL(m) {
  m.impl("swiglu", &swiglu_cuda);                    // silu(gate) * up, 16-byte vectors
  m.impl("swiglu_backward", &swiglu_backward_cuda);  // d gate_up, silu recomputed
}

}  // namespace dsmoe
