// Index math shared by the CPU and CUDA kernels (host and device), so the CPU tests exercise
// the exact code the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DSMOE_HD __host__ __device__ __forceinline__
#else
#define DSMOE_HD inline
#endif

namespace dsmoe {

// Top-k selection, one candidate at a time, into a list kept sorted by descending key.
// Candidates arrive in increasing expert id; a candidate enters only if its key is strictly
// greater than the current k-th, and is placed after every equal key, so ties go to the lower
// expert id. NaN keys never enter. Returns nothing; keys/ids hold the selection so far
// (count tracks how many slots are filled, at most k).
template <typename acc_t>
DSMOE_HD void topk_insert(acc_t key, int32_t id, acc_t* keys, int32_t* ids, int k, int& count) {
  if (!(key == key)) return;  // NaN
  if (count == k && !(key > keys[k - 1])) return;
  int pos = count < k ? count : k - 1;
  while (pos > 0 && key > keys[pos - 1]) {
    keys[pos] = keys[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  keys[pos] = key;
  ids[pos] = id;
  if (count < k) ++count;
}

// d logits of a softmax row given d probs: p * (dp - sum(dp * p)).
template <typename acc_t>
DSMOE_HD acc_t softmax_backward_elem(acc_t p, acc_t dp, acc_t dot) {
  return p * (dp - dot);
}

template <typename acc_t>
DSMOE_HD acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// SwiGLU on one element: silu(g) * u, and its two partial derivatives times d out.
template <typename acc_t>
DSMOE_HD acc_t swiglu_forward_elem(acc_t g, acc_t u) {
  return g * sigmoid(g) * u;
}

template <typename acc_t>
DSMOE_HD void swiglu_backward_elem(acc_t g, acc_t u, acc_t dout, acc_t& dg, acc_t& du) {
  acc_t s = sigmoid(g);
  acc_t silu = g * s;
  du = dout * silu;
  dg = dout * u * s * (acc_t(1) + g * (acc_t(1) - s));
}

// Row of a (token, slot) pair in the flat routing table [T*k].
DSMOE_HD int64_t flat_index(int64_t token, int64_t slot, int64_t k) { return token * k + slot; }

// Rows [begin, end) of group g, clamped to [0, rows] so that malformed offsets on the device
// can never address outside the tensor.
DSMOE_HD void group_rows(const int32_t* offsets, int64_t g, int64_t rows, int64_t& begin,
                         int64_t& end) {
  int64_t b = offsets[g], e = offsets[g + 1];
  b = b < 0 ? 0 : (b > rows ? rows : b);
  e = e < b ? b : (e > rows ? rows : e);
  begin = b;
  end = e;
}

}  // namespace dsmoe
