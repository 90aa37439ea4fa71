// Argument checks shared by every op. Messages start with the op name and say which argument
// was wrong, what was expected and what it got.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace dsmoe {

inline std::string dtypes_str(std::initializer_list<at::ScalarType> dtypes) {
  std::ostringstream s;
  bool first = true;
  for (auto d : dtypes) {
    s << (first ? "" : "|") << c10::toString(d);
    first = false;
  }
  return s.str();
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* shape) {
  TORCH_CHECK(t.dim() == dim, "dsmoe.", op, ": ", name, " must be ", dim, "-D ", shape,
              ", got shape ", t.sizes());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  TORCH_CHECK(false, "dsmoe.", op, ": ", name, " must have dtype ", dtypes_str(allowed),
              ", got ", t.scalar_type());
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  check_dtype(op, name, t, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* other_name, const at::Tensor& other) {
  TORCH_CHECK(t.scalar_type() == other.scalar_type(), "dsmoe.", op, ": ", name,
              " must have the dtype of ", other_name, " (", other.scalar_type(), "), got ",
              t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* other_name, const at::Tensor& other) {
  TORCH_CHECK(t.device() == other.device(), "dsmoe.", op, ": ", name, " is on ", t.device(),
              " but ", other_name, " is on ", other.device(), "; all tensors must share a device");
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                       int64_t expected, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "dsmoe.", op, ": ", name, ".size(", dim, ") must be ",
              expected, " (", what, "), got ", t.size(dim), " (shape ", t.sizes(), ")");
}

// Group offsets: int32 [E+1], starting at 0, non-decreasing, ending at the row count.
// The values are read only where they live on the host (CPU kernels); CUDA kernels take them
// as given (reading them would be a device-to-host sync) and clamp every access.
inline void check_offsets_meta(const char* op, const at::Tensor& offsets) {
  check_dim(op, "expert_offsets", offsets, 1, "[num_experts + 1]");
  check_dtype(op, "expert_offsets", offsets, {at::kInt});
  TORCH_CHECK(offsets.size(0) >= 2, "dsmoe.", op,
              ": expert_offsets must hold num_experts + 1 >= 2 values, got ", offsets.size(0));
}

}  // namespace dsmoe
