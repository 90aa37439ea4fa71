// Argument checks of each op, shared by its CPU and CUDA entry points (and repeated in the fake
// kernels of dsmoe/ops.py). They read shapes, dtypes and devices only, never tensor values, so
// they cost no device-to-host copy.
#pragma once

#include "check.h"

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace dsmoe {

// Accumulation dtype of routing weights and score sums: fp64 for fp64 logits, else fp32.
inline at::ScalarType gate_acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_gate_args(const at::Tensor& logits, int64_t k,
                            const c10::optional<at::Tensor>& bias, int64_t num_seqs) {
  const char* op = "gate";
  check_dim(op, "logits", logits, 2, "[num_tokens, num_experts]");
  check_float(op, "logits", logits);
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1, "dsmoe.gate: logits must have at least one expert column, got shape ",
              logits.sizes());
  TORCH_CHECK(k >= 1 && k <= E, "dsmoe.gate: k must be in [1, num_experts=", E, "], got ", k);
  TORCH_CHECK(num_seqs >= 1, "dsmoe.gate: num_seqs must be >= 1, got ", num_seqs);
  TORCH_CHECK(logits.size(0) % num_seqs == 0, "dsmoe.gate: num_seqs=", num_seqs,
              " must divide num_tokens=", logits.size(0));
  if (bias.has_value()) {
    check_dim(op, "selection_bias", *bias, 1, "[num_experts]");
    check_size(op, "selection_bias", *bias, 0, E, "num_experts");
    check_dtype(op, "selection_bias", *bias, {at::kFloat, at::kDouble});
    check_same_device(op, "selection_bias", *bias, "logits", logits);
  }
}

inline void check_gate_backward_args(const at::Tensor& grad_weights,
                                     const at::Tensor& grad_score_sums, const at::Tensor& logits,
                                     const at::Tensor& expert_ids, int64_t num_seqs) {
  const char* op = "gate_backward";
  check_dim(op, "logits", logits, 2, "[num_tokens, num_experts]");
  check_float(op, "logits", logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(num_seqs >= 1 && T % num_seqs == 0, "dsmoe.gate_backward: num_seqs=", num_seqs,
              " must be >= 1 and divide num_tokens=", T);
  check_dim(op, "expert_ids", expert_ids, 2, "[num_tokens, k]");
  check_dtype(op, "expert_ids", expert_ids, {at::kInt});
  check_size(op, "expert_ids", expert_ids, 0, T, "num_tokens of logits");
  const int64_t k = expert_ids.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "dsmoe.gate_backward: expert_ids.size(1)=k must be in [1, ", E,
              "], got ", k);
  check_dim(op, "grad_weights", grad_weights, 2, "[num_tokens, k]");
  check_size(op, "grad_weights", grad_weights, 0, T, "num_tokens");
  check_size(op, "grad_weights", grad_weights, 1, k, "k");
  check_float(op, "grad_weights", grad_weights);
  check_dim(op, "grad_score_sums", grad_score_sums, 2, "[num_seqs, num_experts]");
  check_size(op, "grad_score_sums", grad_score_sums, 0, num_seqs, "num_seqs");
  check_size(op, "grad_score_sums", grad_score_sums, 1, E, "num_experts");
  check_float(op, "grad_score_sums", grad_score_sums);
  check_same_device(op, "grad_weights", grad_weights, "logits", logits);
  check_same_device(op, "grad_score_sums", grad_score_sums, "logits", logits);
  check_same_device(op, "expert_ids", expert_ids, "logits", logits);
}

inline void check_permute_args(const at::Tensor& x, const at::Tensor& expert_ids,
                               int64_t num_experts) {
  const char* op = "permute";
  check_dim(op, "x", x, 2, "[num_tokens, hidden]");
  check_float(op, "x", x);
  check_dim(op, "expert_ids", expert_ids, 2, "[num_tokens, k]");
  check_dtype(op, "expert_ids", expert_ids, {at::kInt, at::kLong});
  check_size(op, "expert_ids", expert_ids, 0, x.size(0), "num_tokens of x");
  TORCH_CHECK(expert_ids.size(1) >= 1, "dsmoe.permute: expert_ids must have k >= 1 columns, got ",
              expert_ids.sizes());
  TORCH_CHECK(num_experts >= 1 && num_experts < (int64_t(1) << 30),
              "dsmoe.permute: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(x.size(0) * expert_ids.size(1) < (int64_t(1) << 31),
              "dsmoe.permute: num_tokens * k must fit int32 row indices, got ",
              x.size(0) * expert_ids.size(1));
  check_same_device(op, "expert_ids", expert_ids, "x", x);
}

inline void check_row_map(const char* op, const at::Tensor& row_map, int64_t rows) {
  check_dim(op, "row_map", row_map, 1, "[num_tokens * k]");
  check_dtype(op, "row_map", row_map, {at::kInt});
  check_size(op, "row_map", row_map, 0, rows, "rows of the permuted tensor");
}

