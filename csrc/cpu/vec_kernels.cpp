// The vec_kernels.h kernels for the baseline ISA, and the choice of build for this CPU.
#include "vec_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Version.h>

#define CPU_CAPABILITY DEFAULT
#include "vec_kernels_impl.h"

#include <string>

namespace dsmoe::cpu {

void fill_vec_kernels_default(AllVecKernels& out) { fill_all(out); }

namespace {

struct Chosen {
  AllVecKernels tables;
  const char* isa = "DEFAULT";
};

// ATen's rule for its own kernels, so ATEN_CPU_CAPABILITY=avx2/default switches these too.
Chosen choose() {
  Chosen c;
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512" && fill_vec_kernels_avx512(c.tables)) {
    c.isa = "AVX512";
  } else if ((cap == "AVX512" || cap == "AVX2") && fill_vec_kernels_avx2(c.tables)) {
    c.isa = "AVX2";
  } else {
    fill_vec_kernels_default(c.tables);
  }
  return c;
}

const Chosen& chosen() {
  static const Chosen c = choose();
  return c;
}

}  // namespace

template <>
const VecKernels<float>& vec_kernels<float>() {
  return chosen().tables.f32;
}
template <>
const VecKernels<c10::BFloat16>& vec_kernels<c10::BFloat16>() {
  return chosen().tables.bf16;
}
template <>
const VecKernels<c10::Half>& vec_kernels<c10::Half>() {
  return chosen().tables.f16;
}

const char* vec_kernels_isa() { return chosen().isa; }

}  // namespace dsmoe::cpu
