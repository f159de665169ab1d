// The lossless KV codec's block format: its byte layout, how a 16-bit float splits into the coded
// exponent and the stored rest, and the block encode/decode of the CPU. Pure C++ (host and device
// for the layout and the bit arithmetic): the CPU kernel, the CUDA kernel header, the C++ tests and
// any future consumer (a CPU attention loop reading compressed host KV) share this one definition.
//
// What is coded. A bf16 word is sign(1) exponent(8) mantissa(7); an fp16 word is sign(1)
// exponent(5) mantissa(10). Real K, V exponents carry ~2.6-3.4 bits of entropy (bench/results/
// kv_codec_cpu.md), the sign and mantissa ~all of theirs. So each exponent becomes a 4-bit code:
// codes 0..14 stand for the 15 exponents of a per-tensor table (calibrated: the most frequent
// ones), code 15 means "escape": the exponent is in the block's escape list. Sign and mantissa are
// stored as they are. bf16: 8 + 4 bits per element (1.33x before escapes and headers); fp16:
// 11 + 4 bits (1.07x).
//
// Blocks. A tensor [..., S, D] is a set of streams (its leading dims), each S rows of D elements
// contiguous. A stream is cut into blocks of `block_rows` rows: N = block_rows * D elements, the
// last block of a stream possibly short (its missing elements are padding: code 0, rest 0). Every
// block has a slot of the same size, so block b of a stream is at byte b * slot_bytes of the
// stream's blocks: a consumer finds a tile's data from its position alone, and decodes it with no
// other block. Slot layout (Np = N rounded up to 128, E = escape capacity, a multiple of 4; every
// offset a multiple of 16):
//   [0, 16)                header: u32 n_escapes, u32 spill (kNotSpilled, kSpillLost or an index), 0, 0
//   rest_offset,  Np bytes  rest byte of element i at rest_offset + i:
//                           bf16: sign << 7 | mantissa; fp16: the low 8 mantissa bits
//   codes_offset, Np/2      code of element i in the nibble (i & 1) of byte i / 2 (low nibble first)
//   extra_offset, 3 * Np/8  fp16 only: bit j of element i's extra bits (sign << 2 | mantissa bits 9..8)
//                           at bit i % 8 of byte i / 8 of plane j (planes Np/8 bytes apart)
//   escape_offset, 4E      u32 entries (position << 8 | exponent) of the first min(n_escapes, E)
//                           escaped elements, in position order; unused entries 0
// Worst case. A block with more than E escapes is "spilled": its full exponent plane (Np bytes, one
// exponent per element, padding 0) goes to slot `spill` of a separate spill pool ([capacity, Np]
// bytes, filled in order by a counter the encoder advances once per spilled block); its codes are
// then not read. So the size is bounded even when every exponent escapes: slot + Np per block, i.e.
// 2.5 bytes per element for bf16 (1.25x raw), 2.875 for fp16 (1.44x), plus 16 + 4E bytes per block.
// If the pool is full the block's spill field reads kSpillLost (the counter still counts it, so the
// caller sees how many units it needed) and its decode yields NaN: nothing is written outside the
// buffers, nothing decodes to a wrong number.
#pragma once

#include <string.h>

#include <cstdint>
#include <cstring>

#include "row_layout.h"  // CHUNKINFER_HOST_DEVICE

