// RMSNorm and fused residual-add + RMSNorm on the CPU: fp32 statistics, HF's rounding points.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../dispatch.h"
#include "../ops.h"
#include "../register_backend.h"
#include "vec_util.h"

namespace chunkinfer::cpu {
namespace {

// y = rmsnorm(v) * weight, with v already in out's row (fused) or in `in`.
// Llama rounds v * inv to the dtype before the weight multiply; Gemma multiplies by (1 + w) in fp32.
template <typename scalar_t, bool kGemma>
void normalise_row(scalar_t* out, const scalar_t* in, const scalar_t* w, int64_t h, float inv) {
  map2_row(
      out, in, w, 0, h,
      [inv](fVec& v0, fVec& v1, const fVec& w0, const fVec& w1) {
        v0 = v0 * fVec(inv);
        v1 = v1 * fVec(inv);
        if constexpr (kGemma) {
          v0 = v0 * (fVec(1.0f) + w0);
          v1 = v1 * (fVec(1.0f) + w1);
        } else {
          round_to<scalar_t>(v0, v1);
          v0 = v0 * w0;
          v1 = v1 * w1;
        }
      },
      [inv](float x, float wf) {
        const float v = x * inv;
        return kGemma ? v * (1.0f + wf) : round_to<scalar_t>(v) * wf;
      });
}

template <typename scalar_t>
float sum_squares(const scalar_t* in, int64_t h) {
  constexpr int64_t step = kPairStep<scalar_t>;
  fVec acc(0.0f);
  int64_t c = 0;
  for (; c + step <= h; c += step) {
    fVec v0, v1;
    load_float(in + c, v0, v1);
    acc = at::vec::fmadd(v0, v0, acc);
    acc = at::vec::fmadd(v1, v1, acc);
  }
  float s = sum_lanes(acc);
  for (; c < h; ++c) s += static_cast<float>(in[c]) * static_cast<float>(in[c]);
  return s;
}

// residual = round(residual + x), in place.
template <typename scalar_t>
void add_into_residual(scalar_t* residual, const scalar_t* x, int64_t h) {
  map2_row(
      residual, residual, x, 0, h,
      [](fVec& r0, fVec& r1, const fVec& x0, const fVec& x1) {
        r0 = r0 + x0;
        r1 = r1 + x1;
      },
      [](float r, float xv) { return r + xv; });
}

template <bool kFused>
void rms_norm_impl(const char* op, const at::Tensor& out, const at::Tensor& x, const at::Tensor* residual,
                   const at::Tensor& weight, double eps, bool gemma) {
  const NormRows r = kFused ? check_fused_add_rms_norm_args(op, x, *residual, weight, eps)
                            : check_rms_norm_args(op, x, weight, out, eps);
  CHUNKINFER_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  if (r.rows == 0) return;
  const float feps = static_cast<float>(eps);
  CHUNKINFER_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();  // [h]
    const scalar_t* xin = x.const_data_ptr<scalar_t>();     // rows at r.x_rows
    scalar_t* o = out.mutable_data_ptr<scalar_t>();          // rows at r.out_rows (x itself when fused)
    scalar_t* res = kFused ? residual->mutable_data_ptr<scalar_t>() : nullptr;  // rows at r.residual_rows
    at::parallel_for(0, r.rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* src = xin + r.x_rows.offset(row);
        if constexpr (kFused) {
          scalar_t* rrow = res + r.residual_rows.offset(row);
          add_into_residual(rrow, src, r.hidden);
          src = rrow;
        }
        const float inv = 1.0f / std::sqrt(sum_squares(src, r.hidden) / static_cast<float>(r.hidden) + feps);
        scalar_t* orow = o + r.out_rows.offset(row);
        if (gemma) {
          normalise_row<scalar_t, true>(orow, src, w, r.hidden, inv);
        } else {
          normalise_row<scalar_t, false>(orow, src, w, r.hidden, inv);
        }
      }
    });
  });
}

}  // namespace
}  // namespace chunkinfer::cpu

TORCH_LIBRARY_IMPL(chunkinfer, CPU, m) {
  chunkinfer::register_norm<&chunkinfer::cpu::rms_norm_impl<false>, &chunkinfer::cpu::rms_norm_impl<true>>(m);
}
