// The Python module: build facts now; later the stateful classes (pinned arena, transfer engine).
#include <torch/extension.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#ifdef CHUNKINFER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
  info["cxx_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#ifdef CHUNKINFER_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(CHUNKINFER_CUDA_ARCHS);
  info["cuda_runtime_version"] = CUDART_VERSION;
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
  info["cuda_runtime_version"] = 0;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = std::string(__VERSION__);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "chunkinfer's compiled core";
  m.def("build_info", &build_info, "What this extension was built with");
}