namespace chunkinfer::kv_codec {

constexpr int kTableSize = 16;          // table entries: exponents of codes 0..14; entry 15 is ignored
constexpr uint32_t kEscape = 15;        // the code of an exponent not in the table
constexpr int64_t kHeaderBytes = 16;
constexpr int64_t kPadElems = 128;      // N is padded to this: every plane stays a multiple of 16 bytes
constexpr int64_t kEscapeAlign = 4;     // escape capacity granularity: 4 entries = 16 bytes
constexpr int64_t kMaxBlockElems = int64_t{1} << 24;  // positions fit the 24 high bits of an entry
constexpr uint32_t kNotSpilled = 0xFFFFFFFFu;
constexpr uint32_t kSpillLost = 0xFFFFFFFEu;

// The 16-bit float kinds the codec takes: where the exponent sits and what is stored besides it.
struct BFloat16Bits {
  static constexpr int kExtraPlanes = 0;
  static constexpr uint16_t kNaN = 0x7FC0;
  CHUNKINFER_HOST_DEVICE static uint32_t exponent(uint32_t w) { return (w >> 7) & 0xFF; }
  CHUNKINFER_HOST_DEVICE static uint32_t rest(uint32_t w) { return ((w >> 8) & 0x80) | (w & 0x7F); }
  CHUNKINFER_HOST_DEVICE static uint32_t extra(uint32_t) { return 0; }
  CHUNKINFER_HOST_DEVICE static uint16_t join(uint32_t e, uint32_t rest, uint32_t) {
    return static_cast<uint16_t>(((rest & 0x80) << 8) | ((e & 0xFF) << 7) | (rest & 0x7F));
  }
};

struct Float16Bits {
  static constexpr int kExtraPlanes = 3;
  static constexpr uint16_t kNaN = 0x7E00;
  CHUNKINFER_HOST_DEVICE static uint32_t exponent(uint32_t w) { return (w >> 10) & 0x1F; }
  CHUNKINFER_HOST_DEVICE static uint32_t rest(uint32_t w) { return w & 0xFF; }
  CHUNKINFER_HOST_DEVICE static uint32_t extra(uint32_t w) { return ((w >> 13) & 4) | ((w >> 8) & 3); }
  CHUNKINFER_HOST_DEVICE static uint16_t join(uint32_t e, uint32_t rest, uint32_t extra) {
    return static_cast<uint16_t>(((extra & 4) << 13) | ((e & 0x1F) << 10) | ((extra & 3) << 8) | (rest & 0xFF));
  }
};

// Byte offsets inside one block's slot. All multiples of 16.
struct Layout {
  int64_t block_elems = 0;      // N = block_rows * head_dim
  int64_t padded_elems = 0;     // Np = N rounded up to kPadElems
  int64_t escape_capacity = 0;  // E
  int64_t extra_planes = 0;     // 0 (bf16) or 3 (fp16)
  int64_t rest_offset = 0, codes_offset = 0, extra_offset = 0, extra_plane_bytes = 0, escape_offset = 0;
  int64_t slot_bytes = 0;
  int64_t spill_unit_bytes = 0;  // one spilled block's exponent plane
};

CHUNKINFER_HOST_DEVICE inline Layout make_layout(int64_t block_elems, int64_t escape_capacity, int64_t extra_planes) {
  Layout l;
  l.block_elems = block_elems;
  l.padded_elems = (block_elems + kPadElems - 1) / kPadElems * kPadElems;
  l.escape_capacity = escape_capacity;
  l.extra_planes = extra_planes;
  l.rest_offset = kHeaderBytes;
  l.codes_offset = l.rest_offset + l.padded_elems;
  l.extra_offset = l.codes_offset + l.padded_elems / 2;
  l.extra_plane_bytes = l.padded_elems / 8;
  l.escape_offset = l.extra_offset + extra_planes * l.extra_plane_bytes;
  l.slot_bytes = l.escape_offset + 4 * escape_capacity;
  l.spill_unit_bytes = l.padded_elems;
  return l;
}

template <typename Bits>
inline Layout layout_for(int64_t block_elems, int64_t escape_capacity) {
  return make_layout(block_elems, escape_capacity, Bits::kExtraPlanes);
}

CHUNKINFER_HOST_DEVICE inline uint32_t escape_entry(uint32_t position, uint32_t exponent) {
  return (position << 8) | (exponent & 0xFF);
}

// The exponent of the escaped element `position` from a block's n sorted entries (entry(k) reads
// entry k), or -1 if absent (a corrupt block: the caller writes NaN). Binary search: n <= E.
template <typename Entry>
CHUNKINFER_HOST_DEVICE inline int find_escape(Entry entry, uint32_t n, uint32_t position) {
  uint32_t lo = 0, hi = n;
  const uint32_t key = position << 8;
  while (lo < hi) {
    const uint32_t mid = (lo + hi) / 2;
    if (entry(mid) < key) lo = mid + 1; else hi = mid;
  }
  if (lo >= n) return -1;
  const uint32_t found = entry(lo);
  return (found >> 8) == position ? static_cast<int>(found & 0xFF) : -1;
}

// Readers of a block's escape entries for find_escape: from any address (the CPU) or from a 4-byte
// aligned one (the GPU: slots are 16-byte aligned).
struct UnalignedEntries {
  const uint8_t* p;
  CHUNKINFER_HOST_DEVICE uint32_t operator()(uint32_t k) const {
    uint32_t v;
    memcpy(&v, p + 4 * k, 4);
    return v;
  }
};
struct AlignedEntries {
  const uint32_t* p;
  CHUNKINFER_HOST_DEVICE uint32_t operator()(uint32_t k) const { return p[k]; }
};

// exponent -> code: the first table entry (of 0..14) equal to it, else kEscape. Any table is safe:
// a duplicate entry only goes unused, an exponent outside the dtype's range never matches.
inline void build_code_of(const uint8_t* table, uint8_t code_of[256]) {
  for (int e = 0; e < 256; ++e) {
    code_of[e] = static_cast<uint8_t>(kEscape);
    for (int c = kTableSize - 2; c >= 0; --c) {
      if (table[c] == e) code_of[e] = static_cast<uint8_t>(c);
    }
  }
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void store_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

// ---- the CPU's block encode and decode (the CUDA kernels do the same in kv_codec_kernels.cuh) ----

// Writes one block's slot from its n valid elements x[0, n) (n <= N); spill field kNotSpilled.
// Returns the number of escapes: more than E means the caller must spill the block. Plane by plane:
// the rest bytes in a loop the compiler vectorises, the codes two to a byte, the escape list only
// when a code was 15.
template <typename Bits>
int64_t encode_block(const uint16_t* x, int64_t n, const Layout& l, const uint8_t code_of[256], uint8_t* slot) {
  std::memset(slot, 0, static_cast<size_t>(l.slot_bytes));
  uint8_t* rest = slot + l.rest_offset;
  uint8_t* codes = slot + l.codes_offset;
  for (int64_t i = 0; i < n; ++i) rest[i] = static_cast<uint8_t>(Bits::rest(x[i]));
  uint32_t escaped = 0;
  for (int64_t i = 0; i < n; i += 2) {  // element n (padding) codes 0
    const uint32_t c0 = code_of[Bits::exponent(x[i])], c1 = i + 1 < n ? code_of[Bits::exponent(x[i + 1])] : 0;
    codes[i >> 1] = static_cast<uint8_t>(c0 | (c1 << 4));
    escaped |= (c0 == kEscape) | (c1 == kEscape);
  }
  if constexpr (Bits::kExtraPlanes > 0) {
    uint8_t* extra = slot + l.extra_offset;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t ex = Bits::extra(x[i]);
      for (int j = 0; j < Bits::kExtraPlanes; ++j) {
        extra[j * l.extra_plane_bytes + (i >> 3)] |= static_cast<uint8_t>(((ex >> j) & 1) << (i & 7));
      }
    }
  }
  int64_t n_esc = 0;
  if (escaped) {
    uint8_t* escapes = slot + l.escape_offset;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t e = Bits::exponent(x[i]);
      if (code_of[e] != kEscape) continue;
      if (n_esc < l.escape_capacity) store_u32(escapes + 4 * n_esc, escape_entry(static_cast<uint32_t>(i), e));
      ++n_esc;
    }
  }
  store_u32(slot, static_cast<uint32_t>(n_esc));
  store_u32(slot + 4, kNotSpilled);
  return n_esc;
}

