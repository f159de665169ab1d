// CPU kernels of the KV codec (format: csrc/kv_codec_format.h): blocks in parallel, each encoded or
// decoded by the format header's block functions, which a CPU attention loop can call per tile too.
// Spill slots are handed out in block order (stream-major), so the CPU's output is deterministic
// and equals the plain-PyTorch reference byte for byte.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "../kv_codec_ops.h"
#include "simd16.h"

namespace chunkinfer::cpu {

// kv_codec::kCodesLoopElems = 32 elements a pass: 16 code bytes split into low and high nibbles, each
// looked up in the 16-byte table by a byte shuffle, interleaved back to element order, joined with the
// rest bytes as BFloat16Bits::join does.
CHUNKINFER_SIMD_CLONES
int64_t bf16_codes_to_words(const uint8_t* codes, const uint8_t* rest, const uint8_t* table, uint16_t* out, int64_t n) {
  typedef uint8_t v16b __attribute__((vector_size(16), aligned(1)));
  typedef uint8_t v32b __attribute__((vector_size(32), aligned(1)));
  typedef uint16_t v32h __attribute__((vector_size(64), aligned(2)));
  v16b tab;
  std::memcpy(&tab, table, 16);
  int64_t escaped = 0;
  for (int64_t i = 0; i < n; i += kv_codec::kCodesLoopElems) {
    v16b c;
    std::memcpy(&c, codes + i / 2, 16);
    const v16b lo = c & 0xF, hi = c >> 4;
    const v16b elo = __builtin_shuffle(tab, lo), ehi = __builtin_shuffle(tab, hi);
    const v32b e = __builtin_shufflevector(elo, ehi, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9,
                                           25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    v32b r;
    std::memcpy(&r, rest + i, 32);
    const v32h w = (__builtin_convertvector(r & 0x80, v32h) << 8) | (__builtin_convertvector(e, v32h) << 7) |
                   __builtin_convertvector(r & 0x7F, v32h);
    std::memcpy(out + i, &w, 64);
    const v16b esc = (lo == 15) + (hi == 15);  // -1 per escape code in each nibble
    for (int k = 0; k < 16; ++k) escaped -= static_cast<int8_t>(esc[k]);
  }
  return escaped;
}

namespace {

using kv_codec::BFloat16Bits;
using kv_codec::Float16Bits;

// Block g (stream-major over all streams): its stream, its first element's offset and its valid count.
struct BlockRef {
  int64_t stream, index, elem0, n;
};
BlockRef block_ref(const KVCodecArgs& a, int64_t g) {
  const int64_t s = g / a.blocks_per_stream, b = g % a.blocks_per_stream;
  const int64_t elem0 = b * a.layout.block_elems;
  return {s, b, elem0, std::min(a.layout.block_elems, a.rows * a.head_dim - elem0)};
}

template <typename Bits>
void encode(const KVCodecArgs& a, const uint16_t* x, uint8_t* blocks, uint8_t* spill, int32_t* spill_used,
            const uint8_t* table) {
  uint8_t code_of[256];
  kv_codec::build_code_of(table, code_of);
  const kv_codec::Layout& l = a.layout;
  const int64_t total = a.streams * a.blocks_per_stream;
  auto slot_of = [&](const BlockRef& r) { return blocks + a.block_streams.offset(r.stream) + r.index * l.slot_bytes; };
  auto x_of = [&](const BlockRef& r) { return x + a.x_streams.offset(r.stream) + r.elem0; };
  at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const BlockRef r = block_ref(a, g);
      kv_codec::encode_block<Bits>(x_of(r), r.n, l, code_of, slot_of(r));
    }
  });
  // Spill slots in block order: the counter is read once and written once.
  int64_t used = *spill_used;
  std::vector<int64_t> spilled;
  for (int64_t g = 0; g < total; ++g) {
    uint8_t* slot = slot_of(block_ref(a, g));
    if (kv_codec::load_u32(slot) <= static_cast<uint64_t>(l.escape_capacity)) continue;
    const bool stored = used >= 0 && used < a.spill_capacity;
    kv_codec::store_u32(slot + 4, stored ? static_cast<uint32_t>(used) : kv_codec::kSpillLost);
    if (stored) spilled.push_back(g);
    ++used;
  }
  CHUNKINFER_CHECK(used <= INT32_MAX, "kv_encode: the spill counter overflows int32");
  *spill_used = static_cast<int32_t>(used);
  at::parallel_for(0, static_cast<int64_t>(spilled.size()), 4, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const BlockRef r = block_ref(a, spilled[k]);
      const uint32_t index = kv_codec::load_u32(slot_of(r) + 4);
      kv_codec::write_spill_plane<Bits>(x_of(r), r.n, l, spill + static_cast<int64_t>(index) * l.spill_unit_bytes);
    }
  });
}

