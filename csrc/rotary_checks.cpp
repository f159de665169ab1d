// Argument validation of rotary_kv_write, shared by its CPU and CUDA kernels.
#include <limits>

#include "ops.h"

namespace chunkinfer {
namespace {

void check_last_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  CHUNKINFER_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", arg,
                   " must be contiguous in its last dimension (stride 1), got strides ", t.strides());
}

}  // namespace

RotaryArgs check_rotary_kv_write_args(const char* op, const std::optional<at::Tensor>& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& index) {
  check_float_tensor(op, "k", k);
  CHUNKINFER_CHECK(k.dim() == 4, op, ": k must be [B, T, Hkv, D], got shape ", k.sizes());
  RotaryArgs a;
  a.B = k.size(0);
  a.T = k.size(1);
  a.Hkv = k.size(2);
  a.D = k.size(3);
  const std::pair<const char*, const at::Tensor*> same[] = {
      {"v", &v}, {"cos", &cos}, {"sin", &sin}, {"k_cache", &k_cache}, {"v_cache", &v_cache}};
  for (const auto& [name, t] : same) {
    check_float_tensor(op, name, *t);
    check_same(op, name, *t, "k", k);
    check_last_contiguous(op, name, *t);
  }
  check_last_contiguous(op, "k", k);
  CHUNKINFER_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  if (q.has_value()) {
    check_float_tensor(op, "q", *q);
    check_same(op, "q", *q, "k", k);
    check_last_contiguous(op, "q", *q);
    CHUNKINFER_CHECK(q->dim() == 4 && q->size(0) == a.B && q->size(1) == a.T && q->size(3) == a.D, op,
                     ": q must be [B, T, Hq, D] = [", a.B, ", ", a.T, ", Hq, ", a.D, "], got ", q->sizes());
    a.Hq = q->size(2);
    a.has_q = true;
  }
  CHUNKINFER_CHECK(cos.dim() == 3 && cos.size(1) == a.T && (cos.size(0) == 1 || cos.size(0) == a.B), op,
                   ": cos must be [1 or B, T, R] with B = ", a.B, ", T = ", a.T, ", got ", cos.sizes());
  CHUNKINFER_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have cos's shape ", cos.sizes(), ", got ",
                   sin.sizes());
  a.R = cos.size(2);
  a.cos_per_batch = cos.size(0) == a.B && a.B > 1;
  CHUNKINFER_CHECK(a.R >= 2 && a.R % 2 == 0 && a.R <= a.D, op, ": the rotary dim (cos's last, ", a.R,
                   ") must be even and between 2 and the head dim ", a.D);
  CHUNKINFER_CHECK(k_cache.dim() == 4 && k_cache.size(0) == a.B && k_cache.size(1) == a.Hkv &&
                       k_cache.size(3) == a.D,
                   op, ": k_cache must be [B, Hkv, capacity, D] = [", a.B, ", ", a.Hkv, ", capacity, ", a.D,
                   "], got ", k_cache.sizes());
  CHUNKINFER_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
                   k_cache.sizes(), ", got ", v_cache.sizes());
  a.cap = k_cache.size(2);
  CHUNKINFER_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  CHUNKINFER_CHECK(index.device() == k.device(), op, ": index must be on k's device ", k.device(), ", got ",
                   index.device());
  CHUNKINFER_CHECK(index.dim() == 1 && index.size(0) == a.T, op, ": index must have shape [", a.T,
                   "] (one cache position per new token), got ", index.sizes());
  CHUNKINFER_CHECK(index.is_contiguous(), op, ": index must be contiguous");
  CHUNKINFER_CHECK(a.B * a.T <= std::numeric_limits<int32_t>::max(), op, ": B * T is too large");
  return a;
}

}  // namespace chunkinfer
