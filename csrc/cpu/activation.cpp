// act(gate) * up on the CPU: fp32 math, one rounding to the output dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../dispatch.h"
#include "../ops.h"
#include "../register_backend.h"
#include "vec_util.h"

namespace chunkinfer::cpu {
namespace {

// GELU as 0.5·g·erfc(−g/√2) and its tanh form as g·sigmoid(2u): the textbook 1 + erf / 1 + tanh
// cancel catastrophically for very negative g and lose every digit of the (tiny) result.
template <Activation A>
inline float act_scalar(float g) {
  if constexpr (A == Activation::kSilu) return g / (1.0f + std::exp(-g));
  if constexpr (A == Activation::kGeluErf) return 0.5f * g * std::erfc(g * -0.70710678118654752f);
  const float u = 0.79788456080286536f * (g + 0.044715f * g * g * g);
  return g / (1.0f + std::exp(-2.0f * u));
}

template <Activation A>
inline fVec act_vec(const fVec& g) {
  if constexpr (A == Activation::kSilu) return g / (fVec(1.0f) + g.neg().exp());
  if constexpr (A == Activation::kGeluErf) return fVec(0.5f) * g * (g * fVec(-0.70710678118654752f)).erfc();
  const fVec u = fVec(0.79788456080286536f) * (g + fVec(0.044715f) * g * g * g);
  return g / (fVec(1.0f) + (fVec(-2.0f) * u).exp());
}

// out = act(gate) * up over columns [begin, end) of one row.
template <typename scalar_t, Activation A>
void act_and_mul_row(scalar_t* out, const scalar_t* gate, const scalar_t* up, int64_t begin, int64_t end) {
  map2_row(
      out, gate, up, begin, end,
      [](fVec& g0, fVec& g1, const fVec& u0, const fVec& u1) {
        g0 = act_vec<A>(g0) * u0;
        g1 = act_vec<A>(g1) * u1;
      },
      [](float g, float u) { return act_scalar<A>(g) * u; });
}

void act_and_mul_out(const char* op, Activation act, const at::Tensor& out, const at::Tensor& x,
                     const std::optional<at::Tensor>& up) {
  const ActRows r = check_act_args(op, x, up, out);
  CHUNKINFER_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  if (r.rows == 0 || r.d == 0) return;
  // Work items are (row, column block), so that a few long rows (decode) still use every core.
  constexpr int64_t kBlock = 4096;
  const int64_t blocks_per_row = (r.d + kBlock - 1) / kBlock;
  with_activation(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    CHUNKINFER_DISPATCH_FLOATING(x.scalar_type(), [&] {
      const scalar_t* gate = r.gate.const_data_ptr<scalar_t>();  // rows at r.gate_rows
      const scalar_t* upp = r.up.const_data_ptr<scalar_t>();     // rows at r.up_rows
      scalar_t* o = out.mutable_data_ptr<scalar_t>();             // rows at r.out_rows
      at::parallel_for(0, r.rows * blocks_per_row, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t row = i / blocks_per_row;
          const int64_t c0 = (i % blocks_per_row) * kBlock;
          act_and_mul_row<scalar_t, A>(o + r.out_rows.offset(row), gate + r.gate_rows.offset(row),
                                       upp + r.up_rows.offset(row), c0, std::min(c0 + kBlock, r.d));
        }
      });
    });
  });
}

}  // namespace
}  // namespace chunkinfer::cpu

TORCH_LIBRARY_IMPL(chunkinfer, CPU, m) { chunkinfer::register_activation<&chunkinfer::cpu::act_and_mul_out>(m); }
