// The vec_kernels.h kernels built for AVX2 (the ISA of ATen's own AVX2 kernels: AVX2, FMA,
// F16C). The extension is compiled for baseline x86-64, so this file switches the target
// itself: every header with code outside the at::vec namespaces is included first, under the
// baseline ISA, and only at::vec (namespace at::vec::AVX2) and this file's internal functions
// are compiled for AVX2. They run where at::get_cpu_capability() says AVX2 (or AVX512 when
// the AVX512 build is missing).
#include "vec_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Headers that at::vec pulls in, first compiled for the baseline ISA (so that no inline function
// outside at::vec::AVX2 is emitted with AVX2 instructions).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/complex.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC's target pragma does not define the ISA macros that at::vec and sleef.h test.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "vec_kernels_impl.h"

namespace dsmoe::cpu {
bool fill_vec_kernels_avx2(AllVecKernels& out) {
  fill_all(out);
  return true;
}
}  // namespace dsmoe::cpu

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else

namespace dsmoe::cpu {
bool fill_vec_kernels_avx2(AllVecKernels&) { return false; }
}  // namespace dsmoe::cpu

#endif
