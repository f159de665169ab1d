// The gemv ops on the CPU: ATen's matrix products with the same roundings as the CUDA kernels (each
// projection in x's dtype, then the epilogue in fp32 with one rounding). On the CPU they serve the
// same layer code as on the GPU; there is no launch count to save.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops.h"

namespace chunkinfer::cpu {
namespace {

at::Tensor gemv(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases) {
  const GemvArgs a = check_gemv_args("gemv", x, weights, biases);
  CHUNKINFER_CHECK(x.device().is_cpu(), "gemv: expected CPU tensors");
  auto sizes = x.sizes().vec();
  sizes.back() = a.rows;
  at::Tensor out = at::empty(sizes, x.options());
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
  const at::Tensor g = at::linear(x, gate).to(at::kFloat), u = at::linear(x, up).to(at::kFloat);
  const at::Tensor h = act == Activation::kSilu ? at::silu(g) : at::gelu(g, act == Activation::kGeluTanh ? "tanh" : "none");
  return (h * u).to(x.scalar_type());
}

}  // namespace
}  // namespace chunkinfer::cpu

TORCH_LIBRARY_IMPL(chunkinfer, CPU, m) {
  m.impl("gemv", &chunkinfer::cpu::gemv);
  m.impl("gemv_act_and_mul", &chunkinfer::cpu::gemv_act_and_mul);
}
