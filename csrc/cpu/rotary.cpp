// CPU kernel of rotary_kv_write: fp32 math, one rounding, tokens in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../dispatch.h"
#include "../ops.h"
#include "../register_backend.h"

namespace chunkinfer::cpu {
namespace {

template <typename T>
void rotate_row(T* y, const T* x, const T* cs, const T* sn, int64_t R) {
  const int64_t half = R / 2;
  for (int64_t j = 0; j < half; ++j) {  // both halves read before either is written (y may be x)
    const float x0 = static_cast<float>(x[j]), x1 = static_cast<float>(x[j + half]);
    const float y0 = x0 * static_cast<float>(cs[j]) + x1 * static_cast<float>(sn[j]);
    const float y1 = x1 * static_cast<float>(cs[j + half]) + x0 * static_cast<float>(sn[j + half]);
    y[j] = static_cast<T>(y0);
    y[j + half] = static_cast<T>(y1);
  }
}

void rotary_kv_write(const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& index) {
  constexpr const char* op = "rotary_kv_write";
  const RotaryArgs a = check_rotary_kv_write_args(op, q, k, v, cos, sin, k_cache, v_cache, index);
  CHUNKINFER_CHECK(k.device().is_cpu(), op, ": expected CPU tensors");
  if (a.B == 0 || a.T == 0) return;
  const int64_t* idx = index.const_data_ptr<int64_t>();
  CHUNKINFER_DISPATCH_FLOATING(k.scalar_type(), [&] {
    using T = scalar_t;
    T* qp = a.has_q ? q->mutable_data_ptr<T>() : nullptr;
    const T *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    const T *cp = cos.const_data_ptr<T>(), *sp = sin.const_data_ptr<T>();
    T *kc = k_cache.mutable_data_ptr<T>(), *vc = v_cache.mutable_data_ptr<T>();
    at::parallel_for(0, a.B * a.T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / a.T, t = bt % a.T, cb = a.cos_per_batch ? b : 0;
        const T* cs = cp + cb * cos.stride(0) + t * cos.stride(1);
        const T* sn = sp + cb * sin.stride(0) + t * sin.stride(1);
        for (int64_t h = 0; h < a.Hq && qp; ++h) {
          T* x = qp + b * q->stride(0) + t * q->stride(1) + h * q->stride(2);
          rotate_row(x, x, cs, sn, a.R);
        }
        const int64_t pos = idx[t];
        if (pos < 0 || pos >= a.cap) continue;
        for (int64_t h = 0; h < a.Hkv; ++h) {
          const T* x = kp + b * k.stride(0) + t * k.stride(1) + h * k.stride(2);
          T* y = kc + b * k_cache.stride(0) + h * k_cache.stride(1) + pos * k_cache.stride(2);
          rotate_row(y, x, cs, sn, a.R);
          std::copy(x + a.R, x + a.D, y + a.R);
          const T* xv = vp + b * v.stride(0) + t * v.stride(1) + h * v.stride(2);
          std::copy(xv, xv + a.D, vc + b * v_cache.stride(0) + h * v_cache.stride(1) + pos * v_cache.stride(2));
        }
      }
    });
  });
}

}  // namespace
}  // namespace chunkinfer::cpu

TORCH_LIBRARY_IMPL(chunkinfer, CPU, m) { chunkinfer::register_rotary<&chunkinfer::cpu::rotary_kv_write>(m); }
