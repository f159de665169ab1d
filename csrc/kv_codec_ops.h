// The KV codec ops' C++ declarations and their registration. Kernels: kv_encode_out, kv_decode_out in
// csrc/cpu/kv_codec.cpp and csrc/cuda/kv_codec.cu; checks and output allocation in csrc/kv_codec_checks.cpp;
// the format in csrc/kv_codec_format.h. Kept apart from ops.h and register_backend.h (whose pattern
// register_kv_codec follows) so that only the codec's own files depend on the format header.
#pragma once

#include <torch/library.h>

#include <tuple>

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

// decode_attention_kv_codec: decode_attention over K and V held as codec blocks [B, Hkv, nb, slot_bytes]
// (capacity nb * block_rows positions; slot_bytes from each one's escape capacity), with their spill pools and tables; the decode-attention checks
// of q, seq_lens, starts, scale, split_keys and the outputs, and the codec checks of the blocks.
struct DecodeAttentionKVCodecArgs {
  DecodeArgs d;
  kv_codec::Layout k_layout, v_layout;
  int64_t block_rows = 0, blocks_per_stream = 0, k_spill_capacity = 0, v_spill_capacity = 0;
};
DecodeAttentionKVCodecArgs check_decode_attention_kv_codec_args(
    const char* op, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q, const at::Tensor& k_blocks,
    const at::Tensor& k_spill, const at::Tensor& k_table, const at::Tensor& v_blocks, const at::Tensor& v_spill,
    const at::Tensor& v_table, const at::Tensor& seq_lens, const std::optional<at::Tensor>& starts,
    std::optional<double> scale, int64_t block_rows, int64_t k_escape_capacity, int64_t v_escape_capacity,
    int64_t split_keys);

// The functional ops' outputs: kv_encode's (blocks, spill with spill_blocks zeroed units (-1: one per
// block, the worst case), spill_used = 0) for x; kv_decode's [..., rows, head_dim] for blocks [..., nb, slot].
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_encode_outputs(const char* op, const at::Tensor& x,
                                                                 int64_t block_rows, int64_t escape_capacity,
                                                                 int64_t spill_blocks);
at::Tensor kv_decode_output(const char* op, const at::Tensor& blocks, int64_t rows, int64_t head_dim,
                            at::ScalarType dtype, int64_t block_rows, int64_t escape_capacity);

namespace functional {

template <auto EncodeOut>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_encode(const at::Tensor& x, const at::Tensor& table,
                                                         int64_t block_rows, int64_t escape_capacity,
                                                         int64_t spill_blocks) {
  auto [blocks, spill, used] = kv_encode_outputs("kv_encode", x, block_rows, escape_capacity, spill_blocks);
  EncodeOut(blocks, spill, used, x, table, block_rows, escape_capacity);
  return {blocks, spill, used};
}

template <auto DecodeOut>
at::Tensor kv_decode(const at::Tensor& blocks, const at::Tensor& spill, const at::Tensor& table, int64_t rows,
                     int64_t head_dim, at::ScalarType dtype, int64_t block_rows, int64_t escape_capacity) {
  at::Tensor out = kv_decode_output("kv_decode", blocks, rows, head_dim, dtype, block_rows, escape_capacity);
  DecodeOut(out, blocks, spill, table, block_rows, escape_capacity);
  return out;
}

}  // namespace functional

// EncodeOut, DecodeOut: a backend's kv_encode_out and kv_decode_out entry points.
template <auto EncodeOut, auto DecodeOut>
void register_kv_codec(torch::Library& m) {
  m.impl("kv_encode", &functional::kv_encode<EncodeOut>);
  m.impl("kv_encode_out", EncodeOut);
  m.impl("kv_decode", &functional::kv_decode<DecodeOut>);
  m.impl("kv_decode_out", DecodeOut);
}

}  // namespace chunkinfer
