// Raw host slabs: page-locked (mmap'd, then cudaHostRegister), or plain 2 MiB-aligned memory (which lets the
// arena's bookkeeping run and be tested on machines without a GPU).
#pragma once

#include <cstdint>

namespace chunkinfer::offload {

constexpr int64_t kSlabAlign = int64_t{2} << 20;  // 2 MiB: huge-page friendly, a multiple of 256

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Throws (RuntimeError) when page-locked memory cannot be had here: a CPU-only build, no CUDA
// device, or `device` out of range.
void check_pinned_supported(int device);

// Where a pinned slab's time went: the kernel faulting its pages in, and cudaHostRegister.
struct SlabTiming {
  double fault_in_seconds = 0;
  double register_seconds = 0;
};

// `bytes` is a positive multiple of kSlabAlign. Throws with the size asked for on failure.
// For pinned slabs the calling thread's current device is set to `device` for the call, and
// `timing` (if given) receives where the time went.
void* alloc_host_slab(int64_t bytes, bool pinned, int device, SlabTiming* timing = nullptr);
// Never throws (it runs in destructors, possibly at interpreter exit).
void free_host_slab(void* p, int64_t bytes, bool pinned) noexcept;

}  // namespace chunkinfer::offload
