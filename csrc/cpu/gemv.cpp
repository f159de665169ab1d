// The gemv ops on the CPU: ATen's matrix products with the same roundings as the CUDA kernels (each
// projection in x's dtype, then the epilogue in fp32 with one rounding: the activation by chunkinfer's
// own silu_and_mul / gelu_and_mul; the norm prologue by its rms_norm). On the CPU they serve the same
// layer code as on the GPU; there is no launch count to save.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../ops.h"
#include "../register_backend.h"

namespace chunkinfer::cpu {
namespace {

// h = x (+ add), rounded once; residual_out = h; h = rms_norm(h) by chunkinfer's own rms_norm.
at::Tensor prologue(const at::Tensor& x, const GemvPrologueArgs& p) {
  at::Tensor h = p.add ? (x.to(at::kFloat) + p.add->to(at::kFloat)).to(x.scalar_type()) : x;
  if (p.residual_out) p.residual_out->copy_(h);
  if (!p.norm_weight) return h;
  static const auto rms_norm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chunkinfer::rms_norm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, bool)>();
  return rms_norm.call(h, *p.norm_weight, p.eps, p.gemma);
}

at::Tensor gemv(const at::Tensor& x_in, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                const std::optional<at::Tensor>& norm_weight, double eps, bool gemma,
                const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& residual_out) {
  const GemvArgs a = check_gemv_args("gemv", x_in, weights, biases);
  const GemvPrologueArgs pro = check_gemv_prologue("gemv", x_in, weights, norm_weight, eps, gemma, add, residual_out);
  CHUNKINFER_CHECK(x_in.device().is_cpu(), "gemv: expected CPU tensors");
  const at::Tensor x = prologue(x_in, pro);
  at::Tensor out = gemv_output(x, a.rows);
  const at::Tensor x2 = x.reshape({a.n, a.K});
  const at::Tensor o2 = out.view({a.n, a.rows});
  int64_t col = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t m = weights[i].size(0);
    const std::optional<at::Tensor> b = biases.get(i);
    o2.narrow(1, col, m).copy_(at::linear(x2, weights[i], b.has_value() && b->defined() ? *b : at::Tensor()));
    col += m;
  }
  return out;
}

at::Tensor gemv_act_and_mul(const at::Tensor& x_in, const at::Tensor& gate, const at::Tensor& up,
                            const std::string& activation, const std::string& approximate,
                            const std::optional<at::Tensor>& norm_weight, double eps, bool gemma,
                            const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& residual_out) {
  const char* op = "gemv_act_and_mul";
  check_gemv_act_and_mul_args(op, x_in, gate, up);
  const Activation act = parse_activation(op, activation, approximate);
  const GemvPrologueArgs pro = check_gemv_prologue(op, x_in, {gate, up}, norm_weight, eps, gemma, add, residual_out);
  CHUNKINFER_CHECK(x_in.device().is_cpu(), "gemv_act_and_mul: expected CPU tensors");
  const at::Tensor x = prologue(x_in, pro);
  const at::Tensor g = at::linear(x, gate), u = at::linear(x, up);
  if (act == Activation::kSilu) {
    static const auto silu = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("chunkinfer::silu_and_mul", "")
                                 .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>();
    return silu.call(g, u);
  }
  static const auto gelu =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chunkinfer::gelu_and_mul", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const std::string&)>();
  return gelu.call(g, u, act == Activation::kGeluTanh ? "tanh" : "none");
}

}  // namespace
}  // namespace chunkinfer::cpu

TORCH_LIBRARY_IMPL(chunkinfer, CPU, m) {
  chunkinfer::register_gemv<&chunkinfer::cpu::gemv, &chunkinfer::cpu::gemv_act_and_mul>(m);
}
