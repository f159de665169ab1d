// The gemv ops on the CPU, for any number of rows. A row's projection is computed the same way however
// many rows the call holds: x's rows are widened to fp32 in groups of four (the last group padded with
// zero rows) and every group runs the same code, one 16-lane accumulator per row over K, lanes summed in
// a fixed order, then K's tail in order. So a speculative verification's rows equal one-token steps' bit
// for bit, and each weight row is read from memory once for all the rows (it stays in L1 across the
// groups). Each projection is rounded once to x's dtype (bias added in fp32), as the CUDA kernels and
// F.linear round it; the activation by chunkinfer's own silu_and_mul / gelu_and_mul; the norm prologue by
// its rms_norm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "../register_backend.h"
#include "simd16.h"

namespace chunkinfer::cpu {
namespace {

constexpr int64_t kGroupRows = 4;

// s[row * ld + m] = x[row] . w[m] for m in [m0, m1) and the rows of `groups` groups of four (x: fp32
// rows of K, w: rows of K elements of E, fp32 or bf16 as raw uint16).
template <typename E>
__attribute__((always_inline)) inline void project_groups(const float* __restrict x, int64_t groups, int64_t K,
                                                          const E* __restrict w, int64_t m0, int64_t m1,
                                                          float* __restrict s, int64_t ld) {
  for (int64_t m = m0; m < m1; ++m) {
    const E* wm = w + m * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + g * kGroupRows * K;
      v16f a0{}, a1{}, a2{}, a3{};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const v16f wv = load_row16(wm + k);
        a0 += load16(xg + k) * wv;
        a1 += load16(xg + K + k) * wv;
        a2 += load16(xg + 2 * K + k) * wv;
        a3 += load16(xg + 3 * K + k) * wv;
      }
      float t[kGroupRows] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (; k < K; ++k) {
        const float wk = load_one(wm + k);
        for (int r = 0; r < kGroupRows; ++r) t[r] += xg[r * K + k] * wk;
      }
      for (int r = 0; r < kGroupRows; ++r) s[(g * kGroupRows + r) * ld + m] = t[r];
    }
  }
}

CHUNKINFER_SIMD_CLONES
void project_groups_f32(const float* x, int64_t groups, int64_t K, const float* w, int64_t m0, int64_t m1, float* s,
                        int64_t ld) {
  project_groups(x, groups, K, w, m0, m1, s, ld);
}

CHUNKINFER_SIMD_CLONES
void project_groups_bf16(const float* x, int64_t groups, int64_t K, const uint16_t* w, int64_t m0, int64_t m1,
                         float* s, int64_t ld) {
  project_groups(x, groups, K, w, m0, m1, s, ld);
}

// s[:, col:col + M] = x4 w^T for a weight [M, K] in x's dtype; x4 [groups * 4, K] fp32. fp16 weights are
// widened a row at a time (exactly) and take the fp32 path.
void project(const at::Tensor& x4, const at::Tensor& w, at::Tensor& s, int64_t col) {
  const int64_t groups = x4.size(0) / kGroupRows, K = x4.size(1), M = w.size(0), ld = s.size(1);
  const float* x = x4.data_ptr<float>();
  float* out = s.data_ptr<float>() + col;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * groups));  // ~64 KB of work
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    switch (w.scalar_type()) {
      case at::kFloat:
        project_groups_f32(x, groups, K, w.data_ptr<float>(), m0, m1, out, ld);
        break;
      case at::kBFloat16:
        project_groups_bf16(x, groups, K, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), m0, m1,
                            out, ld);
        break;
      default: {  // fp16
        const at::Half* wh = w.data_ptr<at::Half>();
        std::vector<float> row(K);
        for (int64_t m = m0; m < m1; ++m) {
          for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(wh[m * K + k]);
          project_groups_f32(x, groups, K, row.data(), 0, 1, out + m, ld);
        }
      }
    }
  });
}

