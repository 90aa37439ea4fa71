// The Python extension module dsmoe._C: importing it registers the ops (the op library is linked
// in), and build_info() reports what this build was made with. The macros come from setup.py.
#include <torch/extension.h>

#include "cpu/avx512_gemm.h"
#include "cpu/caching_allocator.h"
#include "cpu/moe_decode.h"
#include "cpu/vec_kernels.h"
#include "settings.h"

#ifndef DSMOE_VERSION
#define DSMOE_VERSION "unknown"
#endif
#ifndef DSMOE_TORCH_VERSION
#define DSMOE_TORCH_VERSION "unknown"
#endif
#ifndef DSMOE_CUDA_ARCHS
#define DSMOE_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = DSMOE_VERSION;
  info["torch_version"] = DSMOE_TORCH_VERSION;
#ifdef DSMOE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = DSMOE_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
#ifdef DSMOE_WITH_CUTLASS
  info["cutlass"] = true;
#else
  info["cutlass"] = false;
#endif
  return info;
}

// Which CPU kernels run on this machine under the settings in force (settings.h).
pybind11::dict cpu_kernels() {
  pybind11::dict info;
  info["vec_isa"] = dsmoe::cpu::vec_kernels_isa();
  info["bf16_gemm"] = dsmoe::cpu::bf16_gemm_kernel() != nullptr ? "avx512"
                      : dsmoe::cpu::bf16_gemm_in_fp32()        ? "fp32"
                                                               : "onednn";
  info["fp32_gemm"] =
      dsmoe::cpu::fp32_gemm_kernel() != nullptr ? "avx512" : dsmoe::cpu::fp32_blas_choice();
  info["cpu_avx512_bf16"] = dsmoe::cpu::cpu_has_avx512_bf16();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsmoe compiled operators (registered as torch.ops.dsmoe.*)";
  m.def("build_info", &build_info,
        "Build information: version, torch_version built against, cuda, cuda_archs, cutlass.");
  m.def(
      "empty_huge_pages_like",
      [](const at::Tensor& like) { return dsmoe::cpu::empty_huge_pages(like.sizes(), like.options()); },
      "An uninitialised contiguous CPU tensor of like's shape and dtype on transparent huge pages "
      "(like may be a meta tensor).");
  m.def("advise_huge_pages", &dsmoe::cpu::advise_huge_pages,
        "madvise(MADV_HUGEPAGE [+ MADV_COLLAPSE]) on the 2 MiB-aligned part of a CPU tensor's memory; "
        "returns whether the kernel took the hint.");
  m.def("pack_decode_weights_into", &dsmoe::cpu::pack_decode_weights_into, pybind11::arg("w_gate_up"),
        pybind11::arg("w_down"), pybind11::arg("gate_up_out"), pybind11::arg("down_out"),
        "pack_decode_weights into preallocated contiguous outputs (for packed copies on huge pages).");
  m.def("cpu_kernels", &cpu_kernels,
        "The CPU kernels chosen here: vec_isa (elementwise/gather kernels), bf16_gemm "
        "('avx512', 'fp32' or 'onednn'), fp32_gemm ('avx512', 'onednn' or 'mkl'), cpu_avx512_bf16.");
  m.def("get_settings", &dsmoe::get_settings,
        "The kernels' run-time settings (settings.h) as name -> value; the environment variables "
        "are read on first use.");
  m.def("set_setting", &dsmoe::set_setting, pybind11::arg("name"), pybind11::arg("value"),
        "Sets one kernel setting (settings.h); unknown names and values are refused.");
}
