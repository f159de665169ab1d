// Argument validation shared by the CPU and CUDA kernels: everything is checked here, at the
// boundary, with messages that name the op, the argument and what was expected.
#include "ops.h"



namespace chunkinfer {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_float_tensor(const char* op, const char* arg, const at::Tensor& t) {
  CHUNKINFER_CHECK(t.defined(), op, ": ", arg, " is undefined");
  CHUNKINFER_CHECK(supported_dtype(t.scalar_type()), op, ": ", arg,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  CHUNKINFER_CHECK(t.dim() >= 1, op, ": ", arg, " must have at least one dimension, got a scalar");
}

void check_same(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                const at::Tensor& ref) {
  CHUNKINFER_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_arg,
              " is on ", ref.device());
  CHUNKINFER_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " has dtype ", t.scalar_type(),
              " but ", ref_arg, " has dtype ", ref.scalar_type());
}

RowLayout row_layout(const char* op, const char* arg, const at::Tensor& t) {
  CHUNKINFER_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", arg,
                   " must be contiguous in its last dimension (stride 1), got strides ", t.strides(),
                   "; call .contiguous() first");
  // Walk the leading dims inwards-out, skipping size-1 dims; a dim continues the current group when
  // stride[i] == stride[prev] * size[prev], else it opens the outer group (at most one).
  RowLayout layout;
  int64_t prev = -1, groups = 0;
  for (int64_t i = t.dim() - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    const bool continues = prev >= 0 && t.stride(i) == t.stride(prev) * t.size(prev);
    if (!continues) {
      ++groups;
      CHUNKINFER_CHECK(groups <= 2, op, ": ", arg, " of shape ", t.sizes(), " and strides ", t.strides(),
                       " has leading dimensions that do not collapse into two strided groups; "
                       "call .contiguous() first");
    }
    if (groups == 1) {
      if (prev < 0) layout.inner_stride = t.stride(i);
      layout.inner *= t.size(i);
    } else if (!continues) {
      layout.outer_stride = t.stride(i);
    }
    prev = i;
  }
  return layout;
}

int64_t row_stride(const char* op, const char* arg, const at::Tensor& t) {
  const RowLayout l = row_layout(op, arg, t);
  const int64_t rows = t.size(-1) == 0 ? 0 : t.numel() / t.size(-1);
  CHUNKINFER_CHECK(rows <= l.inner, op, ": ", arg, " of shape ", t.sizes(), " and strides ", t.strides(),
                   " does not flatten to rows of one stride; call .contiguous() first");
  return l.inner > 1 ? l.inner_stride : t.size(-1);
}

namespace {
// Rows of out must not overlap: each is written by exactly one thread.
bool rows_disjoint(const RowLayout& l, int64_t rows, int64_t width) {
  if (rows <= 1) return true;
  const bool inner_ok = l.inner <= 1 || l.inner_stride >= width;
  const bool outer_ok = rows <= l.inner || l.outer_stride >= (l.inner - 1) * l.inner_stride + width;
  return inner_ok && outer_ok;
}
}  // namespace

Activation parse_gelu_approximate(const std::string& approximate) {
  if (approximate == "none") return Activation::kGeluErf;
  if (approximate == "tanh") return Activation::kGeluTanh;
  CHUNKINFER_CHECK(false, "gelu_and_mul: approximate must be 'none' or 'tanh', got '", approximate, "'");
}

at::Tensor act_output_like(const at::Tensor& x, const std::optional<at::Tensor>& up) {
  auto sizes = x.sizes().vec();
  CHUNKINFER_CHECK(!sizes.empty(), "activation: x must have at least one dimension");
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
    CHUNKINFER_CHECK(u.sizes() == x.sizes(), op, ": up must have the shape of gate (x) ", x.sizes(),
                ", got ", u.sizes());
    r.d = x.size(-1);
    r.gate = x;
    r.up = u;
  } else {
    CHUNKINFER_CHECK(x.size(-1) % 2 == 0, op, ": the last dimension of x holds gate | up and must be even, got ",
                x.size(-1));
    r.d = x.size(-1) / 2;
    r.gate = x.narrow(-1, 0, r.d);
    r.up = x.narrow(-1, r.d, r.d);
  }
  auto expected = x.sizes().vec();
  expected.back() = r.d;
  CHUNKINFER_CHECK(out.sizes() == at::IntArrayRef(expected), op, ": out must have shape ",
              at::IntArrayRef(expected), ", got ", out.sizes());
  r.rows = r.d == 0 ? 0 : x.numel() / x.size(-1);
  r.gate_rows = row_layout(op, up.has_value() ? "gate (x)" : "x", r.gate);
  r.up_rows = row_layout(op, up.has_value() ? "up" : "x", r.up);
  r.out_rows = row_layout(op, "out", out);
  CHUNKINFER_CHECK(rows_disjoint(r.out_rows, r.rows, r.d), op, ": the rows of out overlap (strides ",
                   out.strides(), ")");
  return r;
}

namespace {
void check_weight(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float_tensor(op, "weight", weight);
  check_same(op, "weight", weight, "x", x);
  CHUNKINFER_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape [",
              x.size(-1), "] (the last dimension of x), got ", weight.sizes());
  CHUNKINFER_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  CHUNKINFER_CHECK(eps >= 0.0, op, ": eps must be non-negative, got ", eps);
}
}  // namespace

NormRows check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& out, double eps) {
  check_float_tensor(op, "x", x);
  check_weight(op, x, weight, eps);
  check_float_tensor(op, "out", out);
  check_same(op, "out", out, "x", x);
  CHUNKINFER_CHECK(out.sizes() == x.sizes(), op, ": out must have the shape of x ", x.sizes(), ", got ",
              out.sizes());
  NormRows r;
  r.hidden = x.size(-1);
  r.rows = r.hidden == 0 ? 0 : x.numel() / r.hidden;
  r.x_rows = row_layout(op, "x", x);
  r.out_rows = row_layout(op, "out", out);
  CHUNKINFER_CHECK(rows_disjoint(r.out_rows, r.rows, r.hidden), op, ": the rows of out overlap (strides ",
                   out.strides(), ")");
  return r;
}

NormRows check_fused_add_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& residual,
                                       const at::Tensor& weight, double eps) {
  check_float_tensor(op, "x", x);
  check_weight(op, x, weight, eps);
  check_float_tensor(op, "residual", residual);
  check_same(op, "residual", residual, "x", x);
  CHUNKINFER_CHECK(residual.sizes() == x.sizes(), op, ": residual must have the shape of x ", x.sizes(),
              ", got ", residual.sizes());
  CHUNKINFER_CHECK(!x.is_same(residual) && x.data_ptr() != residual.data_ptr(), op,
              ": x and residual must be different tensors (both are written)");
  NormRows r;
  r.hidden = x.size(-1);
  r.rows = r.hidden == 0 ? 0 : x.numel() / r.hidden;
  r.x_rows = row_layout(op, "x", x);
  r.out_rows = r.x_rows;
  r.residual_rows = row_layout(op, "residual", residual);
  CHUNKINFER_CHECK(rows_disjoint(r.x_rows, r.rows, r.hidden) && rows_disjoint(r.residual_rows, r.rows, r.hidden),
                   op, ": the rows of x or residual overlap; both are written");
  return r;
}

}  // namespace chunkinfer
