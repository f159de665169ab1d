// CUDA kernels of the attention ops: decode_attention (flash-decoding over a preallocated KV
// cache, lengths read on the device) and merge_attn_states. The kernels live in
// attention_kernels.cuh; this file checks the tensors and launches them on torch's stream.
// c10's stream header, not ATen/cuda/CUDAContext.h: that one pulls in cuSPARSE and cuBLAS headers
// that a bare toolkit (CI's) does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../ops.h"
#include "../register_backend.h"
#include "attention_kernels.cuh"
#include "torch_types.cuh"

namespace chunkinfer::cuda {
namespace {

// 16-byte vector loads need the base and every stride (of dims longer than one) 16-byte aligned.
bool vectorisable16(const at::Tensor& t) {
  if (!aligned16(t.const_data_ptr())) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && (t.stride(i) * t.element_size()) % 16 != 0) return false;
  return (t.size(-1) * t.element_size()) % 16 == 0;
}

void decode_attention_out(at::Tensor& out, at::Tensor& lse, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& seq_lens,
                          const std::optional<at::Tensor>& starts, std::optional<double> scale, int64_t window,
                          bool prefix_ready, int64_t split_keys) {
  constexpr const char* op = "decode_attention";
  const DecodeArgs a =
      check_decode_attention_args(op, out, lse, q, k_cache, v_cache, seq_lens, starts, scale, window, split_keys);
  CHUNKINFER_CHECK(a.D % 8 == 0 && a.D <= 256, op, ": head dim ", a.D,
                   " is not supported on CUDA (a multiple of 8 up to 256)");
  CHUNKINFER_CHECK(vectorisable16(k_cache) && vectorisable16(v_cache), op,
              ": k_cache and v_cache must be 16-byte aligned: their data pointer and every stride a multiple "
              "of 16 bytes (a view at an odd offset into a larger buffer is not)");
  CHUNKINFER_CHECK(a.B * a.Hkv <= std::numeric_limits<int32_t>::max() / 64, op, ": batch (", a.B,
                   ") times kv heads (", a.Hkv, ") is too large");
  CHUNKINFER_CHECK(a.B * a.Hq * a.T <= std::numeric_limits<int32_t>::max(), op, ": B * Hq * T is too large");
  if (a.B == 0 || a.Hq == 0 || a.T == 0) return;

  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int num_sms = 0, cc_major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, q.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  const bool tensor_cores = cc_major >= 8;  // mma.sync m16n8k16 for fp16/bf16

  CHUNKINFER_DISPATCH_FLOATING(q.scalar_type(), [&] {
    using T = cuda_t<scalar_t>;
    attention::DecodeParams p{};
    p.B = int(a.B);
    p.Hq = int(a.Hq);
    p.Hkv = int(a.Hkv);
    p.T = int(a.T);
    p.D = int(a.D);
    p.cap = int(a.cap);
    p.window = int(a.window > 0 ? a.window : 0);
    p.scale_log2 = float(a.scale) * attention::kLog2e;
    p.prefix_ready = prefix_ready;
    p.split_keys = int(a.split_keys);
    // fixed by shapes, capacity and split_keys alone, so a captured graph's workspace fits every replay
    p.splits = attention::decode_attention_num_splits<T>(p.B, p.Hq, p.Hkv, p.T, p.D, p.cap, num_sms, tensor_cores,
                                                         p.split_keys);
    CHUNKINFER_CHECK(p.splits <= 65535, op, ": capacity ", a.cap, " over split_keys ", a.split_keys,
                     " gives more than 65535 pieces");
    const int64_t part_rows = a.B * a.Hq * a.T * p.splits;
    at::Tensor workspace = at::empty({part_rows * (a.D + 1)}, q.options().dtype(at::kFloat));
    p.part_out = workspace.data_ptr<float>();
    p.part_lse = p.part_out + part_rows * a.D;
    p.q = q.data_ptr();
    p.k = k_cache.data_ptr();
    p.v = v_cache.data_ptr();
    p.seq_lens = seq_lens.data_ptr<int>();
    p.starts = starts.has_value() ? starts->data_ptr<int>() : nullptr;
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_st = q.stride(2);
    p.k_sb = k_cache.stride(0), p.k_sh = k_cache.stride(1), p.k_sp = k_cache.stride(2);
    p.v_sb = v_cache.stride(0), p.v_sh = v_cache.stride(1), p.v_sp = v_cache.stride(2);
    p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_st = out.stride(2);
    p.l_sb = lse.stride(0), p.l_sh = lse.stride(1), p.l_st = lse.stride(2);
    attention::launch_decode_attention<T>(p, stream, /*programmatic_launch=*/true, tensor_cores);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void merge_attn_states_out(at::Tensor& out, at::Tensor& lse, const at::Tensor& out_a, const at::Tensor& lse_a,
                           const at::Tensor& out_b, const at::Tensor& lse_b) {
  const MergeRows r = check_merge_attn_states_args("merge_attn_states", out, lse, out_a, lse_a, out_b, lse_b);
  if (r.rows == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(out_a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CHUNKINFER_DISPATCH_FLOATING(out_a.scalar_type(), [&] {
    using T = cuda_t<scalar_t>;
    attention::MergeParams p{};
    p.out_a = out_a.data_ptr();
    p.out_b = out_b.data_ptr();
    p.out = out.data_ptr();
    p.lse_a = lse_a.data_ptr<float>();
    p.lse_b = lse_b.data_ptr<float>();
    p.lse = lse.data_ptr<float>();
    p.sa = r.out_a_stride, p.sb = r.out_b_stride, p.so = r.out_stride;
    p.la = r.lse_a_stride, p.lb = r.lse_b_stride, p.lo = r.lse_stride;
    p.rows = r.rows;
    p.D = int(r.d);
    const int64_t bytes = sizeof(T);
    auto ok16 = [&](const void* ptr, int64_t stride) {
      return aligned16(ptr) && (r.rows <= 1 || (stride * bytes) % 16 == 0);
    };
    const bool vectorised = (r.d * bytes) % 16 == 0 && ok16(p.out_a, p.sa) && ok16(p.out_b, p.sb) &&
                            ok16(p.out, p.so);
    attention::launch_merge_attn_states<T>(p, vectorised, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace chunkinfer::cuda

TORCH_LIBRARY_IMPL(chunkinfer, CUDA, m) {
  chunkinfer::register_attention<&chunkinfer::cuda::decode_attention_out, &chunkinfer::cuda::merge_attn_states_out>(m);
}