// A spilled block's exponent plane: exponents of x[0, n), zeros up to Np.
template <typename Bits>
void write_spill_plane(const uint16_t* x, int64_t n, const Layout& l, uint8_t* plane) {
  std::memset(plane, 0, static_cast<size_t>(l.spill_unit_bytes));
  for (int64_t i = 0; i < n; ++i) plane[i] = static_cast<uint8_t>(Bits::exponent(x[i]));
}

// Decodes the first n elements of a block into out[0, n). spill: the pool (spill_capacity units of
// l.spill_unit_bytes). Reads nothing outside the slot and the pool whatever the bytes hold; a block
// whose data is missing (lost spill, index out of range, escape absent from the list) decodes to NaN
// where the data is missing.
// A faster main loop a CPU caller may pass for bf16 (no extra planes): out[0, n) from the codes, the
// table and the rest bytes, code 15 taking table[15], for n a multiple of kCodesLoopElems; returns how
// many codes were 15. decode_block's own loop does the rest of the block.
constexpr int64_t kCodesLoopElems = 32;
using Bf16CodesLoop = int64_t (*)(const uint8_t* codes, const uint8_t* rest, const uint8_t* table, uint16_t* out,
                                  int64_t n);

template <typename Bits>
void decode_block(const uint8_t* slot, const uint8_t* spill, int64_t spill_capacity, const uint8_t* table,
                  const Layout& l, uint16_t* out, int64_t n, Bf16CodesLoop codes_loop = nullptr) {
  const uint32_t n_esc = load_u32(slot), spill_index = load_u32(slot + 4);
  const uint8_t* rest = slot + l.rest_offset;
  const uint8_t* codes = slot + l.codes_offset;
  const uint8_t* extra = slot + l.extra_offset;
  auto extra_bits = [&](int64_t i) -> uint32_t {
    uint32_t ex = 0;
    for (int j = 0; j < Bits::kExtraPlanes; ++j) {
      ex |= ((extra[j * l.extra_plane_bytes + (i >> 3)] >> (i & 7)) & 1u) << j;
    }
    return ex;
  };
  if (n_esc > static_cast<uint64_t>(l.escape_capacity)) {
    if (spill_index >= static_cast<uint64_t>(spill_capacity)) {  // kSpillLost, or no such slot
      for (int64_t i = 0; i < n; ++i) out[i] = Bits::kNaN;
      return;
    }
    const uint8_t* exps = spill + static_cast<int64_t>(spill_index) * l.spill_unit_bytes;
    for (int64_t i = 0; i < n; ++i) out[i] = Bits::join(exps[i], rest[i], extra_bits(i));
    return;
  }
  // Every element from the table (code 15 takes table[15] for now), then the code-15 elements again:
  // patched from the escape list when it is sorted and names each of them (what the encoder writes),
  // else (a corrupt block) each looked up as the GPU looks it up, NaN where absent.
  int64_t escaped = 0;
  int64_t i0 = 0;
  if constexpr (Bits::kExtraPlanes == 0) {
    if (codes_loop) {
      i0 = n / kCodesLoopElems * kCodesLoopElems;
      escaped = codes_loop(codes, rest, table, out, i0);
    }
  }
  for (int64_t i = i0; i + 1 < n; i += 2) {  // a code byte at a time
    const uint32_t b = codes[i >> 1], c0 = b & 0xF, c1 = b >> 4;
    out[i] = Bits::join(table[c0], rest[i], extra_bits(i));
    out[i + 1] = Bits::join(table[c1], rest[i + 1], extra_bits(i + 1));
    escaped += (c0 == kEscape) + (c1 == kEscape);
  }
  if (n & 1) {
    const uint32_t c = codes[(n - 1) >> 1] & 0xF;
    out[n - 1] = Bits::join(table[c], rest[n - 1], extra_bits(n - 1));
    escaped += c == kEscape;
  }
  if (escaped == 0) return;
  auto code_at = [codes](int64_t i) -> uint32_t { return (codes[i >> 1] >> (4 * (i & 1))) & 0xF; };
  const UnalignedEntries entry{slot + l.escape_offset};
  int64_t patched = 0, previous = -1;
  for (uint32_t k = 0; k < n_esc; ++k) {
    const uint32_t e = entry(k);
    const int64_t i = e >> 8;
    if (i <= previous || i >= n || code_at(i) != kEscape) break;
    out[i] = Bits::join(e & 0xFF, rest[i], extra_bits(i));
    previous = i;
    ++patched;
  }
  if (patched == escaped && patched == static_cast<int64_t>(n_esc)) return;
  for (int64_t i = 0; i < n; ++i) {
    if (code_at(i) != kEscape) continue;
    const int e = find_escape(entry, n_esc, static_cast<uint32_t>(i));
    out[i] = e < 0 ? Bits::kNaN : Bits::join(static_cast<uint32_t>(e), rest[i], extra_bits(i));
  }
}

}  // namespace chunkinfer::kv_codec
