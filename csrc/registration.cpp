// The only TORCH_LIBRARY of dsmoe: every schema, one comment each. Kernels register per backend
// in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd formulas live in dsmoe/ops.py.
//
// Notation: T tokens, h hidden, E routed experts, k experts per token, M = T*k routed rows,
// S sequences (T = S * L), I expert intermediate size.
#include <torch/library.h>

// The SIMT emulator library (tools/simt_build.py) compiles this file with
// DSMOE_OPS_NAMESPACE=dsmoe_simt: the same schemas, with the CUDA kernel sources run on the CPU.
#ifndef DSMOE_OPS_NAMESPACE
#define DSMOE_OPS_NAMESPACE dsmoe
#endif
#define DSMOE_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

DSMOE_TORCH_LIBRARY(DSMOE_OPS_NAMESPACE, m) {
  // Routing: fp32 softmax over logits [T,E], top-k of (probs + selection_bias) with ties to the
  // lower expert id, weights = probs of the chosen experts (renormalised to sum 1 if normalize).
  // Returns weights [T,k] (fp32, fp64 for fp64 logits), expert_ids [T,k] int32 (descending
  // selection key), tokens_per_expert [S,E] int32 and score_sums [S,E] (sum of probs over each
  // sequence's tokens; the balance losses are built from these two).
  m.def(
      "gate(Tensor logits, int k, bool normalize=False, Tensor? selection_bias=None, "
      "int num_seqs=1) -> (Tensor weights, Tensor expert_ids, Tensor tokens_per_expert, "
      "Tensor score_sums)");
  // d logits [T,E] from d weights [T,k] and d score_sums [S,E]; recomputes the softmax.
  m.def(
      "gate_backward(Tensor grad_weights, Tensor grad_score_sums, Tensor logits, "
      "Tensor expert_ids, bool normalize, int num_seqs) -> Tensor");
  // Stable dropless permutation of token rows into expert order: x [T,h], expert_ids [T,k] ->
  // x_perm [M,h], row_map [M] int32 (row_map[t*k+j] = row of x_perm holding token t's j-th
  // copy; within an expert, rows keep token order), expert_offsets [E+1] int32.
  m.def(
      "permute(Tensor x, Tensor expert_ids, int num_experts) -> (Tensor x_perm, Tensor row_map, "
      "Tensor expert_offsets)");
  // d x [T,h] = sum_j grad_x_perm[row_map[t*k+j]]: a gather, deterministic.
  m.def("permute_backward(Tensor grad_x_perm, Tensor row_map, int k) -> Tensor");
  // y [T,h] = sum_j weights[t,j] * y_perm[row_map[t*k+j]], fp32 accumulation, a gather.
  m.def("unpermute(Tensor y_perm, Tensor row_map, Tensor weights) -> Tensor");
  // (d y_perm [M,h], d weights [T,k]) of unpermute.
  m.def(
      "unpermute_backward(Tensor grad_y, Tensor y_perm, Tensor row_map, Tensor weights) -> "
      "(Tensor, Tensor)");
  // c [M,N]: rows of group e (expert_offsets[e]..expert_offsets[e+1]) times b[e], where b is
  // [E,K,N], or [E,N,K] (nn.Linear layout) with trans_b. Empty groups allowed.
  m.def("grouped_gemm(Tensor a, Tensor b, Tensor expert_offsets, bool trans_b=False) -> Tensor");
  // Variable-K weight gradient: d b[e] = a[g]^T @ grad_c[g] ([K,N]), or grad_c[g]^T @ a[g]
  // ([N,K]) with trans_b; fp32 accumulation; zeros for empty groups.
  m.def(
      "grouped_gemm_wgrad(Tensor a, Tensor grad_c, Tensor expert_offsets, bool trans_b=False) "
      "-> Tensor");
  // gate_up [M,2I] (gate columns first) -> silu(gate) * up [M,I], fp32 math.
  m.def("swiglu(Tensor gate_up) -> Tensor");
  // d gate_up [M,2I] of swiglu; recomputes the activation.
  m.def("swiglu_backward(Tensor grad_out, Tensor gate_up) -> Tensor");
  // Packs stacked expert weights once for moe_decode: w_gate_up [E,2I,h] -> [E,ceil(I/8),h,16]
  // (per block of 8 intermediate rows, each input column's 8 gate and 8 up weights side by
  // side), w_down [E,h,I] -> [E,ceil(h/8),8*ceil(I/8),8]; zeros pad the blocks.
  m.def("pack_decode_weights(Tensor w_gate_up, Tensor w_down) -> (Tensor, Tensor)");
  // Routed (+ shared) experts of a few tokens on packed weights, inference only:
  // y [T,h] = sum_j weights[t,j] * expert_{expert_ids[t,j]}(x[t]) (+ shared(x[t]), the shared MLP
  // packed as one expert), one pass over each selected expert's weights, fp32 accumulation,
  // deterministic; ids >= E contribute zero.
  m.def(
      "moe_decode(Tensor x, Tensor weights, Tensor expert_ids, Tensor packed_gate_up, "
      "Tensor packed_down, Tensor? shared_gate_up=None, Tensor? shared_down=None) -> Tensor");
}
