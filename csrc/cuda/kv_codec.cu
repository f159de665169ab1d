// CUDA launchers of the KV codec ops (kernels and the format's summary: kv_codec_kernels.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../kv_codec_ops.h"
#include "device_util.cuh"
#include "kv_codec_kernels.cuh"

namespace chunkinfer::cuda {
namespace {

namespace kc = chunkinfer::kv_codec;

// [x: per-stream count, y and z: the streams]: see stream_index() in kv_codec_kernels.cuh.
dim3 stream_grid(const char* op, int64_t per_stream, int64_t streams) {
  constexpr int64_t kMaxStreams = int64_t{kc::cuda::kMaxGridY} * kc::cuda::kMaxGridY;
  CHUNKINFER_CHECK(per_stream < (int64_t{1} << 31) && streams <= kMaxStreams, op, ": too large for one launch (",
                   per_stream, " CTAs per stream, ", streams, " streams)");
  const int64_t y = std::min<int64_t>(streams, kc::cuda::kMaxGridY);
  return dim3(unsigned(per_stream), unsigned(y), unsigned((streams + y - 1) / y));
}

kc::cuda::Geometry geometry(const KVCodecArgs& a, const void* data) {
  kc::cuda::Geometry g{};
  g.data_streams = a.x_streams;
  g.block_streams = a.block_streams;
  g.layout = a.layout;
  g.streams = a.streams;
  g.stream_elems = a.rows * a.head_dim;
  g.blocks_per_stream = a.blocks_per_stream;
  g.spill_capacity = a.spill_capacity;
  g.data_vec = aligned16(data) && a.x_streams.strides_multiple_of(kc::cuda::kChunk);
  return g;
}

// The kernels read slots and spill units with 4-, 8- and 16-byte accesses.
void check_aligned(const char* op, const KVCodecArgs& a, const at::Tensor& blocks, const at::Tensor& spill) {
  CHUNKINFER_CHECK(aligned16(blocks.const_data_ptr()) && a.block_streams.strides_multiple_of(16), op,
                   ": on CUDA blocks must start 16-byte aligned with stream strides a multiple of 16 bytes");
  CHUNKINFER_CHECK(spill.numel() == 0 || aligned16(spill.const_data_ptr()), op,
                   ": on CUDA spill must start 16-byte aligned");
}

void kv_encode_out(const at::Tensor& blocks, const at::Tensor& spill, const at::Tensor& spill_used, const at::Tensor& x,
                   const at::Tensor& table, int64_t block_rows, int64_t escape_capacity) {
  constexpr const char* op = "kv_encode";
  const KVCodecArgs a = check_kv_encode_args(op, blocks, spill, spill_used, x, table, block_rows, escape_capacity);
  CHUNKINFER_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  check_aligned(op, a, blocks, spill);
  if (a.streams == 0 || a.rows == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  kc::cuda::EncodeParams p{};
  p.x = static_cast<const uint16_t*>(x.const_data_ptr());
  p.blocks = static_cast<uint8_t*>(blocks.mutable_data_ptr());
  p.spill = static_cast<uint8_t*>(spill.mutable_data_ptr());
  p.spill_used = spill_used.mutable_data_ptr<int>();
  p.table = table.const_data_ptr<uint8_t>();
  p.g = geometry(a, p.x);
  // A CTA per block, as many threads as 8-element chunks (up to 256; more loop), whole warps.
  const int64_t chunks = a.layout.padded_elems / kc::cuda::kChunk;
  const int threads = static_cast<int>(std::min<int64_t>(kc::cuda::kEncodeThreads, (chunks + 31) / 32 * 32));
  const dim3 grid = stream_grid(op, a.blocks_per_stream, a.streams);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (a.bf16) {
    kc::cuda::kv_encode_kernel<kc::BFloat16Bits><<<grid, threads, 0, stream>>>(p);
  } else {
    kc::cuda::kv_encode_kernel<kc::Float16Bits><<<grid, threads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kv_decode_out(const at::Tensor& out, const at::Tensor& blocks, const at::Tensor& spill, const at::Tensor& table,
                   int64_t block_rows, int64_t escape_capacity) {
  constexpr const char* op = "kv_decode";
  const KVCodecArgs a = check_kv_decode_args(op, out, blocks, spill, table, block_rows, escape_capacity);
  CHUNKINFER_CHECK(out.is_cuda(), op, ": expected CUDA tensors");
  check_aligned(op, a, blocks, spill);
  if (a.streams == 0 || a.rows == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(out.device());
  kc::cuda::DecodeParams p{};
  p.out = static_cast<uint16_t*>(out.mutable_data_ptr());
  p.blocks = static_cast<const uint8_t*>(blocks.const_data_ptr());
  p.spill = static_cast<const uint8_t*>(spill.const_data_ptr());
  p.table = table.const_data_ptr<uint8_t>();
  p.g = geometry(a, p.out);
  p.chunks_per_block = static_cast<uint32_t>((a.layout.block_elems + kc::cuda::kChunk - 1) / kc::cuda::kChunk);
  // Every chunk of a stream once: (stream chunks) / (threads * chunks per thread) CTAs per stream.
  constexpr int64_t per_cta = int64_t{kc::cuda::kDecodeThreads} * kc::cuda::kDecodeChunks;
  const int64_t stream_chunks = a.blocks_per_stream * p.chunks_per_block;
  CHUNKINFER_CHECK(stream_chunks + per_cta < (int64_t{1} << 32), op, ": a stream of ", p.g.stream_elems,
                   " elements is too long for one launch; decode it in parts");
  const dim3 grid = stream_grid(op, (stream_chunks + per_cta - 1) / per_cta, a.streams);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (a.bf16) {
    kc::cuda::kv_decode_kernel<kc::BFloat16Bits><<<grid, kc::cuda::kDecodeThreads, 0, stream>>>(p);
  } else {
    kc::cuda::kv_decode_kernel<kc::Float16Bits><<<grid, kc::cuda::kDecodeThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace chunkinfer::cuda

TORCH_LIBRARY_IMPL(chunkinfer, CUDA, m) {
  chunkinfer::register_kv_codec<&chunkinfer::cuda::kv_encode_out, &chunkinfer::cuda::kv_decode_out>(m);
}
