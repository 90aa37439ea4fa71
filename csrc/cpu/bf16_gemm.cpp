// Which bf16 GEMM the grouped GEMM uses on this CPU (bf16_gemm.h).
#include "bf16_gemm.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace dsmoe::cpu {
namespace {

struct CpuBf16Features {
  bool avx512_bf16 = false;
  bool amx_bf16 = false;
};

CpuBf16Features cpu_bf16_features() {
  CpuBf16Features f;
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

const Bf16Gemm* choose() {
  static Bf16Gemm kernel;
  const char* env = std::getenv("DSMOE_CPU_BF16_GEMM");
  const std::string choice = env == nullptr ? "auto" : env;
  TORCH_CHECK(choice == "auto" || choice == "onednn" || choice == "avx512",
              "DSMOE_CPU_BF16_GEMM must be 'auto', 'onednn' or 'avx512', got '", choice, "'");
  if (choice == "onednn") return nullptr;
  const auto cpu = cpu_bf16_features();
  // AVX512 state saved by the OS and not turned down by ATEN_CPU_CAPABILITY.
  const bool usable = cpu.avx512_bf16 && at::get_cpu_capability() == "AVX512" &&
                      fill_bf16_gemm_avx512(kernel);
  TORCH_CHECK(usable || choice != "avx512",
              "DSMOE_CPU_BF16_GEMM=avx512: this CPU or build has no AVX512-BF16 (or "
              "ATEN_CPU_CAPABILITY is below avx512)");
  if (!usable || (cpu.amx_bf16 && choice == "auto")) return nullptr;
  return &kernel;
}

}  // namespace

bool cpu_has_avx512_bf16() { return cpu_bf16_features().avx512_bf16; }

const Bf16Gemm* bf16_gemm_kernel() {
  static const Bf16Gemm* chosen = choose();
  return chosen;
}

}  // namespace dsmoe::cpu
