// Argument validation of the attention ops, shared by their CPU and CUDA kernels: every input is
// checked here, once, with a message naming the op, the argument and what was expected.
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

#include "ops.h"

namespace chunkinfer {
namespace {

void check_lengths(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& q, int64_t B) {
  CHUNKINFER_CHECK(t.scalar_type() == at::kInt, op, ": ", arg, " must be int32, got ", t.scalar_type());
  CHUNKINFER_CHECK(t.device() == q.device(), op, ": ", arg, " must be on q's device ", q.device(), ", got ",
              t.device());
  CHUNKINFER_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", arg, " must have shape [", B,
              "] (one entry per sequence), got ", t.sizes());
  CHUNKINFER_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous");
}

void check_last_dim_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  CHUNKINFER_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", arg,
              " must be contiguous in its last dimension (stride 1), got strides ", t.strides());
}

}  // namespace

DecodeArgs check_decode_attention_args(const char* op, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                       const std::optional<at::Tensor>& starts, std::optional<double> scale,
                                       int64_t window, int64_t split_keys) {
  check_float_tensor(op, "q", q);
  check_float_tensor(op, "k_cache", k_cache);
  check_float_tensor(op, "v_cache", v_cache);
  check_same(op, "k_cache", k_cache, "q", q);
  check_same(op, "v_cache", v_cache, "q", q);
  CHUNKINFER_CHECK(q.dim() == 4, op, ": q must be [B, Hq, T, D], got shape ", q.sizes());
  CHUNKINFER_CHECK(k_cache.dim() == 4, op, ": k_cache must be [B, Hkv, capacity, D], got shape ", k_cache.sizes());
  CHUNKINFER_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  DecodeArgs a;
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.T = q.size(2);
  a.D = q.size(3);
  a.Hkv = k_cache.size(1);
  a.cap = k_cache.size(2);
  CHUNKINFER_CHECK(k_cache.size(0) == a.B, op, ": k_cache has batch ", k_cache.size(0), " but q has batch ", a.B);
  CHUNKINFER_CHECK(k_cache.size(3) == a.D, op, ": k_cache has head dim ", k_cache.size(3), " but q has head dim ",
              a.D);
  CHUNKINFER_CHECK(a.Hkv >= 1 && a.Hq % a.Hkv == 0, op, ": the query heads (", a.Hq,
              ") must be a multiple of the kv heads (", a.Hkv, ")");
  CHUNKINFER_CHECK(a.D >= 1, op, ": the head dim must be positive, got ", a.D);
  CHUNKINFER_CHECK(a.cap <= std::numeric_limits<int32_t>::max(), op, ": capacity ", a.cap,
              " exceeds the int32 positions of seq_lens");
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k_cache", k_cache);
  check_last_dim_contiguous(op, "v_cache", v_cache);
  check_lengths(op, "seq_lens", seq_lens, q, a.B);
  if (starts.has_value()) check_lengths(op, "starts", *starts, q, a.B);

  check_float_tensor(op, "out", out);
  check_same(op, "out", out, "q", q);
  CHUNKINFER_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape ", q.sizes(), ", got ", out.sizes());
  check_last_dim_contiguous(op, "out", out);
  CHUNKINFER_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  CHUNKINFER_CHECK(lse.device() == q.device(), op, ": lse must be on q's device ", q.device(), ", got ",
              lse.device());
  CHUNKINFER_CHECK(lse.dim() == 3 && lse.size(0) == a.B && lse.size(1) == a.Hq && lse.size(2) == a.T, op,
              ": lse must have shape [", a.B, ", ", a.Hq, ", ", a.T, "], got ", lse.sizes());

  a.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(a.D));
  CHUNKINFER_CHECK(std::isfinite(a.scale), op, ": scale must be finite, got ", a.scale);
  CHUNKINFER_CHECK(window <= std::numeric_limits<int32_t>::max(), op, ": window ", window, " is too large");
  a.window = window;
  CHUNKINFER_CHECK(split_keys >= 0 && split_keys % kSplitKeysAlign == 0 &&
                       split_keys <= std::numeric_limits<int32_t>::max(), op,
                   ": split_keys must be 0 or a positive multiple of ", kSplitKeysAlign, ", got ", split_keys);
  a.split_keys = split_keys;
  return a;
}

std::tuple<at::Tensor, at::Tensor> decode_attention_outputs(const at::Tensor& q) {
  CHUNKINFER_CHECK(q.dim() == 4, "decode_attention: q must be [B, Hq, T, D], got shape ", q.sizes());
  return {at::empty(q.sizes(), q.options()),
          at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))};
}

MergeRows check_merge_attn_states_args(const char* op, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& out_a, const at::Tensor& lse_a,
                                       const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_float_tensor(op, "out_a", out_a);
  check_float_tensor(op, "out_b", out_b);
  check_float_tensor(op, "out", out);
  check_same(op, "out_b", out_b, "out_a", out_a);
  check_same(op, "out", out, "out_a", out_a);
  CHUNKINFER_CHECK(out_b.sizes() == out_a.sizes(), op, ": out_b must have out_a's shape ", out_a.sizes(), ", got ",
              out_b.sizes());
  CHUNKINFER_CHECK(out.sizes() == out_a.sizes(), op, ": out must have out_a's shape ", out_a.sizes(), ", got ",
              out.sizes());
  const auto lse_shape = out_a.sizes().slice(0, out_a.dim() - 1);
  const std::pair<const char*, const at::Tensor*> lses[] = {{"lse_a", &lse_a}, {"lse_b", &lse_b}, {"lse", &lse}};
  for (const auto& [name, t] : lses) {
    CHUNKINFER_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    CHUNKINFER_CHECK(t->device() == out_a.device(), op, ": ", name, " must be on out_a's device ", out_a.device(),
                ", got ", t->device());
    CHUNKINFER_CHECK(t->sizes() == lse_shape, op, ": ", name, " must have the shape of out_a without its last dim ",
                lse_shape, ", got ", t->sizes());
  }
  MergeRows r;
  r.d = out_a.size(-1);
  r.rows = r.d == 0 ? 0 : out_a.numel() / r.d;
  r.out_a_stride = row_stride(op, "out_a", out_a);
  r.out_b_stride = row_stride(op, "out_b", out_b);
  r.out_stride = row_stride(op, "out", out);
  // an lse of shape [...] is a column of rows [..., 1]: its row stride is its element stride
  r.lse_a_stride = row_stride(op, "lse_a", lse_a.unsqueeze(-1));
  r.lse_b_stride = row_stride(op, "lse_b", lse_b.unsqueeze(-1));
  r.lse_stride = row_stride(op, "lse", lse.unsqueeze(-1));
  CHUNKINFER_CHECK(r.rows <= 1 || (r.out_stride >= r.d && r.lse_stride >= 1), op,
              ": the rows of out or lse overlap");
  return r;
}

std::tuple<at::Tensor, at::Tensor> merge_attn_states_outputs(const at::Tensor& out_a) {
  CHUNKINFER_CHECK(out_a.dim() >= 1, "merge_attn_states: out_a must have at least one dimension, got a scalar");
  return {at::empty(out_a.sizes(), out_a.options()),
          at::empty(out_a.sizes().slice(0, out_a.dim() - 1), out_a.options().dtype(at::kFloat))};
}

}  // namespace chunkinfer
