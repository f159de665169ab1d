// Every op's C++ signature: one name end to end (schema, launcher, Python wrapper).
#pragma once

#include <ATen/ATen.h>

#include "message.h"
#include "row_layout.h"
#include <optional>
#include <string>

namespace chunkinfer {

// ---- activation (csrc/cpu/activation.cpp, csrc/cuda/activation.cu) ----
// x: [..., 2d] (gate | up) when up is absent, else gate [..., d] and up [..., d]; out: [..., d].
enum class Activation { kSilu, kGeluErf, kGeluTanh };
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

}  // namespace chunkinfer
