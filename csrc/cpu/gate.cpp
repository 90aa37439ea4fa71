// CPU routing gate.
//
// Forward, per token (parallel over tokens): softmax of the logits row in the accumulation type
// (fp32, fp64 for fp64 input), top-k of probs + selection_bias by insertion (index_math.h: ties
// to the lower expert id, output in descending key order), weights = chosen probs, renormalised
// by their sum + 1e-20 if asked (the reference's rule). The probs go to a scratch [T,E] buffer;
// a second pass sums them per sequence in a fixed order (deterministic for any thread count),
// and counts the chosen experts per sequence.
// Backward recomputes the softmax row instead of storing [T,E] probs between passes. The softmax
// runs vec_kernels.h's vectorised kernel for fp32/bf16/fp16.
#include "../check.h"
#include "../index_math.h"
#include "../op_checks.h"

#include "vec_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

namespace dsmoe {
namespace {

constexpr int64_t kTokenGrain = 64;

// probs[e] = softmax(row)[e] in acc_t; returns nothing.
template <typename scalar_t, typename acc_t>
void softmax_row(const scalar_t* row, int64_t E, acc_t* probs) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < E; ++e) mx = std::max(mx, static_cast<acc_t>(row[e]));
  acc_t sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    probs[e] = std::exp(static_cast<acc_t>(row[e]) - mx);
    sum += probs[e];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t e = 0; e < E; ++e) probs[e] *= inv;
}

// softmax_row for rows consecutive rows: vec_kernels.h's kernel where the type has one (its
// vectorised exp; the scalar std::exp loop made the gate ~0.4 ms per 2048 x 16 logits).
template <typename scalar_t, typename acc_t>
void softmax_rows(const scalar_t* logits, int64_t rows, int64_t E, acc_t* probs) {
  if constexpr (cpu::has_vec_kernels<scalar_t>) {
    cpu::vec_kernels<scalar_t>().softmax_rows(logits, probs, rows, E);
  } else {
    for (int64_t r = 0; r < rows; ++r) softmax_row(logits + r * E, E, probs + r * E);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_cpu(
    const at::Tensor& logits_in, int64_t k, bool normalize,
    const c10::optional<at::Tensor>& bias_in, int64_t num_seqs) {
  check_gate_args(logits_in, k, bias_in, num_seqs);
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), L = T / num_seqs;
  const auto acc_dtype = gate_acc_dtype(logits);
  auto weights = at::empty({T, k}, logits.options().dtype(acc_dtype));
  auto expert_ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  auto tokens_per_expert = at::zeros({num_seqs, E}, logits.options().dtype(at::kInt));
  auto score_sums = at::zeros({num_seqs, E}, logits.options().dtype(acc_dtype));
  if (T == 0) return {weights, expert_ids, tokens_per_expert, score_sums};
  c10::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous().to(acc_dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "dsmoe_gate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* logits_p = logits.data_ptr<scalar_t>();
    const acc_t* bias_p = bias.has_value() ? bias->data_ptr<acc_t>() : nullptr;
    acc_t* w_p = weights.data_ptr<acc_t>();
    int32_t* id_p = expert_ids.data_ptr<int32_t>();
    std::vector<acc_t> probs(static_cast<size_t>(T * E));

    at::parallel_for(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> keys(static_cast<size_t>(k));
      softmax_rows(logits_p + begin * E, end - begin, E, probs.data() + begin * E);
      for (int64_t t = begin; t < end; ++t) {
        acc_t* p = probs.data() + t * E;
        int count = 0;
        int32_t* ids = id_p + t * k;
        for (int64_t e = 0; e < E; ++e) {
          acc_t key = bias_p ? p[e] + bias_p[e] : p[e];
          topk_insert<acc_t>(key, static_cast<int32_t>(e), keys.data(), ids, static_cast<int>(k), count);
        }
        // All keys NaN (NaN logits): fill deterministically with the lowest unused ids so
        // outputs stay in range; the weights carry the NaN on.
        for (int e = 0; count < k; ++e) {
          bool used = false;
          for (int j = 0; j < count; ++j) used |= ids[j] == e;
          if (!used) ids[count++] = e;
        }
        acc_t* w = w_p + t * k;
        acc_t sum = 0;
        for (int64_t j = 0; j < k; ++j) {
          w[j] = p[ids[j]];
          sum += w[j];
        }
        if (normalize) {
          const acc_t denom = sum + acc_t(1e-20);
          for (int64_t j = 0; j < k; ++j) w[j] /= denom;
        }
      }
    });

    acc_t* sums_p = score_sums.data_ptr<acc_t>();
    int32_t* counts_p = tokens_per_expert.data_ptr<int32_t>();
    at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        acc_t* sums = sums_p + s * E;
        int32_t* counts = counts_p + s * E;
        for (int64_t t = s * L; t < (s + 1) * L; ++t) {
          const acc_t* p = probs.data() + t * E;
          for (int64_t e = 0; e < E; ++e) sums[e] += p[e];
          for (int64_t j = 0; j < k; ++j) counts[id_p[t * k + j]] += 1;
        }
      }
    });
  });
  return {weights, expert_ids, tokens_per_expert, score_sums};
}

