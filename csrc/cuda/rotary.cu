// CUDA kernel of rotary_kv_write: the new tokens' q rotated in place, k rotated and written with v
// into the cache at device-held positions. One launch replaces the ~10 elementwise kernels of
// rotate-then-index_copy per layer in a decode step (and the rotated K copy in a prefill chunk).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../dispatch.h"
#include "../ops.h"
#include "../register_backend.h"
#include "device_util.cuh"
#include "torch_types.cuh"

namespace chunkinfer::cuda {
namespace {

template <typename E>
struct RotaryParams {
  E* q;  // may be null
  const E* k;
  const E* v;
  const E* cos;
  const E* sin;
  E* k_cache;
  E* v_cache;
  const int64_t* index;
  int64_t q_sb, q_st, q_sh;
  int64_t k_sb, k_st, k_sh;
  int64_t v_sb, v_st, v_sh;
  int64_t c_sb, c_st;  // cos and sin share strides (checked); c_sb = 0 when shared by the batch
  int64_t s_sb, s_st;
  int64_t kc_sb, kc_sh, kc_sp;
  int64_t vc_sb, vc_sh, vc_sp;
  int T, Hq, Hkv, D, R, cap;
};

// Blocks (token, part); the threads of a token's parts walk its work items: q pairs, k pairs, k's
// unrotated tail, v.
template <typename E>
__global__ void rotary_kv_write_kernel(const RotaryParams<E> p) {
  allow_dependent_launch();      // the decode attention after it may start loading older keys meanwhile
  wait_for_prerequisite_grid();  // q, k, v come from the kernel before (launched early: device_util.cuh)
  const int b = blockIdx.x / p.T, t = blockIdx.x % p.T;
  const int half = p.R / 2;
  const int64_t pos = p.index[t];
  const bool write = pos >= 0 && pos < p.cap;
  const E* cs = p.cos + b * p.c_sb + t * p.c_st;
  const E* sn = p.sin + b * p.s_sb + t * p.s_st;
  const int nq = p.q ? p.Hq * half : 0, nk = p.Hkv * half, tail = p.D - p.R;
  const int nkt = p.Hkv * tail, nv = p.Hkv * p.D;
  const int total = nq + (write ? nk + nkt + nv : 0);
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.y) {
    if (i < nq + nk) {  // a rotated pair (j, j + half) of a q or k head
      const bool is_q = i < nq;
      const int w = is_q ? i : i - nq;
      const int h = w / half, j = w % half;
      const E* x = is_q ? p.q + b * p.q_sb + t * p.q_st + h * p.q_sh : p.k + b * p.k_sb + t * p.k_st + h * p.k_sh;
      const float x0 = to_float(x[j]), x1 = to_float(x[j + half]);
      const float y0 = x0 * to_float(cs[j]) + x1 * to_float(sn[j]);
      const float y1 = x1 * to_float(cs[j + half]) + x0 * to_float(sn[j + half]);
      E* y = is_q ? p.q + b * p.q_sb + t * p.q_st + h * p.q_sh : p.k_cache + b * p.kc_sb + h * p.kc_sh + pos * p.kc_sp;
      y[j] = from_float<E>(y0);
      y[j + half] = from_float<E>(y1);
    } else if (i < nq + nk + nkt) {  // k dims past the rotary dim (partial rotary): copied
      const int w = i - nq - nk, h = w / tail, j = p.R + w % tail;
      p.k_cache[b * p.kc_sb + h * p.kc_sh + pos * p.kc_sp + j] = p.k[b * p.k_sb + t * p.k_st + h * p.k_sh + j];
    } else {
      const int w = i - nq - nk - nkt, h = w / p.D, j = w % p.D;
      p.v_cache[b * p.vc_sb + h * p.vc_sh + pos * p.vc_sp + j] = p.v[b * p.v_sb + t * p.v_st + h * p.v_sh + j];
    }
  }
}

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
    // A few tokens (a decode step): their items spread over several blocks each, or one block
    // walks ~3.5k items in 14 dependent rounds (7 us per layer measured on the H200).
    const int64_t items = a.Hq * (a.R / 2) + a.Hkv * (a.R / 2 + (a.D - a.R) + a.D);
    int num_sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, k.device().index()));
    const int64_t parts = a.B * a.T >= num_sms ? 1 : std::min<int64_t>((items + 255) / 256, 16);
    launch_kernel(/*programmatic=*/true, rotary_kv_write_kernel<T>, dim3(unsigned(a.B * a.T), unsigned(parts)),
                  dim3(256), 0, stream, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace chunkinfer::cuda

TORCH_LIBRARY_IMPL(chunkinfer, CUDA, m) { chunkinfer::register_rotary<&chunkinfer::cuda::rotary_kv_write>(m); }
