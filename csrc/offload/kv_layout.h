// A position-range copy between two KV buffers [B, H, capacity, D] as B*H equally spaced rows:
// the shape of one cudaMemcpy2DAsync (or of a row loop on the host). Every check of the buffers
// and of the range lives here, so the engine's paths all see the same validated plan.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace chunkinfer::offload {

struct KVCopy {
  const char* src = nullptr;  // the first byte to copy in row 0
  char* dst = nullptr;
  int64_t src_pitch = 0, dst_pitch = 0;  // bytes from one row to the next
  int64_t width = 0;                     // bytes copied per row: (p1 - p0) * D * itemsize
  int64_t rows = 0;                      // B * H
  int64_t bytes() const { return width * rows; }
};

// Validates src/dst (4-D, same dtype, same B, H, D, row layout) and the range, then plans the copy
// of positions [p0, p1) of src to [dst_p0, dst_p0 + p1 - p0) of dst (dst_p0 == -1: p0).
// Raises ValueError naming `op` and the argument. Devices are the caller's to check.
KVCopy plan_kv_copy(const char* op, const char* src_name, const at::Tensor& src, const char* dst_name,
                    const at::Tensor& dst, int64_t p0, int64_t p1, int64_t dst_p0);

// The plan's copy on the host, synchronously (both sides in host memory).
void copy_on_host(const KVCopy& plan);

}  // namespace chunkinfer::offload
