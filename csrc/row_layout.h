// Where row r of a [..., n] tensor starts. Leading dims collapse into at most two strided groups, so
// a chunk of a [B, S, H] residual stream ([B, c, H], strides [S*H, H, 1]) is addressed in place.
// Pure C++ (host and device): the kernel headers take it by value.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace chunkinfer {

struct RowLayout {
  int64_t inner = 1;         // rows in the inner group
  int64_t inner_stride = 0;  // elements between consecutive rows of the inner group
  int64_t outer_stride = 0;  // elements between consecutive inner groups

  // Kernels call this per row (per thread), so no 64-bit division where it can be avoided: rows of
  // the first group (all rows of a one-group layout) need none, and 32-bit division is far cheaper.
  CHUNKINFER_HOST_DEVICE int64_t offset(int64_t row) const {
    if (row < inner) return row * inner_stride;
    if (row <= 0xffffffffLL && inner <= 0xffffffffLL) {
      const uint32_t r = static_cast<uint32_t>(row), n = static_cast<uint32_t>(inner);
      return static_cast<int64_t>(r / n) * outer_stride + static_cast<int64_t>(r % n) * inner_stride;
    }
    return (row / inner) * outer_stride + (row % inner) * inner_stride;
  }
  bool strides_multiple_of(int64_t v) const { return inner_stride % v == 0 && outer_stride % v == 0; }
};

}  // namespace chunkinfer
