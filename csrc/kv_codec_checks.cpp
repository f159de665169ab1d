// Argument validation of the KV codec ops, shared by their CPU and CUDA kernels: every tensor's
// dtype, device, shape and strides against the block layout, with messages naming the argument; and
// the functional ops' outputs.
#include <utility>
#include <vector>

#include "kv_codec_ops.h"

namespace chunkinfer {
namespace {

void check_on(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref, const char* ref_arg) {
  CHUNKINFER_CHECK(t.defined(), op, ": ", arg, " is undefined");
  CHUNKINFER_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_arg, " is on ",
                   ref.device());
}

void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  CHUNKINFER_CHECK(t.scalar_type() == want, op, ": ", arg, " must be ", want, ", got ", t.scalar_type());
}

// Where each stream (index over the leading dims) of a [..., rows, width] tensor starts, in elements;
// rows of one stream must follow each other (stride width) with unit stride inside a row.
RowLayout stream_layout(const char* op, const char* arg, const at::Tensor& t) {
  const int64_t rows = t.size(-2), width = t.size(-1);
  CHUNKINFER_CHECK((width <= 1 || t.stride(-1) == 1) && (rows <= 1 || t.stride(-2) == width), op, ": ", arg,
                   " must have contiguous rows following each other (strides [..., ", width, ", 1]), got strides ",
                   t.strides(), "; call .contiguous() first");
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end() - 2);
  std::vector<int64_t> strides(t.strides().begin(), t.strides().end() - 2);
  sizes.push_back(rows * width);
  strides.push_back(1);
  return row_layout(op, arg, t.as_strided(sizes, strides));
}

void check_table(const char* op, const at::Tensor& table, const at::Tensor& ref, const char* ref_arg,
                 const char* arg = "table") {
  check_on(op, arg, table, ref, ref_arg);
  check_dtype(op, arg, table, at::kByte);
  CHUNKINFER_CHECK(table.dim() == 1 && table.size(0) == kv_codec::kTableSize && table.is_contiguous(), op,
                   ": ", arg, " must be a contiguous [", kv_codec::kTableSize,
                   "] uint8 (the exponents of codes 0..14), got ", table.sizes());
}

void check_spill(const char* op, const at::Tensor& spill, const kv_codec::Layout& l, const at::Tensor& ref,
                 const char* ref_arg, const char* arg = "spill") {
  check_on(op, arg, spill, ref, ref_arg);
  check_dtype(op, arg, spill, at::kByte);
  CHUNKINFER_CHECK(spill.dim() == 2 && spill.size(1) == l.spill_unit_bytes && spill.is_contiguous(), op,
                   ": ", arg, " must be a contiguous [capacity, ", l.spill_unit_bytes,
                   "] uint8 (one exponent plane per spilled block), got ", spill.sizes());
}

// The leading dims and shape of blocks for a [..., rows, D] tensor with this layout; fills the stream fields.
void check_blocks(const char* op, const at::Tensor& blocks, const at::Tensor& data, const char* data_arg,
                  int64_t block_rows, KVCodecArgs& a) {
  check_on(op, "blocks", blocks, data, data_arg);
  check_dtype(op, "blocks", blocks, at::kByte);
  a.rows = data.size(-2);
  a.head_dim = data.size(-1);
  a.blocks_per_stream = (a.rows + block_rows - 1) / block_rows;
  std::vector<int64_t> want(data.sizes().begin(), data.sizes().end() - 2);
  want.push_back(a.blocks_per_stream);
  want.push_back(a.layout.slot_bytes);
  CHUNKINFER_CHECK(blocks.sizes() == at::IntArrayRef(want), op, ": blocks must have shape ", at::IntArrayRef(want),
                   " (", data_arg, "'s leading dims, ceil(rows / block_rows), slot_bytes), got ", blocks.sizes());
  a.block_streams = stream_layout(op, "blocks", blocks);
  a.streams = 1;
  for (int64_t i = 0; i + 2 < data.dim(); ++i) a.streams *= data.size(i);
}

}  // namespace

