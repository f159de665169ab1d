// Argument validation at the op boundary: what is accepted, and that refusals name the problem.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

#include "ops.h"

using chunkinfer::check_act_args;
using chunkinfer::check_fused_add_rms_norm_args;
using chunkinfer::check_rms_norm_args;
using chunkinfer::row_stride;

namespace {

// Runs f, expects a c10::Error whose message contains `needle`.
template <typename F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an error mentioning '" << needle << "'";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find(needle), std::string::npos)
        << "message was: " << e.what_without_backtrace();
  }
}

at::Tensor randn(at::IntArrayRef sizes, at::ScalarType t = at::kFloat) {
  return at::randn(sizes, at::TensorOptions().dtype(t));
}

}  // namespace

TEST(RowStride, ContiguousAndSlices) {
  EXPECT_EQ(row_stride("op", "x", randn({4, 6})), 6);
  EXPECT_EQ(row_stride("op", "x", randn({2, 3, 6})), 6);
  EXPECT_EQ(row_stride("op", "x", randn({8, 10}).narrow(1, 5, 5)), 10);  // the up half of gate | up
  EXPECT_EQ(row_stride("op", "x", randn({2, 3, 10}).narrow(-1, 0, 5)), 10);
  EXPECT_EQ(row_stride("op", "x", randn({1, 1, 7})), 7);                  // one row
  EXPECT_EQ(row_stride("op", "x", randn({7})), 7);
}

TEST(RowStride, RefusesWhatDoesNotFlatten) {
  expect_error([] { row_stride("silu_and_mul", "x", randn({6, 4}).t()); }, "contiguous in its last dimension");
  // rows of a 3-D tensor sliced in the middle dim do not collapse into one stride
  expect_error([] { row_stride("silu_and_mul", "x", randn({3, 4, 6}).narrow(1, 0, 2)); }, "does not flatten");
}

TEST(ActArgs, FusedAndTwoInputForms) {
  const at::Tensor x = randn({3, 5, 8});
  const at::Tensor out = at::empty({3, 5, 4});
  const auto r = check_act_args("silu_and_mul", x, std::nullopt, out);
  EXPECT_EQ(r.rows, 15);
  EXPECT_EQ(r.d, 4);
  EXPECT_EQ(r.gate_stride, 8);
  EXPECT_EQ(r.up.data_ptr<float>() - r.gate.data_ptr<float>(), 4);
  const auto r2 = check_act_args("silu_and_mul", randn({3, 5, 4}), randn({3, 5, 4}), out);
  EXPECT_EQ(r2.rows, 15);
  EXPECT_EQ(r2.gate_stride, 4);
}

TEST(ActArgs, Refusals) {
  const at::Tensor out = at::empty({3, 2});
  expect_error([&] { check_act_args("silu_and_mul", randn({3, 5}), std::nullopt, out); }, "must be even");
  expect_error([&] { check_act_args("silu_and_mul", randn({3, 4}, at::kDouble), std::nullopt, out); },
               "float32, float16 or bfloat16");
  expect_error([&] { check_act_args("silu_and_mul", randn({3, 4}).to(at::kInt), std::nullopt, out); },
               "x must be float32");
  expect_error([&] { check_act_args("silu_and_mul", randn({3, 4}), std::nullopt, at::empty({3, 3})); },
               "out must have shape");
  expect_error([&] { check_act_args("silu_and_mul", randn({3, 4}), std::nullopt, at::empty({3, 2}, at::kHalf)); },
               "out has dtype");
  expect_error([&] { check_act_args("silu_and_mul", randn({3, 2}), randn({3, 3}), out); },
               "up must have the shape of gate");
  expect_error([&] { check_act_args("silu_and_mul", randn({3, 4}), std::nullopt, at::empty({2}).expand({3, 2})); },
               "rows of out overlap");
  expect_error([] { chunkinfer::parse_gelu_approximate("sigmoid"); }, "'none' or 'tanh'");
}

TEST(NormArgs, AcceptsAndRefuses) {
  const at::Tensor x = randn({2, 3, 16}), w = randn({16});
  const auto r = check_rms_norm_args("rms_norm", x, w, at::empty_like(x), 1e-6);
  EXPECT_EQ(r.rows, 6);
  EXPECT_EQ(r.hidden, 16);
  expect_error([&] { check_rms_norm_args("rms_norm", x, randn({15}), at::empty_like(x), 1e-6); },
               "weight must have shape [16]");
  expect_error([&] { check_rms_norm_args("rms_norm", x, w, at::empty_like(x), -1.0); }, "eps must be non-negative");
  expect_error([&] { check_rms_norm_args("rms_norm", x, w.to(at::kHalf), at::empty_like(x), 1e-6); },
               "weight has dtype");
  expect_error([&] { check_fused_add_rms_norm_args("fused_add_rms_norm", x, x, w, 1e-6); },
               "must be different tensors");
  expect_error([&] { check_fused_add_rms_norm_args("fused_add_rms_norm", x, randn({2, 3, 8}), w, 1e-6); },
               "residual must have the shape of x");
}
