// How a backend registers each op family, written once for every dispatch key. A backend file holds
// its kernels and entry points and ends with one TORCH_LIBRARY_IMPL that hands them to register_*.
// The functional form of an op with an `_out` variant lives here, not in each backend: it allocates
// the outputs the schema returns and calls that backend's `_out` entry point directly (no second
// trip through the dispatcher), so every backend allocates them alike.
#pragma once

#include <torch/library.h>

#include <string>
#include <tuple>

#include "ops.h"

namespace chunkinfer {
namespace functional {

// The activation ops on a backend's act_and_mul_out(op, act, out, x, up).
template <auto ActAndMulOut>
void silu_and_mul_out(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& up) {
  ActAndMulOut("silu_and_mul", Activation::kSilu, out, x, up);
}

template <auto ActAndMulOut>
void gelu_and_mul_out(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& up,
                      const std::string& approximate) {
  ActAndMulOut("gelu_and_mul", parse_gelu_approximate(approximate), out, x, up);
}

// silu_and_mul(x, up) and gelu_and_mul(x, up, approximate): Rest is the op's trailing arguments.
template <auto Out, typename... Rest>
at::Tensor act_and_mul(const at::Tensor& x, const std::optional<at::Tensor>& up, const Rest&... rest) {
  at::Tensor out = act_output_like(x, up);
  Out(out, x, up, rest...);
  return out;
}

// rms_norm_out and fused_add_rms_norm on a backend's RmsNormOut(op, out, x, residual (null), weight, eps,
// gemma) and FusedOut(op, out (x), x, &residual, weight, eps, gemma).
template <auto RmsNormOut>
void rms_norm_out(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma) {
  RmsNormOut("rms_norm", out, x, nullptr, weight, eps, gemma);
}

template <auto FusedOut>
void fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                        bool gemma) {
  FusedOut("fused_add_rms_norm", x, x, &residual, weight, eps, gemma);
}

template <auto Out>
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma) {
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  Out(out, x, weight, eps, gemma);
  return out;
}

template <auto Out>
std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                                    const std::optional<at::Tensor>& starts,
                                                    std::optional<double> scale, int64_t window, bool prefix_ready,
                                                    int64_t split_keys) {
  auto [out, lse] = decode_attention_outputs(q);
  Out(out, lse, q, k_cache, v_cache, seq_lens, starts, scale, window, prefix_ready, split_keys);
  return {out, lse};
}

template <auto Out>
std::tuple<at::Tensor, at::Tensor> merge_attn_states(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                     const at::Tensor& out_b, const at::Tensor& lse_b) {
  auto [out, lse] = merge_attn_states_outputs(out_a);
  Out(out, lse, out_a, lse_a, out_b, lse_b);
  return {out, lse};
}

}  // namespace functional

// ActAndMulOut: void(const char* op, Activation, out, x, up), the kernel of both activation ops.
template <auto ActAndMulOut>
void register_activation(torch::Library& m) {
  constexpr auto silu_out = &functional::silu_and_mul_out<ActAndMulOut>;
  constexpr auto gelu_out = &functional::gelu_and_mul_out<ActAndMulOut>;
  m.impl("silu_and_mul", &functional::act_and_mul<silu_out>);
  m.impl("silu_and_mul_out", silu_out);
  m.impl("gelu_and_mul", &functional::act_and_mul<gelu_out, std::string>);
  m.impl("gelu_and_mul_out", gelu_out);
}

// RmsNormOut, FusedOut: void(const char* op, out, x, const at::Tensor* residual, weight, eps, gemma),
// the kernel without and with the residual add.
template <auto RmsNormOut, auto FusedOut>
void register_norm(torch::Library& m) {
  constexpr auto rms_norm_out = &functional::rms_norm_out<RmsNormOut>;
  m.impl("rms_norm", &functional::rms_norm<rms_norm_out>);
  m.impl("rms_norm_out", rms_norm_out);
  m.impl("fused_add_rms_norm", &functional::fused_add_rms_norm<FusedOut>);
}

template <auto DecodeAttentionOut, auto MergeAttnStatesOut>
void register_attention(torch::Library& m) {
  m.impl("decode_attention", &functional::decode_attention<DecodeAttentionOut>);
  m.impl("decode_attention_out", DecodeAttentionOut);
  m.impl("merge_attn_states", &functional::merge_attn_states<MergeAttnStatesOut>);
  m.impl("merge_attn_states_out", MergeAttnStatesOut);
}

template <auto RotaryKvWrite>
void register_rotary(torch::Library& m) {
  m.impl("rotary_kv_write", RotaryKvWrite);
}

template <auto Gemv, auto GemvActAndMul>
void register_gemv(torch::Library& m) {
  m.impl("gemv", Gemv);
  m.impl("gemv_act_and_mul", GemvActAndMul);
}

}  // namespace chunkinfer
