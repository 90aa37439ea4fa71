// CPU permute / unpermute and their backward.
//
// permute: one sequential pass counts rows per expert (and validates ids), an exclusive scan
// gives expert_offsets, a second pass hands out rows in token order (stable), then the rows are
// copied in parallel. Ids >= num_experts are dropped (zero rows after expert_offsets[E]). Every destination row is written exactly once: deterministic, no atomics.
// unpermute and permute_backward are the same weighted gather (weights = 1 for the latter):
// out[t] = sum_j w[t,j] * src[row_map[t*k+j]], accumulated in fp32 (fp64 for fp64) in slot order.
// The row loops of fp32/bf16/fp16 are the at::vec kernels of vec_kernels.h; fp64 runs the scalar
// loops here.
#include "../check.h"
#include "../op_checks.h"

#include "caching_allocator.h"
#include "vec_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

namespace dsmoe {
namespace {

constexpr int64_t kRowGrain = 16;

// row_map must be a permutation of [0, M): the gathers read each row once, and
// unpermute_backward writes each row of grad_y_perm exactly once (a repeated row would be a race).
void check_row_map_values(const char* op, const at::Tensor& row_map) {
  const int32_t* r = row_map.data_ptr<int32_t>();
  const int64_t M = row_map.numel();
  std::vector<char> seen(static_cast<size_t>(M), 0);
  for (int64_t f = 0; f < M; ++f) {
    TORCH_CHECK(r[f] >= 0 && r[f] < M, "dsmoe.", op, ": row_map[", f, "]=", r[f],
                " is outside [0, ", M, ")");
    TORCH_CHECK(!seen[r[f]], "dsmoe.", op, ": row_map must be a permutation, but row ", r[f],
                " appears twice (again at row_map[", f, "])");
    seen[r[f]] = 1;
  }
}

// out[t] = sum_j (w ? w[t*k+j] : 1) * src[row_map[t*k+j]]
template <typename scalar_t>
void gather_sum_rows(const scalar_t* src, const int32_t* row_map, const at::opmath_type<scalar_t>* w,
                     int64_t T, int64_t k, int64_t h, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (cpu::has_vec_kernels<scalar_t>) {
    const auto kernel = cpu::vec_kernels<scalar_t>().gather_sum;
    at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
      kernel(src, row_map, w, begin, end, k, h, out);
    });
    return;
  }
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(h));
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* row = src + static_cast<int64_t>(row_map[t * k + j]) * h;
        const acc_t wj = w ? w[t * k + j] : acc_t(1);
        for (int64_t c = 0; c < h; ++c) acc[c] += wj * static_cast<acc_t>(row[c]);
      }
      scalar_t* o = out + t * h;
      for (int64_t c = 0; c < h; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

// Hands out the rows of x_perm in token order within each expert (stable). Ids >= num_experts
// (transformers' expert-parallel sentinels: rows another rank owns) are dropped: their rows come
// after expert_offsets[E], past every group, so no GEMM computes them. Negative ids are an error.
template <typename id_t>
int64_t assign_rows(const id_t* ids, int64_t M, int64_t k, int64_t E, int32_t* row_map,
                    int32_t* offsets) {
  std::vector<int64_t> cursor(static_cast<size_t>(E + 2), 0);
  for (int64_t f = 0; f < M; ++f) {
    const id_t e = ids[f];
    TORCH_CHECK(e >= 0, "dsmoe.permute: expert_ids[", f / k, ",", f % k, "]=", e,
                " is negative (ids >= num_experts=", E, " are dropped, negative ones are invalid)");
    cursor[(e < E ? static_cast<int64_t>(e) : E) + 1] += 1;
  }
  for (int64_t e = 0; e <= E; ++e) cursor[e + 1] += cursor[e];
  for (int64_t e = 0; e <= E; ++e) offsets[e] = static_cast<int32_t>(cursor[e]);
  for (int64_t f = 0; f < M; ++f) {
    const int64_t e = ids[f] < E ? static_cast<int64_t>(ids[f]) : E;
    row_map[f] = static_cast<int32_t>(cursor[e]++);
  }
  return offsets[E];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& x_in,
                                                           const at::Tensor& ids_in,
                                                           int64_t num_experts) {
  check_permute_args(x_in, ids_in, num_experts);
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = x.size(0), h = x.size(1), k = ids.size(1), M = T * k, E = num_experts;
  auto x_perm = cpu::empty_cached({M, h}, x.options());
  const auto int_options = ids.options().dtype(at::kInt);
  auto row_map = at::empty({M}, int_options);
  auto offsets = at::empty({E + 1}, int_options);
  int32_t* map_p = row_map.data_ptr<int32_t>();
  // int64 ids (what transformers' routers give) are read as they are: no cast pass
  const int64_t kept = ids.scalar_type() == at::kLong
                           ? assign_rows(ids.data_ptr<int64_t>(), M, k, E, map_p, offsets.data_ptr<int32_t>())
                           : assign_rows(ids.data_ptr<int32_t>(), M, k, E, map_p, offsets.data_ptr<int32_t>());

  if (M > 0 && h > 0) {
    const int64_t row_bytes = h * static_cast<int64_t>(x.element_size());
    const char* src = static_cast<const char*>(x.data_ptr());
    char* dst = static_cast<char*>(x_perm.data_ptr());
    at::parallel_for(0, M, kRowGrain * 4, [&](int64_t begin, int64_t end) {
      for (int64_t f = begin; f < end; ++f) {
        if (map_p[f] >= kept) {  // a dropped row: zeros, never read by a GEMM
          std::memset(dst + map_p[f] * row_bytes, 0, row_bytes);
        } else {
          std::memcpy(dst + map_p[f] * row_bytes, src + (f / k) * row_bytes, row_bytes);
        }
      }
    });
  }
  return {x_perm, row_map, offsets};
}

at::Tensor permute_backward_cpu(const at::Tensor& grad_in, const at::Tensor& row_map_in, int64_t k) {
  check_permute_backward_args(grad_in, row_map_in, k);
  const auto grad = grad_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  check_row_map_values("permute_backward", row_map);
  const int64_t T = grad.size(0) / k, h = grad.size(1);
  auto out = cpu::empty_cached({T, h}, grad.options());
  if (T == 0 || h == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "dsmoe_permute_backward_cpu", [&] {
    gather_sum_rows<scalar_t>(grad.data_ptr<scalar_t>(), row_map.data_ptr<int32_t>(), nullptr, T,
                              k, h, out.data_ptr<scalar_t>());
  });
  return out;
}

at::ScalarType acc_dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor unpermute_cpu(const at::Tensor& y_perm_in, const at::Tensor& row_map_in,
                         const at::Tensor& weights_in) {
  check_unpermute_args("unpermute", y_perm_in, row_map_in, weights_in);
  const auto y_perm = y_perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  check_row_map_values("unpermute", row_map);
  const auto weights = weights_in.contiguous().to(acc_dtype_of(y_perm));
  const int64_t T = weights.size(0), k = weights.size(1), h = y_perm.size(1);
  auto out = cpu::empty_cached({T, h}, y_perm.options());
  if (T == 0 || h == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "dsmoe_unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_sum_rows<scalar_t>(y_perm.data_ptr<scalar_t>(), row_map.data_ptr<int32_t>(),
                              weights.data_ptr<acc_t>(), T, k, h, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_y_in,
                                                          const at::Tensor& y_perm_in,
                                                          const at::Tensor& row_map_in,
                                                          const at::Tensor& weights_in) {
  check_unpermute_backward_args(grad_y_in, y_perm_in, row_map_in, weights_in);
  const auto grad_y = grad_y_in.contiguous().to(y_perm_in.scalar_type());
  const auto y_perm = y_perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  check_row_map_values("unpermute_backward", row_map);
  const auto acc_dtype = acc_dtype_of(y_perm);
  const auto weights = weights_in.contiguous().to(acc_dtype);
  const int64_t T = weights.size(0), k = weights.size(1), h = y_perm.size(1);
  auto grad_y_perm = cpu::empty_cached_like(y_perm);
  auto grad_weights = at::empty({T, k}, weights.options());
  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "dsmoe_unpermute_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gy = grad_y.data_ptr<scalar_t>();
      const scalar_t* yp = y_perm.data_ptr<scalar_t>();
      const int32_t* map = row_map.data_ptr<int32_t>();
      const acc_t* w = weights.data_ptr<acc_t>();
      scalar_t* gyp = grad_y_perm.data_ptr<scalar_t>();
      acc_t* gw = grad_weights.data_ptr<acc_t>();
      if (const auto* vec = cpu::vec_kernels_or_null<scalar_t>()) {
        const auto kernel = vec->unpermute_backward;
        at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
          kernel(gy, yp, map, w, begin, end, k, h, gyp, gw);
        });
        return;
      }
      at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const scalar_t* g = gy + t * h;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t f = t * k + j;
            const int64_t r = map[f];
            const scalar_t* y = yp + r * h;
            scalar_t* dst = gyp + r * h;
            acc_t dot = 0;
            for (int64_t c = 0; c < h; ++c) {
              const acc_t gc = static_cast<acc_t>(g[c]);
              dot += gc * static_cast<acc_t>(y[c]);
              dst[c] = static_cast<scalar_t>(w[f] * gc);
            }
            gw[f] = dot;
          }
        }
      });
    });
  }
  return {grad_y_perm, grad_weights.to(weights_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsmoe, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("permute_backward", &permute_backward_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace dsmoe
