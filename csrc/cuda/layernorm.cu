// CUDA entry points of rms_norm and fused_add_rms_norm; kernels in layernorm_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../ops.h"
#include "../register_backend.h"
#include "layernorm_kernels.cuh"
#include "torch_types.cuh"

namespace chunkinfer::cuda {
namespace {

template <bool kFused>
void rms_norm_impl(const char* op, const at::Tensor& out, const at::Tensor& x, const at::Tensor* residual,
                   const at::Tensor& weight, double eps, bool gemma) {
  const NormRows r = kFused ? check_fused_add_rms_norm_args(op, x, *residual, weight, eps)
                            : check_rms_norm_args(op, x, weight, out, eps);
  CHUNKINFER_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  if (r.rows == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CHUNKINFER_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using T = cuda_t<scalar_t>;
    T* o = cuda_ptr(out.mutable_data_ptr<scalar_t>());
    const T* in = cuda_ptr(x.const_data_ptr<scalar_t>());
    T* res = kFused ? cuda_ptr(residual->mutable_data_ptr<scalar_t>()) : nullptr;
    const T* w = cuda_ptr(weight.const_data_ptr<scalar_t>());
    const float feps = static_cast<float>(eps);
    if (gemma) {
      launch_rms_norm<T, true, kFused>(o, in, res, w, r.rows, r.hidden, r.x_rows, r.out_rows,
                                       r.residual_rows, feps, stream);
    } else {
      launch_rms_norm<T, false, kFused>(o, in, res, w, r.rows, r.hidden, r.x_rows, r.out_rows,
                                        r.residual_rows, feps, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace chunkinfer::cuda

TORCH_LIBRARY_IMPL(chunkinfer, CUDA, m) {
  chunkinfer::register_norm<&chunkinfer::cuda::rms_norm_impl<false>, &chunkinfer::cuda::rms_norm_impl<true>>(m);
}
