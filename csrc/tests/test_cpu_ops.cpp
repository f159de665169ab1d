// The CPU kernels called through the dispatcher, as PyTorch calls them, against ATen in float64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

namespace {

double rel_err(const at::Tensor& out, const at::Tensor& ref) {
  return (out.to(at::kDouble) - ref).norm().item<double>() / ref.norm().item<double>();
}

TEST(CpuOps, SiluAndMulMatchesFloat64) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("chunkinfer::silu_and_mul", "")
                .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>();
  const at::Tensor x = at::randn({7, 2 * 37});
  const at::Tensor out = op.call(x, std::nullopt);
  const at::Tensor xd = x.to(at::kDouble);
  const at::Tensor ref = at::silu(xd.narrow(1, 0, 37)) * xd.narrow(1, 37, 37);
  EXPECT_LT(rel_err(out, ref), 1e-6);
}

TEST(CpuOps, FusedAddRmsNormMatchesFloat64) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("chunkinfer::fused_add_rms_norm", "")
                .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>();
  const at::Tensor x = at::randn({5, 19}), residual = at::randn({5, 19}), w = at::randn({19});
  const at::Tensor sum = residual.to(at::kDouble) + x.to(at::kDouble);
  const at::Tensor ref = sum * at::rsqrt(sum.pow(2).mean(-1, true) + 1e-6) * w.to(at::kDouble);
  op.call(x, residual, w, 1e-6, false);
  EXPECT_LT(rel_err(residual, sum), 1e-6);
  EXPECT_LT(rel_err(x, ref), 1e-6);
}

}  // namespace
