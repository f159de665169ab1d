// CUDA entry points of the activation-and-multiply ops; kernels in activation_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../ops.h"
#include "activation_kernels.cuh"
#include "torch_types.cuh"

namespace chunkinfer::cuda {
namespace {

template <ActKind A>
void act_and_mul_impl(const char* op, const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& up) {
  const ActRows r = check_act_args(op, x, up, out);
  CHUNKINFER_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  if (r.rows == 0 || r.d == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CHUNKINFER_DISPATCH_FLOATING(x.scalar_type(), [&] {
    launch_act_and_mul<cuda_t<scalar_t>, A>(cuda_ptr(out.mutable_data_ptr<scalar_t>()),
                                            cuda_ptr(r.gate.const_data_ptr<scalar_t>()),
                                            cuda_ptr(r.up.const_data_ptr<scalar_t>()), r.rows, r.d,
                                            r.gate_rows, r.up_rows, r.out_rows, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void silu_and_mul_out(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& up) {
  act_and_mul_impl<ActKind::kSilu>("silu_and_mul", out, x, up);
}

void gelu_and_mul_out(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& up,
                      const std::string& approximate) {
  if (parse_gelu_approximate(approximate) == Activation::kGeluErf) {
    act_and_mul_impl<ActKind::kGeluErf>("gelu_and_mul", out, x, up);
  } else {
    act_and_mul_impl<ActKind::kGeluTanh>("gelu_and_mul", out, x, up);
  }
}

at::Tensor silu_and_mul(const at::Tensor& x, const std::optional<at::Tensor>& up) {
  at::Tensor out = act_output_like(x, up);
  silu_and_mul_out(out, x, up);
  return out;
}

at::Tensor gelu_and_mul(const at::Tensor& x, const std::optional<at::Tensor>& up, const std::string& approximate) {
  at::Tensor out = act_output_like(x, up);
  gelu_and_mul_out(out, x, up, approximate);
  return out;
}

}  // namespace
}  // namespace chunkinfer::cuda

TORCH_LIBRARY_IMPL(chunkinfer, CUDA, m) {
  m.impl("silu_and_mul", &chunkinfer::cuda::silu_and_mul);
  m.impl("silu_and_mul_out", &chunkinfer::cuda::silu_and_mul_out);
  m.impl("gelu_and_mul", &chunkinfer::cuda::gelu_and_mul);
  m.impl("gelu_and_mul_out", &chunkinfer::cuda::gelu_and_mul_out);
}
