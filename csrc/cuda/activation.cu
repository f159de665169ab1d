// CUDA entry point of the activation-and-multiply ops; kernels in activation_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../ops.h"
#include "../register_backend.h"
#include "activation_kernels.cuh"
#include "torch_types.cuh"

namespace chunkinfer::cuda {
namespace {

void act_and_mul_out(const char* op, Activation act, const at::Tensor& out, const at::Tensor& x,
                     const std::optional<at::Tensor>& up) {
  const ActRows r = check_act_args(op, x, up, out);
  CHUNKINFER_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  if (r.rows == 0 || r.d == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_activation(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    CHUNKINFER_DISPATCH_FLOATING(x.scalar_type(), [&] {
      launch_act_and_mul<cuda_t<scalar_t>, A>(cuda_ptr(out.mutable_data_ptr<scalar_t>()),
                                              cuda_ptr(r.gate.const_data_ptr<scalar_t>()),
                                              cuda_ptr(r.up.const_data_ptr<scalar_t>()), r.rows, r.d,
                                              r.gate_rows, r.up_rows, r.out_rows, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace chunkinfer::cuda

TORCH_LIBRARY_IMPL(chunkinfer, CUDA, m) { chunkinfer::register_activation<&chunkinfer::cuda::act_and_mul_out>(m); }
