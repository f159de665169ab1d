// The KV codec's pure-C++ parts (csrc/kv_codec_format.h): the layout arithmetic, the bit split of both
// dtypes, the code table, the escape search and the CPU block encode/decode, including what a block
// does when its data is missing (NaN, never another number, never an out-of-bounds access).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kv_codec_format.h"

namespace kc = chunkinfer::kv_codec;

namespace {

// A table of the exponents 120..134 (bf16 magnitudes 2^-7 .. 2^7).
std::vector<uint8_t> bf16_table() {
  std::vector<uint8_t> t(kc::kTableSize, 0);
  for (int c = 0; c < kc::kTableSize - 1; ++c) t[c] = static_cast<uint8_t>(120 + c);
  return t;
}

uint16_t bf16_word(uint32_t sign, uint32_t e, uint32_t mantissa) {
  return static_cast<uint16_t>((sign << 15) | (e << 7) | mantissa);
}

struct Encoded {
  kc::Layout layout;
  std::vector<uint8_t> slot, spill;
  int64_t escapes = 0;
};

template <typename Bits>
Encoded encode(const std::vector<uint16_t>& x, int64_t n_elems, int64_t cap, const std::vector<uint8_t>& table) {
  Encoded e;
  e.layout = kc::layout_for<Bits>(n_elems, cap);
  e.slot.assign(e.layout.slot_bytes, 0xCD);
  uint8_t code_of[256];
  kc::build_code_of(table.data(), code_of);
  e.escapes = kc::encode_block<Bits>(x.data(), static_cast<int64_t>(x.size()), e.layout, code_of, e.slot.data());
  return e;
}

}  // namespace

TEST(KVCodecFormat, LayoutOffsetsAreAlignedAndSized) {
  const kc::Layout l = kc::layout_for<kc::BFloat16Bits>(16 * 128, 16);
  EXPECT_EQ(l.padded_elems, 2048);
  EXPECT_EQ(l.rest_offset, 16);
  EXPECT_EQ(l.codes_offset, 16 + 2048);
  EXPECT_EQ(l.escape_offset, 16 + 2048 + 1024);
  EXPECT_EQ(l.slot_bytes, 16 + 2048 + 1024 + 64);
  EXPECT_EQ(l.spill_unit_bytes, 2048);
  const kc::Layout h = kc::layout_for<kc::Float16Bits>(3 * 7, 4);  // odd N: padded to 128
  EXPECT_EQ(h.padded_elems, 128);
  EXPECT_EQ(h.extra_plane_bytes, 16);
  EXPECT_EQ(h.escape_offset, 16 + 128 + 64 + 3 * 16);
  for (const kc::Layout& x : {l, h}) {
    for (int64_t off : {x.rest_offset, x.codes_offset, x.extra_offset, x.escape_offset, x.slot_bytes}) {
      EXPECT_EQ(off % 16, 0);
    }
  }
}

TEST(KVCodecFormat, EveryWordSplitsAndJoinsBack) {
  for (uint32_t w = 0; w < 65536; ++w) {
    EXPECT_EQ(kc::BFloat16Bits::join(kc::BFloat16Bits::exponent(w), kc::BFloat16Bits::rest(w),
                                     kc::BFloat16Bits::extra(w)), w);
    EXPECT_EQ(kc::Float16Bits::join(kc::Float16Bits::exponent(w), kc::Float16Bits::rest(w), kc::Float16Bits::extra(w)),
              w);
    ASSERT_LT(kc::BFloat16Bits::rest(w), 256u);
    ASSERT_LT(kc::Float16Bits::rest(w), 256u);
    ASSERT_LT(kc::Float16Bits::extra(w), 8u);
  }
  EXPECT_EQ(kc::BFloat16Bits::exponent(0x3F80), 127u);  // 1.0
  EXPECT_EQ(kc::Float16Bits::exponent(0x3C00), 15u);    // 1.0
}

TEST(KVCodecFormat, CodeTableTakesTheFirstMatchAndEscapesTheRest) {
  std::vector<uint8_t> t = bf16_table();
  t[5] = 120;  // a duplicate of entry 0: unused
  t[15] = 7;   // entry 15 is never a code
  uint8_t code_of[256];
  kc::build_code_of(t.data(), code_of);
  EXPECT_EQ(code_of[120], 0);
  EXPECT_EQ(code_of[125], kc::kEscape);  // its entry was overwritten
  EXPECT_EQ(code_of[134], 14);
  EXPECT_EQ(code_of[7], kc::kEscape);
  EXPECT_EQ(code_of[0], kc::kEscape);
}

TEST(KVCodecFormat, FindEscapeSearchesSortedEntries) {
  const std::vector<uint32_t> entries = {kc::escape_entry(3, 200), kc::escape_entry(9, 1), kc::escape_entry(40, 255)};
  const kc::AlignedEntries at{entries.data()};
  EXPECT_EQ(kc::find_escape(at, 3, 3), 200);
  EXPECT_EQ(kc::find_escape(at, 3, 9), 1);
  EXPECT_EQ(kc::find_escape(at, 3, 40), 255);
  EXPECT_EQ(kc::find_escape(at, 3, 4), -1);
  EXPECT_EQ(kc::find_escape(at, 2, 40), -1);  // only the first n entries count
  EXPECT_EQ(kc::find_escape(at, 0, 3), -1);
}

