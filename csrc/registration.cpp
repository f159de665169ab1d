// Every schema of the chunkinfer op library, in one place, and the Python module (build facts
// now; later the stateful classes, through pybind11). Backends add kernels with
// TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; Meta kernels live in ops.py.
#include <torch/extension.h>
#include <torch/library.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#ifdef CHUNKINFER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(chunkinfer, m) {
  // activation-and-multiply: x = gate | up, or gate = x and up given separately
  m.def("silu_and_mul(Tensor x, Tensor? up=None) -> Tensor");
  m.def("silu_and_mul_out(Tensor(a!) out, Tensor x, Tensor? up=None) -> ()");
  m.def("gelu_and_mul(Tensor x, Tensor? up=None, str approximate='none') -> Tensor");
  m.def("gelu_and_mul_out(Tensor(a!) out, Tensor x, Tensor? up=None, str approximate='none') -> ()");
  // RMSNorm with fp32 statistics; gemma=True scales by (1 + weight)
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool gemma=False) -> Tensor");
  m.def("rms_norm_out(Tensor(a!) out, Tensor x, Tensor weight, float eps, bool gemma=False) -> ()");
  // in place: residual += x; x = rms_norm(residual) * weight
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, bool gemma=False) -> ()");
  // decode attention over a preallocated cache: q [B, Hq, T, D], k_cache/v_cache [B, Hkv, cap, D],
  // seq_lens/starts [B] int32 on q's device (read there, so one CUDA graph serves every length);
  // returns out [B, Hq, T, D] and lse [B, Hq, T] (fp32, natural log); window <= 0: none
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? starts=None, float? scale=None, int window=0) -> (Tensor, Tensor)");
  m.def("decode_attention_out(Tensor(a!) out, Tensor(b!) lse, Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? starts=None, float? scale=None, int window=0) -> ()");
  // exact merge of two partial attentions over disjoint keys: out [..., D], lse [...] (fp32)
  m.def("merge_attn_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)");
  m.def("merge_attn_states_out(Tensor(a!) out, Tensor(b!) lse, Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> ()");
}

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