template <typename Bits>
void decode(const KVCodecArgs& a, const uint8_t* blocks, const uint8_t* spill, const uint8_t* table, uint16_t* out) {
  const kv_codec::Layout& l = a.layout;
  at::parallel_for(0, a.streams * a.blocks_per_stream, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const BlockRef r = block_ref(a, g);
      kv_codec::decode_block<Bits>(blocks + a.block_streams.offset(r.stream) + r.index * l.slot_bytes, spill,
                                   a.spill_capacity, table, l, out + a.x_streams.offset(r.stream) + r.elem0, r.n,
                                   &bf16_codes_to_words);
    }
  });
}

void kv_encode_out(const at::Tensor& blocks, const at::Tensor& spill, const at::Tensor& spill_used, const at::Tensor& x,
                   const at::Tensor& table, int64_t block_rows, int64_t escape_capacity) {
  constexpr const char* op = "kv_encode";
  const KVCodecArgs a = check_kv_encode_args(op, blocks, spill, spill_used, x, table, block_rows, escape_capacity);
  CHUNKINFER_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  if (a.streams == 0 || a.rows == 0) return;
  const auto* xp = static_cast<const uint16_t*>(x.const_data_ptr());
  auto* bp = static_cast<uint8_t*>(blocks.mutable_data_ptr());
  auto* sp = static_cast<uint8_t*>(spill.mutable_data_ptr());
  auto* used = spill_used.mutable_data_ptr<int32_t>();
  const auto* tp = table.const_data_ptr<uint8_t>();
  if (a.bf16) {
    encode<BFloat16Bits>(a, xp, bp, sp, used, tp);
  } else {
    encode<Float16Bits>(a, xp, bp, sp, used, tp);
  }
}

void kv_decode_out(const at::Tensor& out, const at::Tensor& blocks, const at::Tensor& spill, const at::Tensor& table,
                   int64_t block_rows, int64_t escape_capacity) {
  constexpr const char* op = "kv_decode";
  const KVCodecArgs a = check_kv_decode_args(op, out, blocks, spill, table, block_rows, escape_capacity);
  CHUNKINFER_CHECK(out.device().is_cpu(), op, ": expected CPU tensors");
  if (a.streams == 0 || a.rows == 0) return;
  const auto* bp = static_cast<const uint8_t*>(blocks.const_data_ptr());
  const auto* sp = static_cast<const uint8_t*>(spill.const_data_ptr());
  const auto* tp = table.const_data_ptr<uint8_t>();
  auto* op_out = static_cast<uint16_t*>(out.mutable_data_ptr());
  if (a.bf16) {
    decode<BFloat16Bits>(a, bp, sp, tp, op_out);
  } else {
    decode<Float16Bits>(a, bp, sp, tp, op_out);
  }
}

}  // namespace
}  // namespace chunkinfer::cpu

TORCH_LIBRARY_IMPL(chunkinfer, CPU, m) {
  chunkinfer::register_kv_codec<&chunkinfer::cpu::kv_encode_out, &chunkinfer::cpu::kv_decode_out>(m);
}
