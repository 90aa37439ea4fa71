// The decode path's packing, for callers outside the op library (dsmoe._C).
#pragma once

#include <ATen/ATen.h>

namespace dsmoe::cpu {

// pack_decode_weights into preallocated contiguous outputs of the packed shapes (such as
// tensors on huge pages), in one parallel pass; the shapes and dtype are checked.
void pack_decode_weights_into(const at::Tensor& w_gate_up, const at::Tensor& w_down, at::Tensor gate_up_out,
                              at::Tensor down_out);

}  // namespace dsmoe::cpu
