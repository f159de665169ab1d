// CUDA entry point of rotary_kv_write; kernel in rotary_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../dispatch.h"
#include "../ops.h"
#include "../register_backend.h"
#include "rotary_kernels.cuh"
#include "torch_types.cuh"

namespace chunkinfer::cuda {
namespace {

void rotary_kv_write(const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& index) {
  constexpr const char* op = "rotary_kv_write";
  const RotaryArgs a = check_rotary_kv_write_args(op, q, k, v, cos, sin, k_cache, v_cache, index);
  CHUNKINFER_CHECK(k.is_cuda(), op, ": expected CUDA tensors");
  if (a.B == 0 || a.T == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(k.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CHUNKINFER_DISPATCH_FLOATING(k.scalar_type(), [&] {
    using T = cuda_t<scalar_t>;
    RotaryParams<T> p{};
    p.q = a.has_q ? cuda_ptr(q->mutable_data_ptr<scalar_t>()) : nullptr;
    p.k = cuda_ptr(k.const_data_ptr<scalar_t>());
    p.v = cuda_ptr(v.const_data_ptr<scalar_t>());
    p.cos = cuda_ptr(cos.const_data_ptr<scalar_t>());
    p.sin = cuda_ptr(sin.const_data_ptr<scalar_t>());
    p.k_cache = cuda_ptr(k_cache.mutable_data_ptr<scalar_t>());
    p.v_cache = cuda_ptr(v_cache.mutable_data_ptr<scalar_t>());
    p.index = index.const_data_ptr<int64_t>();
    if (a.has_q) {
      p.q_sb = q->stride(0), p.q_st = q->stride(1), p.q_sh = q->stride(2);
    }
    p.k_sb = k.stride(0), p.k_st = k.stride(1), p.k_sh = k.stride(2);
    p.v_sb = v.stride(0), p.v_st = v.stride(1), p.v_sh = v.stride(2);
    p.c_sb = a.cos_per_batch ? cos.stride(0) : 0, p.c_st = cos.stride(1);
    p.s_sb = a.cos_per_batch ? sin.stride(0) : 0, p.s_st = sin.stride(1);
    p.kc_sb = k_cache.stride(0), p.kc_sh = k_cache.stride(1), p.kc_sp = k_cache.stride(2);
    p.vc_sb = v_cache.stride(0), p.vc_sh = v_cache.stride(1), p.vc_sp = v_cache.stride(2);
    p.T = int(a.T), p.Hq = int(a.Hq), p.Hkv = int(a.Hkv), p.D = int(a.D), p.R = int(a.R);
    p.cap = int(std::min<int64_t>(a.cap, std::numeric_limits<int>::max()));
    int num_sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, k.device().index()));
    launch_rotary_kv_write(p, a.B, num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace chunkinfer::cuda

TORCH_LIBRARY_IMPL(chunkinfer, CUDA, m) { chunkinfer::register_rotary<&chunkinfer::cuda::rotary_kv_write>(m); }
