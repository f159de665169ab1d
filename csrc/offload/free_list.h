// The free ranges of one slab, kept coalesced so freed neighbours serve a later request of their
// combined size.
#pragma once

#include <cstdint>
#include <map>
#include <optional>

namespace chunkinfer::offload {

class FreeList {
 public:
  explicit FreeList(int64_t size) : size_(size) { if (size > 0) free_[0] = size; }

  // The offset of the first free range that holds `bytes` (first fit), now taken; none if none fits.
  std::optional<int64_t> take(int64_t bytes);
  // Returns [offset, offset + bytes), merged with free neighbours.
  void give(int64_t offset, int64_t bytes);

  bool all_free() const { return free_.size() == 1 && free_.begin()->second == size_; }
  int64_t size() const { return size_; }

 private:
  int64_t size_;
  std::map<int64_t, int64_t> free_;  // offset -> length, disjoint and never adjacent
};

}  // namespace chunkinfer::offload