TEST(KVCodecFormat, BlockRoundTripsWithEscapesInTheSlot) {
  std::mt19937 rng(7);
  const int64_t n_elems = 300;
  std::vector<uint16_t> x(n_elems - 11);  // a short block: the rest is padding
  for (auto& w : x) w = bf16_word(rng() & 1, 120 + rng() % 15, rng() & 0x7F);
  x[5] = bf16_word(1, 0, 3);     // a denormal: escapes
  x[77] = bf16_word(0, 255, 0);  // +inf: escapes
  x[78] = 0x8000;                // -0: escapes
  const Encoded e = encode<kc::BFloat16Bits>(x, n_elems, 4, bf16_table());
  EXPECT_EQ(e.escapes, 3);
  EXPECT_EQ(kc::load_u32(e.slot.data()), 3u);
  EXPECT_EQ(kc::load_u32(e.slot.data() + 4), kc::kNotSpilled);
  for (int64_t i = static_cast<int64_t>(x.size()); i < e.layout.padded_elems; ++i) {
    ASSERT_EQ(e.slot[e.layout.rest_offset + i], 0) << "padding must be zero";
  }
  std::vector<uint16_t> out(x.size(), 0x1234);
  kc::decode_block<kc::BFloat16Bits>(e.slot.data(), nullptr, 0, bf16_table().data(), e.layout, out.data(),
                                     static_cast<int64_t>(out.size()));
  EXPECT_EQ(out, x);
}

TEST(KVCodecFormat, Float16BlockRoundTripsEveryWord) {
  std::vector<uint16_t> x(65536);
  for (uint32_t w = 0; w < 65536; ++w) x[w] = static_cast<uint16_t>(w * 40503u);  // a permutation of all words
  std::vector<uint8_t> table(kc::kTableSize, 0);
  for (int c = 0; c < 15; ++c) table[c] = static_cast<uint8_t>(c + 8);
  const int64_t n_elems = 1 << 16;
  Encoded e = encode<kc::Float16Bits>(x, n_elems, n_elems, table);
  EXPECT_EQ(e.escapes, 65536 * 17 / 32);  // 17 of the 32 exponents are not in the table
  std::vector<uint16_t> out(x.size());
  kc::decode_block<kc::Float16Bits>(e.slot.data(), nullptr, 0, table.data(), e.layout, out.data(), n_elems);
  EXPECT_EQ(out, x);
}

TEST(KVCodecFormat, SpilledBlockDecodesFromItsPlaneAndLostOneToNaN) {
  std::mt19937 rng(3);
  std::vector<uint16_t> x(256);
  for (auto& w : x) w = static_cast<uint16_t>(rng());
  Encoded e = encode<kc::BFloat16Bits>(x, 256, 8, bf16_table());
  ASSERT_GT(e.escapes, 8);
  std::vector<uint8_t> spill(3 * e.layout.spill_unit_bytes, 0xEE);
  kc::write_spill_plane<kc::BFloat16Bits>(x.data(), 256, e.layout, spill.data() + 2 * e.layout.spill_unit_bytes);
  kc::store_u32(e.slot.data() + 4, 2);
  std::vector<uint16_t> out(256);
  kc::decode_block<kc::BFloat16Bits>(e.slot.data(), spill.data(), 3, bf16_table().data(), e.layout, out.data(), 256);
  EXPECT_EQ(out, x);
  for (uint32_t field : {kc::kSpillLost, 3u}) {  // lost, and an index past the pool: NaN, no read outside
    kc::store_u32(e.slot.data() + 4, field);
    kc::decode_block<kc::BFloat16Bits>(e.slot.data(), spill.data(), 3, bf16_table().data(), e.layout, out.data(), 256);
    for (uint16_t w : out) ASSERT_EQ(w, kc::BFloat16Bits::kNaN);
  }
}

TEST(KVCodecFormat, EscapeMissingFromTheListDecodesToNaN) {
  std::vector<uint16_t> x(64, bf16_word(0, 127, 1));
  x[10] = bf16_word(0, 3, 0);
  x[20] = bf16_word(0, 4, 0);
  Encoded e = encode<kc::BFloat16Bits>(x, 64, 4, bf16_table());
  ASSERT_EQ(e.escapes, 2);
  kc::store_u32(e.slot.data(), 1);  // the header now lists only the first entry
  std::vector<uint16_t> out(64);
  kc::decode_block<kc::BFloat16Bits>(e.slot.data(), nullptr, 0, bf16_table().data(), e.layout, out.data(), 64);
  EXPECT_EQ(out[10], x[10]);
  EXPECT_EQ(out[20], kc::BFloat16Bits::kNaN);
  EXPECT_EQ(out[0], x[0]);
}
