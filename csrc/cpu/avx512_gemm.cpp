// Which GEMM the grouped GEMM uses on this CPU, per dtype (avx512_gemm.h).
#include "avx512_gemm.h"

#include "../settings.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace dsmoe::cpu {
namespace {

struct CpuFeatures {
  bool avx512_bf16 = false;
  bool amx_bf16 = false;
};

CpuFeatures read_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    const unsigned max_subleaf = eax;
    f.amx_bf16 = (edx >> 22) & 1u;
    if (max_subleaf >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) {
      f.avx512_bf16 = (eax >> 5) & 1u;
    }
  }
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = read_cpu_features();
  return f;
}

struct Kernels {
  Avx512Gemm<c10::BFloat16> bf16{};
  Avx512Gemm<float> fp32{};
  bool usable = false;  // CPU and ATen capability allow them, and they were compiled
  bool amx = false;
};

const Kernels& kernels() {
  static const Kernels k = [] {
    Kernels out;
    const auto cpu = cpu_features();
    // AVX512 state saved by the OS and not turned down by ATEN_CPU_CAPABILITY.
    out.usable = cpu.avx512_bf16 && at::get_cpu_capability() == "AVX512" &&
                 fill_avx512_gemm(out.bf16, out.fp32);
    out.amx = cpu.amx_bf16;
    return out;
  }();
  return k;
}

// true: the kernel; false: the BLAS. "auto" takes the kernel where it was measured to win.
bool want_kernel(const char* setting, CpuGemm choice) {
  if (choice != CpuGemm::kAvx512 && choice != CpuGemm::kAuto) return false;
  const Kernels& k = kernels();
  TORCH_CHECK(k.usable || choice != CpuGemm::kAvx512, "dsmoe setting ", setting,
              "=avx512: this CPU or build has no AVX512-BF16 (or ATEN_CPU_CAPABILITY is below "
              "avx512)");
  return k.usable && (choice == CpuGemm::kAvx512 || !k.amx);
}

}  // namespace

bool cpu_has_avx512_bf16() { return cpu_features().avx512_bf16; }

// Chosen per call from the settings table (settings.h): an atomic load.
const Avx512Gemm<c10::BFloat16>* bf16_gemm_kernel() {
  return want_kernel("cpu_bf16_gemm", cpu_bf16_gemm_setting()) ? &kernels().bf16 : nullptr;
}

bool bf16_gemm_in_fp32() {
  const CpuGemm choice = cpu_bf16_gemm_setting();
  if (choice != CpuGemm::kAuto) return choice == CpuGemm::kFp32;
  const CpuFeatures cpu = cpu_features();
  return !cpu.avx512_bf16 && !cpu.amx_bf16;
}

const Avx512Gemm<float>* fp32_gemm_kernel() {
  return want_kernel("cpu_fp32_gemm", cpu_fp32_gemm_setting()) ? &kernels().fp32 : nullptr;
}

// torch's mkldnn_matmul (the oneDNN fp32 path) refuses CPUs without avx512bw/vl/dq: MKL there.
const char* fp32_blas_choice() {
  return cpu_fp32_gemm_setting() == CpuGemm::kMkl || at::get_cpu_capability() != "AVX512" ? "mkl"
                                                                                          : "onednn";
}

}  // namespace dsmoe::cpu