// x [n, K] widened to fp32 rows in groups of four, the last padded with zeros.
at::Tensor grouped_rows(const at::Tensor& x2) {
  const int64_t n = x2.size(0);
  at::Tensor x4 = at::zeros({(n + kGroupRows - 1) / kGroupRows * kGroupRows, x2.size(1)}, x2.options().dtype(at::kFloat));
  x4.narrow(0, 0, n).copy_(x2);
  return x4;
}

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

// The projections of h [n, K] by each weight, side by side in fp32 (+ bias), rounded once to h's dtype.
at::Tensor projections(const at::Tensor& h2, at::TensorList weights, const std::vector<at::Tensor>& biases,
                       int64_t features) {
  const int64_t n = h2.size(0);
  const at::Tensor x4 = grouped_rows(h2);
  at::Tensor s = at::empty({x4.size(0), features}, x4.options());
  int64_t col = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t m = weights[i].size(0);
    project(x4, weights[i], s, col);
    if (biases[i].defined()) s.narrow(1, col, m).add_(biases[i].to(at::kFloat));
    col += m;
  }
  return s.narrow(0, 0, n).to(h2.scalar_type());
}

at::Tensor gemv(const at::Tensor& x_in, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                const std::optional<at::Tensor>& norm_weight, double eps, bool gemma,
                const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& residual_out) {
  const GemvArgs a = check_gemv_args("gemv", x_in, weights, biases);
  const GemvPrologueArgs pro = check_gemv_prologue("gemv", x_in, weights, norm_weight, eps, gemma, add, residual_out);
  CHUNKINFER_CHECK(x_in.device().is_cpu(), "gemv: expected CPU tensors");
  const at::Tensor x = prologue(x_in, pro);
  std::vector<at::Tensor> b(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::optional<at::Tensor> bi = biases.get(i);
    if (bi.has_value()) b[i] = *bi;
  }
  at::Tensor out = gemv_output(x, a.rows);
  out.view({a.n, a.rows}).copy_(projections(x.reshape({a.n, a.K}), weights, b, a.rows));
  return out;
}

at::Tensor gemv_act_and_mul(const at::Tensor& x_in, const at::Tensor& gate, const at::Tensor& up,
                            const std::string& activation, const std::string& approximate,
                            const std::optional<at::Tensor>& norm_weight, double eps, bool gemma,
                            const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& residual_out) {
  const char* op = "gemv_act_and_mul";
  const GemvArgs a = check_gemv_act_and_mul_args(op, x_in, gate, up);
  const Activation act = parse_activation(op, activation, approximate);
  const GemvPrologueArgs pro = check_gemv_prologue(op, x_in, {gate, up}, norm_weight, eps, gemma, add, residual_out);
  CHUNKINFER_CHECK(x_in.device().is_cpu(), "gemv_act_and_mul: expected CPU tensors");
  const at::Tensor x = prologue(x_in, pro);
  // gate | up side by side, each rounded to x's dtype: the layout silu_and_mul and gelu_and_mul take
  auto sizes = x.sizes().vec();
  sizes.back() = 2 * a.rows;
  const at::Tensor gu = projections(x.reshape({a.n, a.K}), {gate, up}, {at::Tensor(), at::Tensor()}, 2 * a.rows)
                            .view(sizes);
  if (act == Activation::kSilu) {
    static const auto silu = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("chunkinfer::silu_and_mul", "")
                                 .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>();
    return silu.call(gu, std::nullopt);
  }
  static const auto gelu =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chunkinfer::gelu_and_mul", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const std::string&)>();
  return gelu.call(gu, std::nullopt, act == Activation::kGeluTanh ? "tanh" : "none");
}

}  // namespace
}  // namespace chunkinfer::cpu

TORCH_LIBRARY_IMPL(chunkinfer, CPU, m) {
  chunkinfer::register_gemv<&chunkinfer::cpu::gemv, &chunkinfer::cpu::gemv_act_and_mul>(m);
}
