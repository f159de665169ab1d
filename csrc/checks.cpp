// Argument validation shared by the CPU and CUDA kernels: everything is checked here, at the
// boundary, with messages that name the op, the argument and what was expected.
#include "ops.h"

#include <c10/util/Exception.h>

namespace chunkinfer {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_float_tensor(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " is undefined");
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", arg,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, op, ": ", arg, " must have at least one dimension, got a scalar");
}

void check_same(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_arg,
              " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " has dtype ", t.scalar_type(),
              " but ", ref_arg, " has dtype ", ref.scalar_type());
}

int64_t row_stride(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", arg,
              " must be contiguous in its last dimension (stride 1), got strides ", t.strides(),
              "; call .contiguous() first");
  // Leading dims of size > 1 must collapse into one row index: stride[a] == stride[b] * size[b]
  // for each consecutive pair a < b. The innermost one's stride is the row stride.
  int64_t innermost = -1, prev = -1;
  for (int64_t i = t.dim() - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    TORCH_CHECK(prev < 0 || t.stride(i) == t.stride(prev) * t.size(prev), op, ": ", arg,
                " of shape ", t.sizes(), " and strides ", t.strides(),
                " does not flatten to rows without a copy; call .contiguous() first");
    if (innermost < 0) innermost = i;
    prev = i;
  }
  return innermost < 0 ? t.size(-1) : t.stride(innermost);
}

Activation parse_gelu_approximate(const std::string& approximate) {
  if (approximate == "none") return Activation::kGeluErf;
  if (approximate == "tanh") return Activation::kGeluTanh;
  TORCH_CHECK(false, "gelu_and_mul: approximate must be 'none' or 'tanh', got '", approximate, "'");
}

at::Tensor act_output_like(const at::Tensor& x, const std::optional<at::Tensor>& up) {
  auto sizes = x.sizes().vec();
  TORCH_CHECK(!sizes.empty(), "activation: x must have at least one dimension");
  if (!up.has_value()) sizes.back() /= 2;
  return at::empty(sizes, x.options());
}

ActRows check_act_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& up,
                       const at::Tensor& out) {
  ActRows r;
  check_float_tensor(op, "x", x);
  check_float_tensor(op, "out", out);
  check_same(op, "out", out, "x", x);
  if (up.has_value()) {
    const at::Tensor& u = *up;
    check_float_tensor(op, "up", u);
    check_same(op, "up", u, "x (gate)", x);
    TORCH_CHECK(u.sizes() == x.sizes(), op, ": up must have the shape of gate (x) ", x.sizes(),
                ", got ", u.sizes());
    r.d = x.size(-1);
    r.gate = x;
    r.up = u;
  } else {
    TORCH_CHECK(x.size(-1) % 2 == 0, op, ": the last dimension of x holds gate | up and must be even, got ",
                x.size(-1));
    r.d = x.size(-1) / 2;
    r.gate = x.narrow(-1, 0, r.d);
    r.up = x.narrow(-1, r.d, r.d);
  }
  auto expected = x.sizes().vec();
  expected.back() = r.d;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), op, ": out must have shape ",
              at::IntArrayRef(expected), ", got ", out.sizes());
  r.rows = r.d == 0 ? 0 : x.numel() / x.size(-1);
  r.gate_stride = row_stride(op, up.has_value() ? "gate (x)" : "x", r.gate);
  r.up_stride = row_stride(op, up.has_value() ? "up" : "x", r.up);
  r.out_stride = row_stride(op, "out", out);
  TORCH_CHECK(r.rows <= 1 || r.out_stride >= r.d, op, ": the rows of out overlap (row stride ",
              r.out_stride, " < ", r.d, ")");
  return r;
}

namespace {
void check_weight(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float_tensor(op, "weight", weight);
  check_same(op, "weight", weight, "x", x);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape [",
              x.size(-1), "] (the last dimension of x), got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK(eps >= 0.0, op, ": eps must be non-negative, got ", eps);
}
}  // namespace

NormRows check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& out, double eps) {
  check_float_tensor(op, "x", x);
  check_weight(op, x, weight, eps);
  check_float_tensor(op, "out", out);
  check_same(op, "out", out, "x", x);
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out must have the shape of x ", x.sizes(), ", got ",
              out.sizes());
  NormRows r;
  r.hidden = x.size(-1);
  r.rows = r.hidden == 0 ? 0 : x.numel() / r.hidden;
  r.x_stride = row_stride(op, "x", x);
  r.out_stride = row_stride(op, "out", out);
  TORCH_CHECK(r.rows <= 1 || r.out_stride >= r.hidden, op, ": the rows of out overlap (row stride ",
              r.out_stride, " < ", r.hidden, ")");
  return r;
}

NormRows check_fused_add_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& residual,
                                       const at::Tensor& weight, double eps) {
  check_float_tensor(op, "x", x);
  check_weight(op, x, weight, eps);
  check_float_tensor(op, "residual", residual);
  check_same(op, "residual", residual, "x", x);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have the shape of x ", x.sizes(),
              ", got ", residual.sizes());
  TORCH_CHECK(!x.is_same(residual) && x.data_ptr() != residual.data_ptr(), op,
              ": x and residual must be different tensors (both are written)");
  NormRows r;
  r.hidden = x.size(-1);
  r.rows = r.hidden == 0 ? 0 : x.numel() / r.hidden;
  r.x_stride = row_stride(op, "x", x);
  r.out_stride = r.x_stride;
  r.residual_stride = row_stride(op, "residual", residual);
  TORCH_CHECK(r.rows <= 1 || (r.x_stride >= r.hidden && r.residual_stride >= r.hidden), op,
              ": the rows of x or residual overlap; both are written");
  return r;
}

}  // namespace chunkinfer
