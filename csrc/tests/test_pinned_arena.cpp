// PinnedArena's accounting, alignment, reuse and slab packing, on plain (unpinned) host memory: the
// bookkeeping is the same code for pinned slabs, which only come from another allocator.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "offload/pinned_arena.h"

namespace {

using chunkinfer::offload::PinnedArena;

constexpr int64_t MiB = int64_t{1} << 20;

uintptr_t address(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); }

TEST(PinnedArena, AccountsExactRegionsRoundedTo256) {
  PinnedArena arena(4 * MiB, /*pinned=*/false, 0);
  EXPECT_EQ(arena.bytes_reserved(), 0);
  std::vector<at::Tensor> held;
  int64_t expect_used = 0;
  for (const int64_t n : {1, 255, 256, 257, 1000, 4096, 12345}) {
    held.push_back(arena.allocate({n}, at::kFloat));
    expect_used += (n * 4 + 255) / 256 * 256;
    EXPECT_EQ(arena.bytes_used(), expect_used);
  }
  EXPECT_EQ(arena.bytes_reserved(), 4 * MiB);  // all of it in one slab
  EXPECT_EQ(arena.slab_count(), 1);
  held.clear();
  EXPECT_EQ(arena.bytes_used(), 0);
  EXPECT_EQ(arena.bytes_reserved(), 4 * MiB);  // slabs are kept until trim()
  EXPECT_EQ(arena.trim(), 4 * MiB);
  EXPECT_EQ(arena.bytes_reserved(), 0);
}

TEST(PinnedArena, RegionsAre256AlignedAndSlabsStartOn2MiB) {
  PinnedArena arena(2 * MiB, false, 0);
  const at::Tensor first = arena.allocate({3}, at::kByte);
  EXPECT_EQ(address(first) % (2 * MiB), 0u);  // a slab's first region is its base
  for (int i = 0; i < 50; ++i) {
    const at::Tensor t = arena.allocate({1 + 37 * i}, at::kBFloat16);
    EXPECT_EQ(address(t) % 256, 0u);
  }
  const at::Tensor big = arena.allocate({3 * MiB}, at::kByte);  // its own slab
  EXPECT_EQ(address(big) % (2 * MiB), 0u);
}

TEST(PinnedArena, FreedRegionIsReusedAndNeighboursCoalesce) {
  PinnedArena arena(4 * MiB, false, 0);
  at::Tensor a = arena.allocate({MiB / 4}, at::kFloat);  // 1 MiB each
  at::Tensor b = arena.allocate({MiB / 4}, at::kFloat);
  const at::Tensor c = arena.allocate({MiB / 4}, at::kFloat);
  const uintptr_t where_a = address(a);
  a = at::Tensor();
  b = at::Tensor();
  // a and b's 2 MiB coalesced: a 2 MiB request fits where they were, in the same slab
  const at::Tensor two = arena.allocate({2 * MiB}, at::kByte);
  EXPECT_EQ(address(two), where_a);
  EXPECT_EQ(arena.slab_count(), 1);
  EXPECT_EQ(arena.bytes_used(), 3 * MiB);
}

// Regions a little over half a slab (262k tokens of an 8B model's KV: 514 MiB regions, 1 GiB
// slabs) used to take a slab each, half of it unusable; grown slabs now hold whole regions.
TEST(PinnedArena, GrowthPacksWholeRegions) {
  PinnedArena arena(8 * MiB, false, 0);
  const int64_t region = 6 * MiB - 4096;  // one per 8 MiB slab, 6 MiB slabs instead
  arena.grow_async(10 * region, region);
  std::vector<at::Tensor> held;
  for (int i = 0; i < 10; ++i) held.push_back(arena.allocate({region}, at::kByte));
  arena.wait_grown();
  EXPECT_EQ(arena.bytes_used(), 10 * region);
  EXPECT_EQ(arena.bytes_reserved(), 10 * 6 * MiB);  // was 80 MiB: an 8 MiB slab per region
  EXPECT_EQ(arena.slab_count(), 10);
}

TEST(PinnedArena, GrowthPacksSeveralSmallerRegionsPerSlab) {
  PinnedArena arena(8 * MiB, false, 0);
  const int64_t region = 3 * MiB;  // two per slab: 6 MiB slabs, nothing left over
  arena.grow_async(6 * region, region);
  std::vector<at::Tensor> held;
  for (int i = 0; i < 6; ++i) held.push_back(arena.allocate({region}, at::kByte));
  arena.wait_grown();
  EXPECT_EQ(arena.bytes_reserved(), 6 * region);
  EXPECT_EQ(arena.slab_count(), 3);
}

TEST(PinnedArena, AllocateWithoutGrowthSizesItsSlabToTheRegion) {
  PinnedArena arena(8 * MiB, false, 0);
  const at::Tensor t = arena.allocate({5 * MiB}, at::kByte);  // one 5 MiB region: a 6 MiB slab
  EXPECT_EQ(arena.bytes_reserved(), 6 * MiB);
  const at::Tensor small = arena.allocate({MiB}, at::kByte);  // fits in the tail
  EXPECT_EQ(arena.slab_count(), 1);
}

TEST(PinnedArena, RefusesBadArguments) {
  PinnedArena arena(MiB, false, 0);
  EXPECT_THROW(arena.allocate({-1}, at::kFloat), c10::Error);
  EXPECT_THROW(arena.grow_async(-1), c10::Error);
  EXPECT_THROW(arena.grow_async(MiB, -1), c10::Error);
  EXPECT_THROW(PinnedArena(0, false, 0), c10::Error);
}

}  // namespace
