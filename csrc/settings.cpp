#include "settings.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace dsmoe {
namespace {

struct Entry {
  const char* name;
  const char* env;
  std::vector<const char*> values;  // index = the enum's value; values[0] is the default
};

enum Index : int { kCpuBf16, kCpuFp32, kCudaPath, kCudaTile, kCudaVerbose, kCount };

const std::array<Entry, kCount>& entries() {
  static const std::array<Entry, kCount> e{{
      {"cpu_bf16_gemm", "DSMOE_CPU_BF16_GEMM", {"auto", "onednn", "avx512", "fp32"}},
      {"cpu_fp32_gemm", "DSMOE_CPU_FP32_GEMM", {"auto", "avx512", "onednn", "mkl"}},
      {"cuda_gemm_path", "DSMOE_GROUPED_GEMM_PATH", {"auto", "sm90", "sm80", "simt"}},
      {"cuda_gemm_tile", "DSMOE_GROUPED_GEMM_TILE", {"auto", "wide", "narrow"}},
      {"cuda_gemm_verbose", "DSMOE_GROUPED_GEMM_VERBOSE", {"0", "1"}},
  }};
  return e;
}

std::string allowed(const Entry& e) {
  std::string s;
  for (size_t i = 0; i < e.values.size(); ++i) {
    s += (i == 0 ? "'" : i + 1 == e.values.size() ? " or '" : ", '");
    s += e.values[i];
    s += "'";
  }
  return s;
}

int parse(const Entry& e, const std::string& value, const char* what) {
  for (size_t i = 0; i < e.values.size(); ++i) {
    if (value == e.values[i]) return static_cast<int>(i);
  }
  TORCH_CHECK(false, what, " must be ", allowed(e), ", got '", value, "'");
}

// -1: not read yet.
std::array<std::atomic<int>, kCount> g_values{{{-1}, {-1}, {-1}, {-1}, {-1}}};
std::mutex g_env_mutex;

int value_of(int index) {
  int v = g_values[index].load(std::memory_order_relaxed);
  if (v >= 0) return v;
  std::lock_guard<std::mutex> lock(g_env_mutex);
  v = g_values[index].load(std::memory_order_relaxed);
  if (v >= 0) return v;
  const Entry& e = entries()[index];
  const char* env = std::getenv(e.env);
  // An empty variable is unset; a bad one throws here and stays unread, so every use refuses it.
  v = env == nullptr || env[0] == '\0' ? 0 : parse(e, env, e.env);
  g_values[index].store(v, std::memory_order_relaxed);
  return v;
}

}  // namespace

CpuGemm cpu_bf16_gemm_setting() {
  // values: auto onednn avx512 fp32
  static constexpr CpuGemm map[] = {CpuGemm::kAuto, CpuGemm::kOnednn, CpuGemm::kAvx512, CpuGemm::kFp32};
  return map[value_of(kCpuBf16)];
}

CpuGemm cpu_fp32_gemm_setting() { return static_cast<CpuGemm>(value_of(kCpuFp32)); }
CudaGemmPath cuda_gemm_path_setting() { return static_cast<CudaGemmPath>(value_of(kCudaPath)); }
CudaGemmTile cuda_gemm_tile_setting() { return static_cast<CudaGemmTile>(value_of(kCudaTile)); }
bool cuda_gemm_verbose_setting() { return value_of(kCudaVerbose) == 1; }

std::map<std::string, std::string> get_settings() {
  std::map<std::string, std::string> out;
  for (int i = 0; i < kCount; ++i) out[entries()[i].name] = entries()[i].values[value_of(i)];
  return out;
}

void set_setting(const std::string& name, const std::string& value) {
  for (int i = 0; i < kCount; ++i) {
    const Entry& e = entries()[i];
    if (name == e.name) {
      const std::string what = std::string("dsmoe setting ") + e.name;
      g_values[i].store(parse(e, value, what.c_str()), std::memory_order_relaxed);
      return;
    }
  }
  std::string names;
  for (const Entry& e : entries()) names += std::string(names.empty() ? "" : ", ") + e.name;
  TORCH_CHECK(false, "dsmoe: unknown setting '", name, "'; the settings are ", names);
}

}  // namespace dsmoe
