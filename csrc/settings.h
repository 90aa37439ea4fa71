// Run-time choices of the kernels ("how", never "what": every choice computes the same function).
// One process-wide table: each entry starts from its environment variable, read once on first use
// (a bad value is refused then, naming the variable, and again on every later use until set), and
// can be changed at any time through set_setting (dsmoe.set_backend in Python). Kernels read an
// entry per call: an atomic load, no environment lookup.
#pragma once

#include <map>
#include <string>

namespace dsmoe {

enum class CpuGemm : int { kAuto, kAvx512, kOnednn, kMkl, kFp32 };
enum class CudaGemmPath : int { kAuto, kSm90, kSm80, kSimt };
enum class CudaGemmTile : int { kAuto, kWide, kNarrow };

// The entries (name -> environment variable -> values):
//   cpu_bf16_gemm     DSMOE_CPU_BF16_GEMM         auto | onednn | avx512 | fp32
//   cpu_fp32_gemm     DSMOE_CPU_FP32_GEMM         auto | avx512 | onednn | mkl
//   cuda_gemm_path    DSMOE_GROUPED_GEMM_PATH     auto | sm90 | sm80 | simt
//   cuda_gemm_tile    DSMOE_GROUPED_GEMM_TILE     auto | wide | narrow
//   cuda_gemm_verbose DSMOE_GROUPED_GEMM_VERBOSE  0 | 1 (print every CUDA grouped GEMM's path)
CpuGemm cpu_bf16_gemm_setting();
CpuGemm cpu_fp32_gemm_setting();
CudaGemmPath cuda_gemm_path_setting();
CudaGemmTile cuda_gemm_tile_setting();
bool cuda_gemm_verbose_setting();

// Every entry as name -> value (reading the environment first if not yet done).
std::map<std::string, std::string> get_settings();
// Sets one entry; an unknown name or value is a c10::Error naming both and the allowed values.
void set_setting(const std::string& name, const std::string& value);

}  // namespace dsmoe
