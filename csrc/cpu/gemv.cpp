// The gemv ops on the CPU: ATen's matrix products with the same roundings as the CUDA kernels (each
// projection in x's dtype, then the epilogue in fp32 with one rounding: the activation by chunkinfer's
// own silu_and_mul / gelu_and_mul). On the CPU they serve the same layer code as on the GPU; there is
// no launch count to save.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../ops.h"

namespace chunkinfer::cpu {
namespace {

at::Tensor gemv(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases) {
  const GemvArgs a = check_gemv_args("gemv", x, weights, biases);
  CHUNKINFER_CHECK(x.device().is_cpu(), "gemv: expected CPU tensors");
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

at::Tensor gemv_act_and_mul(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                            const std::string& activation, const std::string& approximate) {
  check_gemv_act_and_mul_args("gemv_act_and_mul", x, gate, up);
  const Activation act = parse_activation("gemv_act_and_mul", activation, approximate);
  CHUNKINFER_CHECK(x.device().is_cpu(), "gemv_act_and_mul: expected CPU tensors");
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
  m.impl("gemv", &chunkinfer::cpu::gemv);
  m.impl("gemv_act_and_mul", &chunkinfer::cpu::gemv_act_and_mul);
}