at::Tensor gate_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& grad_sums_in,
                             const at::Tensor& logits_in, const at::Tensor& expert_ids_in,
                             bool normalize, int64_t num_seqs) {
  check_gate_backward_args(grad_weights_in, grad_sums_in, logits_in, expert_ids_in, num_seqs);
  const auto logits = logits_in.contiguous();
  const auto expert_ids = expert_ids_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = expert_ids.size(1),
                L = T / num_seqs;
  const auto acc_dtype = gate_acc_dtype(logits);
  const auto grad_weights = grad_weights_in.contiguous().to(acc_dtype);
  const auto grad_sums = grad_sums_in.contiguous().to(acc_dtype);
  auto grad_logits = at::empty_like(logits);
  if (T == 0) return grad_logits;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "dsmoe_gate_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* logits_p = logits.data_ptr<scalar_t>();
    const int32_t* id_p = expert_ids.data_ptr<int32_t>();
    const acc_t* gw_p = grad_weights.data_ptr<acc_t>();
    const acc_t* gs_p = grad_sums.data_ptr<acc_t>();
    scalar_t* out_p = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> p(static_cast<size_t>(E)), dp(static_cast<size_t>(E));
      for (int64_t t = begin; t < end; ++t) {
        softmax_rows(logits_p + t * E, 1, E, p.data());
        const acc_t* gs = gs_p + (t / L) * E;
        for (int64_t e = 0; e < E; ++e) dp[e] = gs[e];
        const int32_t* ids = id_p + t * k;
        const acc_t* gw = gw_p + t * k;
        for (int64_t j = 0; j < k; ++j) {
          TORCH_CHECK(ids[j] >= 0 && ids[j] < E, "dsmoe.gate_backward: expert_ids[", t, ",", j,
                      "]=", ids[j], " is outside [0, ", E, ")");
        }
        if (normalize) {
          // w_j = p_j / D with D = sum_l p_l + 1e-20: dp_j = g_j / D - sum_l g_l p_l / D^2.
          acc_t sum = 0, gdot = 0;
          for (int64_t j = 0; j < k; ++j) {
            sum += p[ids[j]];
            gdot += gw[j] * p[ids[j]];
          }
          const acc_t D = sum + acc_t(1e-20);
          for (int64_t j = 0; j < k; ++j) dp[ids[j]] += gw[j] / D - gdot / (D * D);
        } else {
          for (int64_t j = 0; j < k; ++j) dp[ids[j]] += gw[j];
        }
        acc_t dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += dp[e] * p[e];
        scalar_t* out = out_p + t * E;
        for (int64_t e = 0; e < E; ++e) {
          out[e] = static_cast<scalar_t>(softmax_backward_elem<acc_t>(p[e], dp[e], dot));
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsmoe, CPU, m) {
  m.impl("gate", &gate_cpu);
  m.impl("gate_backward", &gate_backward_cpu);
}

}  // namespace dsmoe
