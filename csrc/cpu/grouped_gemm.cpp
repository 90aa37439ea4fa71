// CPU grouped GEMM and its weight gradient: one BLAS call (at::mm_out: MKL for fp32, oneDNN
// with AMX for bf16/fp16) per group, on views, with no copies of the activations.
//
// Threads: when there are many small groups (fine-grained experts) a single GEMM cannot keep
// every core busy, so groups are split over threads in contiguous chunks of about equal row
// count, each thread running its GEMMs single-threaded. A few large groups run one after the
// other, each GEMM using every thread.
#include "../check.h"
#include "../index_math.h"
#include "../op_checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <vector>

namespace dsmoe {
namespace {

// Offsets must start at 0, never decrease and end at the row count; on CPU they are read.
std::vector<int64_t> read_offsets(const char* op, const at::Tensor& offsets, int64_t rows) {
  const auto off = offsets.contiguous();
  const int32_t* p = off.data_ptr<int32_t>();
  const int64_t n = off.numel();
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out[i] = p[i];
    TORCH_CHECK(i > 0 || p[0] == 0, "dsmoe.", op, ": expert_offsets[0] must be 0, got ", p[0]);
    TORCH_CHECK(i == 0 || p[i] >= p[i - 1], "dsmoe.", op,
                ": expert_offsets must be non-decreasing, got expert_offsets[", i, "]=", p[i],
                " < expert_offsets[", i - 1, "]=", p[i - 1]);
  }
  TORCH_CHECK(out[n - 1] == rows, "dsmoe.", op, ": expert_offsets[-1]=", out[n - 1],
              " must equal the number of rows (", rows, ")");
  return out;
}

// Runs fn(g) for every group with rows, spreading groups over threads when that pays.
// The GEMMs dispatch below autograd (the op's own formula in dsmoe/ops.py differentiates it;
// mm_out refuses inputs that require grad); the guard is thread-local, so each worker sets it.
template <typename Fn>
void for_each_group(const std::vector<int64_t>& off, const Fn& fn_unguarded) {
  const auto fn = [&](int64_t g) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    fn_unguarded(g);
  };
  const int64_t G = static_cast<int64_t>(off.size()) - 1;
  const int64_t rows = off[G];
  int64_t nonempty = 0;
  for (int64_t g = 0; g < G; ++g) nonempty += off[g + 1] > off[g];
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || nonempty < 2 * threads || rows == 0) {
    for (int64_t g = 0; g < G; ++g) {
      if (off[g + 1] > off[g]) fn(g);
    }
    return;
  }
  // Chunk c takes the groups whose first row lies in [c*rows/threads, (c+1)*rows/threads).
  at::parallel_for(0, threads, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t lo = c * rows / threads, hi = (c + 1) * rows / threads;
      for (int64_t g = 0; g < G; ++g) {
        if (off[g] >= lo && off[g] < hi && off[g + 1] > off[g]) fn(g);
      }
    }
  });
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a_in, const at::Tensor& b, const at::Tensor& offsets,
                            bool trans_b) {
  check_grouped_gemm_args(a_in, b, offsets, trans_b);
  const auto a = a_in.contiguous();
  const int64_t M = a.size(0), N = trans_b ? b.size(1) : b.size(2);
  const auto off = read_offsets("grouped_gemm", offsets, M);
  auto c = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  for_each_group(off, [&](int64_t g) {
    auto rows_c = c.narrow(0, off[g], off[g + 1] - off[g]);
    const auto bg = trans_b ? b.select(0, g).t() : b.select(0, g);
    at::mm_out(rows_c, a.narrow(0, off[g], off[g + 1] - off[g]), bg);
  });
  return c;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& a_in, const at::Tensor& grad_c_in,
                                  const at::Tensor& offsets, bool trans_b) {
  check_grouped_gemm_wgrad_args(a_in, grad_c_in, offsets);
  const auto a = a_in.contiguous();
  const auto grad_c = grad_c_in.contiguous();
  const int64_t E = offsets.size(0) - 1, K = a.size(1), N = grad_c.size(1);
  const auto off = read_offsets("grouped_gemm_wgrad", offsets, a.size(0));
  // Zeros first: empty groups get a zero gradient.
  auto out = trans_b ? at::zeros({E, N, K}, a.options()) : at::zeros({E, K, N}, a.options());
  if (K == 0 || N == 0) return out;
  for_each_group(off, [&](int64_t g) {
    const auto ag = a.narrow(0, off[g], off[g + 1] - off[g]);
    const auto dg = grad_c.narrow(0, off[g], off[g + 1] - off[g]);
    auto og = out.select(0, g);
    if (trans_b) {
      at::mm_out(og, dg.t(), ag);
    } else {
      at::mm_out(og, ag.t(), dg);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsmoe, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
}

}  // namespace dsmoe