inline void check_permute_backward_args(const at::Tensor& grad_x_perm, const at::Tensor& row_map,
                                        int64_t k) {
  const char* op = "permute_backward";
  check_dim(op, "grad_x_perm", grad_x_perm, 2, "[num_tokens * k, hidden]");
  check_float(op, "grad_x_perm", grad_x_perm);
  TORCH_CHECK(k >= 1, "dsmoe.permute_backward: k must be >= 1, got ", k);
  TORCH_CHECK(grad_x_perm.size(0) % k == 0, "dsmoe.permute_backward: grad_x_perm.size(0)=",
              grad_x_perm.size(0), " must be a multiple of k=", k);
  check_row_map(op, row_map, grad_x_perm.size(0));
  check_same_device(op, "row_map", row_map, "grad_x_perm", grad_x_perm);
}

inline void check_unpermute_args(const char* op, const at::Tensor& y_perm,
                                 const at::Tensor& row_map, const at::Tensor& weights) {
  check_dim(op, "y_perm", y_perm, 2, "[num_tokens * k, hidden]");
  check_float(op, "y_perm", y_perm);
  check_dim(op, "weights", weights, 2, "[num_tokens, k]");
  check_float(op, "weights", weights);
  TORCH_CHECK(weights.size(1) >= 1, "dsmoe.", op, ": weights must have k >= 1 columns, got ",
              weights.sizes());
  check_size(op, "y_perm", y_perm, 0, weights.size(0) * weights.size(1),
             "num_tokens * k of weights");
  check_row_map(op, row_map, y_perm.size(0));
  check_same_device(op, "row_map", row_map, "y_perm", y_perm);
  check_same_device(op, "weights", weights, "y_perm", y_perm);
}

inline void check_unpermute_backward_args(const at::Tensor& grad_y, const at::Tensor& y_perm,
                                          const at::Tensor& row_map, const at::Tensor& weights) {
  const char* op = "unpermute_backward";
  check_unpermute_args(op, y_perm, row_map, weights);
  check_dim(op, "grad_y", grad_y, 2, "[num_tokens, hidden]");
  check_float(op, "grad_y", grad_y);
  check_size(op, "grad_y", grad_y, 0, weights.size(0), "num_tokens");
  check_size(op, "grad_y", grad_y, 1, y_perm.size(1), "hidden");
  check_same_device(op, "grad_y", grad_y, "y_perm", y_perm);
}

// Shapes of a grouped GEMM: a [M,K]; b [E,K,N], or [E,N,K] with trans_b.
inline void check_grouped_gemm_args(const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& offsets, bool trans_b) {
  const char* op = "grouped_gemm";
  check_dim(op, "a", a, 2, "[rows, K]");
  check_float(op, "a", a);
  check_dim(op, "b", b, 3, trans_b ? "[num_experts, N, K]" : "[num_experts, K, N]");
  check_same_dtype(op, "b", b, "a", a);
  check_offsets_meta(op, offsets);
  check_size(op, "b", b, 0, offsets.size(0) - 1, "num_experts = expert_offsets.size(0) - 1");
  check_size(op, "b", b, trans_b ? 2 : 1, a.size(1), "K = a.size(1)");
  check_same_device(op, "b", b, "a", a);
  check_same_device(op, "expert_offsets", offsets, "a", a);
}

inline void check_grouped_gemm_wgrad_args(const at::Tensor& a, const at::Tensor& grad_c,
                                          const at::Tensor& offsets) {
  const char* op = "grouped_gemm_wgrad";
  check_dim(op, "a", a, 2, "[rows, K]");
  check_float(op, "a", a);
  check_dim(op, "grad_c", grad_c, 2, "[rows, N]");
  check_same_dtype(op, "grad_c", grad_c, "a", a);
  check_size(op, "grad_c", grad_c, 0, a.size(0), "rows of a");
  check_offsets_meta(op, offsets);
  check_same_device(op, "grad_c", grad_c, "a", a);
  check_same_device(op, "expert_offsets", offsets, "a", a);
}

inline void check_swiglu_args(const char* op, const at::Tensor& gate_up) {
  check_dim(op, "gate_up", gate_up, 2, "[rows, 2 * intermediate]");
  check_float(op, "gate_up", gate_up);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "dsmoe.", op,
              ": gate_up.size(1) must be even (gate and up halves), got ", gate_up.size(1));
}

inline void check_swiglu_backward_args(const at::Tensor& grad_out, const at::Tensor& gate_up) {
  const char* op = "swiglu_backward";
  check_swiglu_args(op, gate_up);
  check_dim(op, "grad_out", grad_out, 2, "[rows, intermediate]");
  check_float(op, "grad_out", grad_out);
  check_size(op, "grad_out", grad_out, 0, gate_up.size(0), "rows of gate_up");
  check_size(op, "grad_out", grad_out, 1, gate_up.size(1) / 2, "gate_up.size(1) / 2");
  check_same_device(op, "grad_out", grad_out, "gate_up", gate_up);
}

}  // namespace dsmoe