void check_kv_data(const char* op, const char* arg, const at::Tensor& t) {
  CHUNKINFER_CHECK(t.defined(), op, ": ", arg, " is undefined");
  CHUNKINFER_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, op, ": ", arg,
                   " must be bfloat16 or float16 (the codec splits 16-bit floats), got ", t.scalar_type());
  CHUNKINFER_CHECK(t.dim() >= 2, op, ": ", arg, " must be [..., rows, head_dim], got shape ", t.sizes());
}

kv_codec::Layout kv_codec_layout(const char* op, at::ScalarType dtype, int64_t head_dim, int64_t block_rows,
                                 int64_t escape_capacity) {
  CHUNKINFER_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, op, ": dtype must be bfloat16 or float16, got ",
                   dtype);
  CHUNKINFER_CHECK(head_dim >= 1, op, ": head_dim must be >= 1, got ", head_dim);
  CHUNKINFER_CHECK(block_rows >= 1, op, ": block_rows must be >= 1, got ", block_rows);
  CHUNKINFER_CHECK(block_rows <= kv_codec::kMaxBlockElems / head_dim, op, ": a block of block_rows * head_dim = ",
                   block_rows, " * ", head_dim, " elements exceeds the format's ", kv_codec::kMaxBlockElems);
  const int64_t n = block_rows * head_dim;
  CHUNKINFER_CHECK(escape_capacity >= 0 && escape_capacity % kv_codec::kEscapeAlign == 0 && escape_capacity <= n, op,
                   ": escape_capacity must be a multiple of ", kv_codec::kEscapeAlign,
                   " in [0, block_rows * head_dim = ", n, "], got ", escape_capacity);
  return kv_codec::make_layout(n, escape_capacity, dtype == at::kHalf ? kv_codec::Float16Bits::kExtraPlanes
                                                                      : kv_codec::BFloat16Bits::kExtraPlanes);
}

namespace {
// What encode and decode check alike: data (x or out) against blocks, table and spill.
KVCodecArgs check_common(const char* op, const at::Tensor& data, const char* data_arg, const at::Tensor& blocks,
                         const at::Tensor& spill, const at::Tensor& table, int64_t block_rows,
                         int64_t escape_capacity) {
  check_kv_data(op, data_arg, data);
  KVCodecArgs a;
  a.layout = kv_codec_layout(op, data.scalar_type(), data.size(-1), block_rows, escape_capacity);
  a.bf16 = data.scalar_type() == at::kBFloat16;
  a.x_streams = stream_layout(op, data_arg, data);
  check_blocks(op, blocks, data, data_arg, block_rows, a);
  check_table(op, table, data, data_arg);
  check_spill(op, spill, a.layout, data, data_arg);
  a.spill_capacity = spill.size(0);
  return a;
}
}  // namespace

KVCodecArgs check_kv_encode_args(const char* op, const at::Tensor& blocks, const at::Tensor& spill,
                                 const at::Tensor& spill_used, const at::Tensor& x, const at::Tensor& table,
                                 int64_t block_rows, int64_t escape_capacity) {
  KVCodecArgs a = check_common(op, x, "x", blocks, spill, table, block_rows, escape_capacity);
  check_on(op, "spill_used", spill_used, x, "x");
  check_dtype(op, "spill_used", spill_used, at::kInt);
  CHUNKINFER_CHECK(spill_used.numel() == 1, op, ": spill_used must hold one int32 (the spill counter), got shape ",
                   spill_used.sizes());
  return a;
}

KVCodecArgs check_kv_decode_args(const char* op, const at::Tensor& out, const at::Tensor& blocks,
                                 const at::Tensor& spill, const at::Tensor& table, int64_t block_rows,
                                 int64_t escape_capacity) {
  return check_common(op, out, "out", blocks, spill, table, block_rows, escape_capacity);
}

