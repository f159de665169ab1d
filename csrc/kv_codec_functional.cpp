// The functional KV codec ops, one definition for every backend: allocate the outputs, then run the
// _out op through the dispatcher. csrc/cpu/kv_codec.cpp and csrc/cuda/kv_codec.cu register these for
// their device beside their own kv_encode_out and kv_decode_out.
#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

#include "kv_codec_ops.h"

namespace chunkinfer {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_encode(const at::Tensor& x, const at::Tensor& table,
                                                         int64_t block_rows, int64_t escape_capacity,
                                                         int64_t spill_blocks) {
  constexpr const char* op = "kv_encode";
  check_kv_data(op, "x", x);
  CHUNKINFER_CHECK(spill_blocks >= -1, op, ": spill_blocks must be >= 0, or -1 for one per block, got ", spill_blocks);
  const kv_codec::Layout l = kv_codec_layout(op, x.scalar_type(), x.size(-1), block_rows, escape_capacity);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end() - 2);
  int64_t streams = 1;
  for (int64_t s : sizes) streams *= s;
  const int64_t nb = (x.size(-2) + block_rows - 1) / block_rows;
  sizes.push_back(nb);
  sizes.push_back(l.slot_bytes);
  const auto bytes = x.options().dtype(at::kByte);
  // The pool's unused units are zeros, so the outputs depend on x and table alone.
  at::Tensor blocks = at::empty(sizes, bytes);
  at::Tensor spill = at::zeros({spill_blocks < 0 ? streams * nb : spill_blocks, l.spill_unit_bytes}, bytes);
  at::Tensor used = at::zeros({1}, x.options().dtype(at::kInt));
  static const auto encode_out =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chunkinfer::kv_encode_out", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      int64_t, int64_t)>();
  encode_out.call(blocks, spill, used, x, table, block_rows, escape_capacity);
  return {blocks, spill, used};
}

at::Tensor kv_decode(const at::Tensor& blocks, const at::Tensor& spill, const at::Tensor& table, int64_t rows,
                     int64_t head_dim, at::ScalarType dtype, int64_t block_rows, int64_t escape_capacity) {
  constexpr const char* op = "kv_decode";
  CHUNKINFER_CHECK(blocks.defined() && blocks.dim() >= 2, op, ": blocks must be [..., num_blocks, slot_bytes]");
  CHUNKINFER_CHECK(rows >= 0, op, ": rows must be >= 0, got ", rows);
  kv_codec_layout(op, dtype, head_dim, block_rows, escape_capacity);  // dtype and head_dim named if bad
  std::vector<int64_t> sizes(blocks.sizes().begin(), blocks.sizes().end() - 2);
  sizes.push_back(rows);
  sizes.push_back(head_dim);
  at::Tensor out = at::empty(sizes, blocks.options().dtype(dtype));
  static const auto decode_out =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chunkinfer::kv_decode_out", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  decode_out.call(out, blocks, spill, table, block_rows, escape_capacity);
  return out;
}

}  // namespace chunkinfer
