// Every op's C++ signature: one name end to end (schema, launcher, Python wrapper).
#pragma once

#include <ATen/ATen.h>

#include "activation.h"
#include "message.h"
#include "row_layout.h"
#include <optional>
#include <string>
#include <tuple>

namespace chunkinfer {

// ---- activation (csrc/cpu/activation.cpp, csrc/cuda/activation.cu) ----
// x: [..., 2d] (gate | up) when up is absent, else gate [..., d] and up [..., d]; out: [..., d].
Activation parse_gelu_approximate(const std::string& approximate);

// ---- normalisation (csrc/cpu/layernorm.cpp, csrc/cuda/layernorm.cu) ----
// x: [..., h], weight: [h], residual: [..., h]. `gemma` scales by (1 + weight) in fp32.

// An activation call's operands as rows: element (r, c) of gate is gate[gate_rows.offset(r) + c].
struct ActRows {
  at::Tensor gate, up;  // views with the caller's storage; never copies
  int64_t rows = 0, d = 0;
  RowLayout gate_rows, up_rows, out_rows;
};
ActRows check_act_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& up,
                       const at::Tensor& out);
at::Tensor act_output_like(const at::Tensor& x, const std::optional<at::Tensor>& up);

struct NormRows {
  int64_t rows = 0, hidden = 0;
  RowLayout x_rows, out_rows, residual_rows;  // out: the normalised output (x itself when fused)
};
NormRows check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& out, double eps);
NormRows check_fused_add_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& residual,
                                       const at::Tensor& weight, double eps);

// The rows of a tensor whose last dimension is contiguous and whose leading dimensions collapse into
// at most two strided groups; or an error naming `arg`.
RowLayout row_layout(const char* op, const char* arg, const at::Tensor& t);
// The same for rows that must share one stride: that stride, or an error naming `arg`.
int64_t row_stride(const char* op, const char* arg, const at::Tensor& t);

// A float32/float16/bfloat16 tensor of at least one dimension, or an error naming op and arg.
void check_float_tensor(const char* op, const char* arg, const at::Tensor& t);
// t has ref's device and dtype, or an error naming both arguments.
void check_same(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg, const at::Tensor& ref);

// ---- attention (csrc/cpu/attention.cpp, csrc/cuda/attention.cu; checks in csrc/attention_checks.cpp) ----
// decode_attention: q [B, Hq, T, D], k_cache/v_cache [B, Hkv, cap, D], seq_lens/starts [B] int32 on
// q's device; out [B, Hq, T, D] (q's dtype), lse [B, Hq, T] fp32. Query t of batch b sits at position
// seq_lens[b] - T + t and sees keys [max(starts[b], pos - window + 1), pos] (no window when <= 0; with
// a window key j lives at slot j % cap, a ring). split_keys > 0: the keys are reduced in pieces of that
// many absolute positions, merged in order (a row's result independent of the call's other rows).
struct DecodeArgs {
  int64_t B = 0, Hq = 0, Hkv = 0, T = 0, D = 0, cap = 0;
  double scale = 0.0;  // the softmax scale, 1/sqrt(D) when not given
  int64_t window = 0;  // <= 0: none
  int64_t split_keys = 0;
};
constexpr int64_t kSplitKeysAlign = 256;  // split_keys is a multiple of every kernel's keys per load step
DecodeArgs check_decode_attention_args(const char* op, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                       const std::optional<at::Tensor>& starts, std::optional<double> scale,
                                       int64_t window, int64_t split_keys);
std::tuple<at::Tensor, at::Tensor> decode_attention_outputs(const at::Tensor& q);

// merge_attn_states: out [..., D] with lse [...] (the shape of out without its last dim), e.g.
// [B, H, T, D] and [B, H, T]. out may alias out_a or out_b, lse may alias lse_a or lse_b.
struct MergeRows {
  int64_t rows = 0, d = 0;
  int64_t out_a_stride = 0, out_b_stride = 0, out_stride = 0;  // between rows of D elements
  int64_t lse_a_stride = 0, lse_b_stride = 0, lse_stride = 0;  // between lse elements
};
MergeRows check_merge_attn_states_args(const char* op, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& out_a, const at::Tensor& lse_a,
                                       const at::Tensor& out_b, const at::Tensor& lse_b);
std::tuple<at::Tensor, at::Tensor> merge_attn_states_outputs(const at::Tensor& out_a);

// ---- rotary embedding + KV cache write (csrc/cpu/rotary.cpp, csrc/cuda/rotary.cu; checks in
// csrc/rotary_checks.cpp) ----
// q [B, T, Hq, D] (optional, rotated in place), k, v [B, T, Hkv, D], cos, sin [1 or B, T, R] (R even,
// R <= D; sin with its first half negated, so x' = x * cos + roll(x, R/2) * sin on the first R dims),
// k_cache, v_cache [B, Hkv, cap, D], index [T] int64: token t's rotated K and its V go to position
// index[t] (positions outside [0, cap) are skipped). fp32 math, one rounding.
struct RotaryArgs {
  int64_t B = 0, T = 0, Hq = 0, Hkv = 0, D = 0, R = 0, cap = 0;
  bool has_q = false;
  bool cos_per_batch = false;  // cos/sin have B rows, else one row shared by the batch
};
RotaryArgs check_rotary_kv_write_args(const char* op, const std::optional<at::Tensor>& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& index);

// ---- small-batch matrix-vector products (csrc/cpu/gemv.cpp, csrc/cuda/gemv.cu; checks in
// csrc/gemv_checks.cpp) ----
// x [..., K] contiguous with n >= 1 rows (on CUDA at most kGemvMaxRows); weights [M, K] contiguous. gemv: out [..., sum M]
// (the weights' outputs side by side, each + its bias); gemv_act_and_mul: act(x gate^T) * (x up^T)
// [..., M]. Each projection is rounded to x's dtype before its epilogue, as the unfused ops round it.
// The optional prologue of both ops: h = x (+ add), residual_out = h, then h = rms_norm(h) with
// norm_weight (Gemma's (1 + w) when gemma); the projections are of h. On CUDA it costs no launch.
constexpr int64_t kGemvMaxRows = 4;
constexpr int64_t kGemvMaxSegments = 4;
constexpr int64_t kGemvMaxXBytes = 144 * 1024;  // x's rows in one CUDA block's shared memory
struct GemvArgs {
  int64_t n = 0, K = 0, rows = 0;  // rows: output features (all segments)
};
struct GemvPrologueArgs {  // null: not given
  const at::Tensor* norm_weight = nullptr;
  const at::Tensor* add = nullptr;
  const at::Tensor* residual_out = nullptr;
  double eps = 0.0;
  bool gemma = false;
};
GemvArgs check_gemv_x(const char* op, const at::Tensor& x);
GemvArgs check_gemv_args(const char* op, const at::Tensor& x, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases);
GemvArgs check_gemv_act_and_mul_args(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                     const at::Tensor& up);
// weights: to tell residual_out apart from every input
GemvPrologueArgs check_gemv_prologue(const char* op, const at::Tensor& x, at::TensorList weights,
                                     const std::optional<at::Tensor>& norm_weight, double eps, bool gemma,
                                     const std::optional<at::Tensor>& add,
                                     const std::optional<at::Tensor>& residual_out);
Activation parse_activation(const char* op, const std::string& activation, const std::string& approximate);
// x's shape with `rows` output features in its last dimension
at::Tensor gemv_output(const at::Tensor& x, int64_t rows);

}  // namespace chunkinfer
