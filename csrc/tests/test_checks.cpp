// Argument validation at the op boundary: what is accepted, and that refusals name the problem.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ops.h"

using chunkinfer::check_act_args;
using chunkinfer::check_fused_add_rms_norm_args;
using chunkinfer::check_rms_norm_args;
using chunkinfer::row_layout;
using chunkinfer::RowLayout;

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

// Offsets of every row of t, as the kernels compute them.
std::vector<int64_t> offsets(const at::Tensor& t) {
  const RowLayout l = row_layout("op", "x", t);
  const int64_t rows = t.numel() / t.size(-1);
  std::vector<int64_t> out;
  for (int64_t r = 0; r < rows; ++r) out.push_back(l.offset(r));
  return out;
}

// The reference: the storage offset of each row's first element, from the tensor's own strides.
std::vector<int64_t> expected_offsets(const at::Tensor& t) {
  const at::Tensor first = t.select(-1, 0);
  const at::Tensor base = at::zeros({1}, t.options().dtype(at::kLong));
  std::vector<int64_t> out;
  const int64_t rows = first.numel();
  for (int64_t r = 0; r < rows; ++r) {
    int64_t rem = r, off = 0;
    for (int64_t i = first.dim() - 1; i >= 0; --i) {
      off += (rem % first.size(i)) * first.stride(i);
      rem /= first.size(i);
    }
    out.push_back(off);
  }
  return out;
}

TEST(RowLayout, ContiguousSlicesAndBatchedChunks) {
  const std::vector<at::Tensor> cases = {
      randn({4, 6}),
      randn({2, 3, 6}),
      randn({8, 10}).narrow(1, 5, 5),          // the up half of gate | up
      randn({2, 3, 10}).narrow(-1, 0, 5),
      randn({2, 50, 64}).narrow(1, 16, 24),    // a chunk of a batched [B, S, H] stream
      randn({3, 1, 50, 8}).narrow(2, 10, 7),   // size-1 dims are skipped
      randn({1, 1, 7}),
      randn({7}),
  };
  for (const auto& t : cases) EXPECT_EQ(offsets(t), expected_offsets(t)) << "shape " << t.sizes();
}

TEST(RowLayout, RefusesWhatNeedsThreeGroups) {
  expect_error([] { row_layout("silu_and_mul", "x", randn({6, 4}).t()); }, "contiguous in its last dimension");
  expect_error([] { row_layout("silu_and_mul", "x", randn({2, 3, 4, 6}).narrow(2, 0, 2).narrow(1, 0, 2)); },
               "do not collapse into two strided groups");
}

TEST(ActArgs, FusedAndTwoInputForms) {
  const at::Tensor x = randn({3, 5, 8});
  const at::Tensor out = at::empty({3, 5, 4});
  const auto r = check_act_args("silu_and_mul", x, std::nullopt, out);
  EXPECT_EQ(r.rows, 15);
  EXPECT_EQ(r.d, 4);
  EXPECT_EQ(r.gate_rows.offset(14), 14 * 8);
  EXPECT_EQ(r.up.data_ptr<float>() - r.gate.data_ptr<float>(), 4);
  const auto r2 = check_act_args("silu_and_mul", randn({3, 5, 4}), randn({3, 5, 4}), out);
  EXPECT_EQ(r2.rows, 15);
  EXPECT_EQ(r2.gate_rows.offset(14), 14 * 4);
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
