// CUDA entry points of the gemv ops; kernels in gemv_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <utility>

#include "../dispatch.h"
#include "../ops.h"
#include "../register_backend.h"
#include "gemv_kernels.cuh"
#include "torch_types.cuh"

namespace chunkinfer::cuda {
namespace {

static_assert(kGemvMaxRows == ::chunkinfer::kGemvMaxRows && kGemvMaxSegments == ::chunkinfer::kGemvMaxSegments &&
                  kGemvMaxXBytes == ::chunkinfer::kGemvMaxXBytes,
              "gemv_kernels.cuh and ops.h must agree on the limits");

// The kernel reads 16-byte vectors: x's rows, the prologue's tensors and every weight row must start
// on 16-byte boundaries, and x's rows fit in shared memory beside the weight rings.
void check_vectorised(const char* op, const GemvArgs& a, const at::Tensor& x, at::TensorList weights,
                      const GemvPrologueArgs& pro) {
  CHUNKINFER_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  const int64_t vec = 16 / static_cast<int64_t>(x.element_size());
  CHUNKINFER_CHECK(a.K % vec == 0, op, ": on CUDA in_features (", a.K, ") must be a multiple of ", vec,
                   " for ", x.scalar_type());
  CHUNKINFER_CHECK(a.n * a.K * x.element_size() <= kGemvMaxXBytes, op, ": on CUDA x's ", a.n, " rows of ", a.K,
                   " elements exceed the kernel's ", kGemvMaxXBytes, " bytes of shared memory; use a matrix product");
  CHUNKINFER_CHECK(aligned16(x.const_data_ptr()), op, ": x must be 16-byte aligned");
  for (const at::Tensor& w : weights) {
    CHUNKINFER_CHECK(aligned16(w.const_data_ptr()), op, ": every weight must be 16-byte aligned");
  }
  for (const auto& [name, t] : {std::pair{"norm_weight", pro.norm_weight}, std::pair{"add", pro.add},
                                std::pair{"residual_out", pro.residual_out}}) {
    CHUNKINFER_CHECK(!t || aligned16(t->const_data_ptr()), op, ": ", name, " must be 16-byte aligned");
  }
}

template <typename scalar_t>
GemvWeights<cuda_t<scalar_t>> weights_of(at::TensorList weights, const c10::List<std::optional<at::Tensor>>* biases) {
  GemvWeights<cuda_t<scalar_t>> w{};
  int64_t end = 0;
  w.segments = static_cast<int>(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    w.w[i] = cuda_ptr(weights[i].const_data_ptr<scalar_t>());
    end += weights[i].size(0);
    w.row_end[i] = end;
    const std::optional<at::Tensor> b = biases ? biases->get(i) : std::nullopt;
    w.bias[i] = b.has_value() && b->defined() ? cuda_ptr(b->const_data_ptr<scalar_t>()) : nullptr;
  }
  return w;
}

template <typename scalar_t>
GemvInput<cuda_t<scalar_t>> input_of(const at::Tensor& x, const GemvArgs& a, const GemvPrologueArgs& pro) {
  auto ptr = [](const at::Tensor* t) { return t ? cuda_ptr(t->const_data_ptr<scalar_t>()) : nullptr; };
  return GemvInput<cuda_t<scalar_t>>{
      cuda_ptr(x.const_data_ptr<scalar_t>()),
      ptr(pro.add),
      pro.residual_out ? cuda_ptr(pro.residual_out->mutable_data_ptr<scalar_t>()) : nullptr,
      ptr(pro.norm_weight),
      static_cast<float>(pro.eps),
      pro.gemma,
      a.K,
      static_cast<int>(a.n)};
}

at::Tensor gemv(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                const std::optional<at::Tensor>& norm_weight, double eps, bool gemma,
                const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& residual_out) {
  const GemvArgs a = check_gemv_args("gemv", x, weights, biases);
  const GemvPrologueArgs pro = check_gemv_prologue("gemv", x, weights, norm_weight, eps, gemma, add, residual_out);
  check_vectorised("gemv", a, x, weights, pro);
  at::Tensor out = gemv_output(x, a.rows);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CHUNKINFER_DISPATCH_FLOATING(x.scalar_type(), [&] {
    C10_CUDA_CHECK((launch_gemv<cuda_t<scalar_t>, GemvEpilogue::kStore>(
        cuda_ptr(out.mutable_data_ptr<scalar_t>()), a.rows, input_of<scalar_t>(x, a, pro),
        weights_of<scalar_t>(weights, &biases), a.rows, stream)));
  });
  return out;
}

template <Activation A>
void launch_act(const at::Tensor& out, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                const GemvArgs& a, const GemvPrologueArgs& pro, cudaStream_t stream) {
  const std::vector<at::Tensor> both{gate, up};
  CHUNKINFER_DISPATCH_FLOATING(x.scalar_type(), [&] {
    C10_CUDA_CHECK((launch_gemv<cuda_t<scalar_t>, GemvEpilogue::kActMul, A>(
        cuda_ptr(out.mutable_data_ptr<scalar_t>()), a.rows, input_of<scalar_t>(x, a, pro),
        weights_of<scalar_t>(both, nullptr), a.rows, stream)));
  });
}

at::Tensor gemv_act_and_mul(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                            const std::string& activation, const std::string& approximate,
                            const std::optional<at::Tensor>& norm_weight, double eps, bool gemma,
                            const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& residual_out) {
  const char* op = "gemv_act_and_mul";
  const GemvArgs a = check_gemv_act_and_mul_args(op, x, gate, up);
  const Activation act = parse_activation(op, activation, approximate);
  const GemvPrologueArgs pro = check_gemv_prologue(op, x, {gate, up}, norm_weight, eps, gemma, add, residual_out);
  check_vectorised(op, a, x, {gate, up}, pro);
  at::Tensor out = gemv_output(x, a.rows);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_activation(act, [&](auto kind) { launch_act<decltype(kind)::value>(out, x, gate, up, a, pro, stream); });
  return out;
}

}  // namespace
}  // namespace chunkinfer::cuda

TORCH_LIBRARY_IMPL(chunkinfer, CUDA, m) {
  chunkinfer::register_gemv<&chunkinfer::cuda::gemv, &chunkinfer::cuda::gemv_act_and_mul>(m);
}
