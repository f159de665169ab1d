// Every schema of the chunkinfer op library, in one place. Backends add kernels with
// TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (Meta) kernels live in ops.py.
// No Python here: the C++ tests link this file to call the ops through the dispatcher.
#include <torch/library.h>

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
}

