// CPU SwiGLU: out = silu(gate) * up on rows of gate_up [M, 2I] (gate half first), math in fp32
// (fp64 for fp64), parallel over rows. The backward recomputes silu instead of storing it.
// fp32/bf16/fp16 run the at::vec kernels of vec_kernels.h (AVX512/AVX2 where the CPU has them);
// fp64 runs the scalar loops below.
#include "../check.h"
#include "../index_math.h"
#include "../op_checks.h"

#include "caching_allocator.h"
#include "vec_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace dsmoe {
namespace {

constexpr int64_t kElemGrain = 32768;

at::Tensor swiglu_cpu(const at::Tensor& gate_up_in) {
  check_swiglu_args("swiglu", gate_up_in);
  const auto gate_up = gate_up_in.contiguous();
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = cpu::empty_cached({M, I}, gate_up.options());
  if (M == 0 || I == 0) return out;
  const int64_t row_grain = std::max<int64_t>(1, kElemGrain / I);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "dsmoe_swiglu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (const auto* vec = cpu::vec_kernels_or_null<scalar_t>()) {
      const auto kernel = vec->swiglu;
      at::parallel_for(0, M, row_grain, [&](int64_t begin, int64_t end) {
        kernel(in + begin * 2 * I, o + begin * I, end - begin, I);
      });
      return;
    }
    at::parallel_for(0, M, row_grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = in + r * 2 * I;
        const scalar_t* u = g + I;
        scalar_t* dst = o + r * I;
        for (int64_t c = 0; c < I; ++c) {
          dst[c] = static_cast<scalar_t>(
              swiglu_forward_elem<acc_t>(static_cast<acc_t>(g[c]), static_cast<acc_t>(u[c])));
        }
      }
    });
  });
  return out;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& gate_up_in) {
  check_swiglu_backward_args(grad_out_in, gate_up_in);
  const auto gate_up = gate_up_in.contiguous();
  const auto grad_out = grad_out_in.contiguous().to(gate_up.scalar_type());
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  auto grad = cpu::empty_cached_like(gate_up);
  if (M == 0 || I == 0) return grad;
  const int64_t row_grain = std::max<int64_t>(1, kElemGrain / I);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "dsmoe_swiglu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    scalar_t* gr = grad.data_ptr<scalar_t>();
    if (const auto* vec = cpu::vec_kernels_or_null<scalar_t>()) {
      const auto kernel = vec->swiglu_backward;
      at::parallel_for(0, M, row_grain, [&](int64_t begin, int64_t end) {
        kernel(go + begin * I, in + begin * 2 * I, gr + begin * 2 * I, end - begin, I);
      });
      return;
    }
    at::parallel_for(0, M, row_grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = in + r * 2 * I;
        const scalar_t* u = g + I;
        const scalar_t* d = go + r * I;
        scalar_t* dg = gr + r * 2 * I;
        scalar_t* du = dg + I;
        for (int64_t c = 0; c < I; ++c) {
          acc_t dgc, duc;
          swiglu_backward_elem<acc_t>(static_cast<acc_t>(g[c]), static_cast<acc_t>(u[c]),
                                      static_cast<acc_t>(d[c]), dgc, duc);
          dg[c] = static_cast<scalar_t>(dgc);
          du[c] = static_cast<scalar_t>(duc);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsmoe, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace dsmoe
