// The Python extension module dsmoe._C: importing it registers the ops (the op library is linked
// in), and build_info() reports what this build was made with. The macros come from setup.py.
#include <torch/extension.h>

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsmoe compiled operators (registered as torch.ops.dsmoe.*)";
  m.def("build_info", &build_info,
        "Build information: version, torch_version built against, cuda, cuda_archs, cutlass.");
}
