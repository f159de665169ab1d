// Argument validation of the gemv ops, shared by their CPU and CUDA kernels.
#include <cmath>

#include "ops.h"

namespace chunkinfer {
namespace {

void check_weight(const char* op, const char* arg, const at::Tensor& w, const at::Tensor& x, int64_t K) {
  check_float_tensor(op, arg, w);
  check_same(op, arg, w, "x", x);
  CHUNKINFER_CHECK(w.dim() == 2 && w.size(1) == K, op, ": ", arg, " must be [out_features, ", K,
                   "] (x's last dimension), got ", w.sizes());
  CHUNKINFER_CHECK(w.is_contiguous(), op, ": ", arg, " must be contiguous");
}

// Whether two tensors' bytes share an address (storage extents, as contiguous tensors have).
bool overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto* pa = static_cast<const char*>(a.const_data_ptr());
  const auto* pb = static_cast<const char*>(b.const_data_ptr());
  return a.device() == b.device() && pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

void check_like_x(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  check_float_tensor(op, arg, t);
  check_same(op, arg, t, "x", x);
  CHUNKINFER_CHECK(t.sizes() == x.sizes(), op, ": ", arg, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  CHUNKINFER_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous, got strides ", t.strides());
}

}  // namespace

GemvPrologueArgs check_gemv_prologue(const char* op, const at::Tensor& x, at::TensorList weights,
                                     const std::optional<at::Tensor>& norm_weight, double eps, bool gemma,
                                     const std::optional<at::Tensor>& add,
                                     const std::optional<at::Tensor>& residual_out) {
  GemvPrologueArgs p;
  p.eps = eps;
  p.gemma = gemma;
  if (norm_weight.has_value() && norm_weight->defined()) {
    const at::Tensor& w = *norm_weight;
    check_float_tensor(op, "norm_weight", w);
    check_same(op, "norm_weight", w, "x", x);
    CHUNKINFER_CHECK(w.dim() == 1 && w.size(0) == x.size(-1) && w.is_contiguous(), op,
                     ": norm_weight must be a contiguous [", x.size(-1), "] (x's last dimension), got ", w.sizes());
    CHUNKINFER_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
    p.norm_weight = &w;
  }
  if (add.has_value() && add->defined()) {
    check_like_x(op, "add", *add, x);
    p.add = &*add;
  }
  if (residual_out.has_value() && residual_out->defined()) {
    const at::Tensor& r = *residual_out;
    check_like_x(op, "residual_out", r, x);
    // every block of the CUDA kernel reads x and add while the first one writes residual_out
    CHUNKINFER_CHECK(!overlap(r, x), op, ": residual_out must not share memory with x (give another buffer)");
    CHUNKINFER_CHECK(!p.add || !overlap(r, *p.add), op, ": residual_out must not share memory with add");
    CHUNKINFER_CHECK(!p.norm_weight || !overlap(r, *p.norm_weight), op,
                     ": residual_out must not share memory with norm_weight");
    for (const at::Tensor& w : weights) {
      CHUNKINFER_CHECK(!overlap(r, w), op, ": residual_out must not share memory with a weight");
    }
    p.residual_out = &r;
  }
  return p;
}

GemvArgs check_gemv_x(const char* op, const at::Tensor& x) {
  check_float_tensor(op, "x", x);
  CHUNKINFER_CHECK(x.is_contiguous(), op, ": x must be contiguous, got strides ", x.strides());
  GemvArgs a;
  a.K = x.size(-1);
  CHUNKINFER_CHECK(a.K >= 1, op, ": x's last dimension (in_features) must be >= 1");
  a.n = x.numel() / a.K;
  CHUNKINFER_CHECK(a.n >= 1, op, ": x must have at least one row (the leading dimensions' product), got 0");
  CHUNKINFER_CHECK(!x.is_cuda() || a.n <= kGemvMaxRows, op, ": on CUDA x must have 1 to ", kGemvMaxRows,
                   " rows (the leading dimensions' product), got ", a.n, "; use a matrix product for more");
  return a;
}

GemvArgs check_gemv_args(const char* op, const at::Tensor& x, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases) {
  GemvArgs a = check_gemv_x(op, x);
  const int64_t s = static_cast<int64_t>(weights.size());
  CHUNKINFER_CHECK(s >= 1 && s <= kGemvMaxSegments, op, ": takes 1 to ", kGemvMaxSegments, " weights, got ", s);
  CHUNKINFER_CHECK(static_cast<int64_t>(biases.size()) == s, op, ": biases must have one entry (a tensor or None) "
                   "per weight: ", s, " weights, ", biases.size(), " biases");
  for (int64_t i = 0; i < s; ++i) {
    const std::string name = "weights[" + std::to_string(i) + "]";
    check_weight(op, name.c_str(), weights[i], x, a.K);
    const std::optional<at::Tensor> b = biases.get(i);
    if (b.has_value() && b->defined()) {
      const std::string bname = "biases[" + std::to_string(i) + "]";
      check_float_tensor(op, bname.c_str(), *b);
      check_same(op, bname.c_str(), *b, "x", x);
      CHUNKINFER_CHECK(b->dim() == 1 && b->size(0) == weights[i].size(0) && b->is_contiguous(), op, ": ", bname,
                       " must be a contiguous [", weights[i].size(0), "] (its weight's out_features), got ",
                       b->sizes());
    }
    a.rows += weights[i].size(0);
  }
  return a;
}

GemvArgs check_gemv_act_and_mul_args(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                     const at::Tensor& up) {
  GemvArgs a = check_gemv_x(op, x);
  check_weight(op, "gate", gate, x, a.K);
  check_weight(op, "up", up, x, a.K);
  CHUNKINFER_CHECK(gate.size(0) == up.size(0), op, ": gate and up must have the same out_features, got ",
                   gate.size(0), " and ", up.size(0));
  a.rows = gate.size(0);
  return a;
}

at::Tensor gemv_output(const at::Tensor& x, int64_t rows) {
  auto sizes = x.sizes().vec();
  sizes.back() = rows;
  return at::empty(sizes, x.options());
}

Activation parse_activation(const char* op, const std::string& activation, const std::string& approximate) {
  if (activation == "silu") return Activation::kSilu;
  CHUNKINFER_CHECK(activation == "gelu", op, ": activation must be 'silu' or 'gelu', got '", activation, "'");
  if (approximate == "none") return Activation::kGeluErf;
  CHUNKINFER_CHECK(approximate == "tanh", op, ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  return Activation::kGeluTanh;
}

}  // namespace chunkinfer
