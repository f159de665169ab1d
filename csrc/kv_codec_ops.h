// The KV codec ops' C++ declarations. Kernels: kv_encode_out, kv_decode_out in csrc/cpu/kv_codec.cpp and
// csrc/cuda/kv_codec.cu; the functional kv_encode, kv_decode shared by both in csrc/kv_codec_functional.cpp;
// checks in csrc/kv_codec_checks.cpp; the format in csrc/kv_codec_format.h. Kept apart from ops.h so that
// only the codec's own files depend on the format header.
#pragma once

#include "kv_codec_format.h"
#include "ops.h"

namespace chunkinfer {

// x / out [..., S, D] bf16 or fp16, each stream (leading index) S rows of D contiguous elements, the
// streams anywhere (two strided groups at most); blocks [..., ceil(S / block_rows), slot_bytes] uint8,
// the same leading dims, each stream's slots contiguous; spill [capacity, spill_unit_bytes] uint8
// contiguous; spill_used [1] int32; table [16] uint8. All on one device.
struct KVCodecArgs {
  int64_t streams = 0, rows = 0, head_dim = 0, blocks_per_stream = 0;
  bool bf16 = true;
  kv_codec::Layout layout;
  RowLayout x_streams;      // in elements: where stream s of x (out) starts
  RowLayout block_streams;  // in bytes: where stream s's first slot starts
  int64_t spill_capacity = 0;
};
// A bf16/fp16 tensor [..., rows, head_dim], or an error naming op and arg.
void check_kv_data(const char* op, const char* arg, const at::Tensor& t);
// The block layout of a dtype, head dim, block_rows and escape capacity, or an error naming the bad one.
kv_codec::Layout kv_codec_layout(const char* op, at::ScalarType dtype, int64_t head_dim, int64_t block_rows,
                                 int64_t escape_capacity);
KVCodecArgs check_kv_encode_args(const char* op, const at::Tensor& blocks, const at::Tensor& spill,
                                 const at::Tensor& spill_used, const at::Tensor& x, const at::Tensor& table,
                                 int64_t block_rows, int64_t escape_capacity);
KVCodecArgs check_kv_decode_args(const char* op, const at::Tensor& out, const at::Tensor& blocks,
                                 const at::Tensor& spill, const at::Tensor& table, int64_t block_rows,
                                 int64_t escape_capacity);

// The functional ops (csrc/kv_codec_functional.cpp): outputs allocated, then kv_encode_out / kv_decode_out.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_encode(const at::Tensor& x, const at::Tensor& table,
                                                         int64_t block_rows, int64_t escape_capacity,
                                                         int64_t spill_blocks);
at::Tensor kv_decode(const at::Tensor& blocks, const at::Tensor& spill, const at::Tensor& table, int64_t rows,
                     int64_t head_dim, at::ScalarType dtype, int64_t block_rows, int64_t escape_capacity);

}  // namespace chunkinfer