DecodeAttentionKVCodecArgs check_decode_attention_kv_codec_args(
    const char* op, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q, const at::Tensor& k_blocks,
    const at::Tensor& k_spill, const at::Tensor& k_table, const at::Tensor& v_blocks, const at::Tensor& v_spill,
    const at::Tensor& v_table, const at::Tensor& seq_lens, const std::optional<at::Tensor>& starts,
    std::optional<double> scale, int64_t block_rows, int64_t k_escape_capacity, int64_t v_escape_capacity,
    int64_t split_keys) {
  check_kv_data(op, "q", q);
  CHUNKINFER_CHECK(q.dim() == 4, op, ": q must be [B, Hq, T, D], got shape ", q.sizes());
  DecodeAttentionKVCodecArgs a;
  a.k_layout = kv_codec_layout(op, q.scalar_type(), q.size(3), block_rows, k_escape_capacity);
  a.v_layout = kv_codec_layout(op, q.scalar_type(), q.size(3), block_rows, v_escape_capacity);
  a.block_rows = block_rows;
  for (const auto& [arg, blocks, slot] :
       {std::tuple<const char*, const at::Tensor&, int64_t>{"k_blocks", k_blocks, a.k_layout.slot_bytes},
        std::tuple<const char*, const at::Tensor&, int64_t>{"v_blocks", v_blocks, a.v_layout.slot_bytes}}) {
    check_on(op, arg, blocks, q, "q");
    check_dtype(op, arg, blocks, at::kByte);
    CHUNKINFER_CHECK(blocks.dim() == 4 && blocks.size(0) == q.size(0) && blocks.size(1) >= 1 &&
                         blocks.size(3) == slot && blocks.is_contiguous(),
                     op, ": ", arg, " must be a contiguous [B = ", q.size(0), ", Hkv, blocks, slot_bytes = ", slot,
                     "] uint8 (q's batch, its layout's slot), got ", blocks.sizes());
  }
  CHUNKINFER_CHECK(v_blocks.size(1) == k_blocks.size(1) && v_blocks.size(2) == k_blocks.size(2), op,
                   ": v_blocks must have k_blocks' heads and blocks ", k_blocks.sizes().slice(0, 3), ", got ",
                   v_blocks.sizes().slice(0, 3));
  check_table(op, k_table, q, "q", "k_table");
  check_table(op, v_table, q, "q", "v_table");
  check_spill(op, k_spill, a.k_layout, q, "q", "k_spill");
  check_spill(op, v_spill, a.v_layout, q, "q", "v_spill");
  a.k_spill_capacity = k_spill.size(0);
  a.v_spill_capacity = v_spill.size(0);
  a.blocks_per_stream = k_blocks.size(2);
  // The rest is decode_attention's: a K, V of the blocks' capacity described without data (stride 0).
  const int64_t B = q.size(0), Hkv = k_blocks.size(1), D = q.size(3);
  const at::Tensor kv_shape = at::empty({D}, q.options()).as_strided({B, Hkv, a.blocks_per_stream * block_rows, D},
                                                                      {0, 0, 0, 1});
  a.d = check_decode_attention_args(op, out, lse, q, kv_shape, kv_shape, seq_lens, starts, scale, 0, split_keys);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_encode_outputs(const char* op, const at::Tensor& x,
                                                                 int64_t block_rows, int64_t escape_capacity,
                                                                 int64_t spill_blocks) {
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
  const int64_t capacity = spill_blocks < 0 ? streams * nb : spill_blocks;
  return {at::empty(sizes, bytes), at::zeros({capacity, l.spill_unit_bytes}, bytes),
          at::zeros({1}, x.options().dtype(at::kInt))};
}

at::Tensor kv_decode_output(const char* op, const at::Tensor& blocks, int64_t rows, int64_t head_dim,
                            at::ScalarType dtype, int64_t block_rows, int64_t escape_capacity) {
  CHUNKINFER_CHECK(blocks.defined() && blocks.dim() >= 2, op, ": blocks must be [..., num_blocks, slot_bytes]");
  CHUNKINFER_CHECK(rows >= 0, op, ": rows must be >= 0, got ", rows);
  kv_codec_layout(op, dtype, head_dim, block_rows, escape_capacity);  // dtype and head_dim named if bad
  std::vector<int64_t> sizes(blocks.sizes().begin(), blocks.sizes().end() - 2);
  sizes.push_back(rows);
  sizes.push_back(head_dim);
  return at::empty(sizes, blocks.options().dtype(dtype));
}

}  // namespace chunkinfer
