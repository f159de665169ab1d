// PinnedArena: host memory in large slabs handing out exact-size, 256-byte-aligned regions as CPU
// tensors. PyTorch's pinned allocator rounds every block up to a power of two and caches it, which
// for tens of GiB of offloaded KV wastes up to half; here a region costs its size rounded to 256.
// Pinning is slow (~2.6 GiB/s), so slabs can also be pinned ahead of need by a background thread.
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "free_list.h"
#include "host_memory.h"

namespace chunkinfer::offload {

constexpr int64_t kRegionAlign = 256;

struct Slab {
  char* base = nullptr;
  int64_t size = 0;
  FreeList free;
  explicit Slab(char* b, int64_t bytes) : base(b), size(bytes), free(bytes) {}
};

// Everything a live region needs: shared by the arena and by every tensor it handed out, so a
// tensor that outlives the arena still returns its region to something that exists. The slabs
// are freed when the last owner goes.
struct ArenaState {
  ArenaState(int64_t slab_size, bool page_locked, int device_index)
      : slab_bytes(slab_size), pinned(page_locked), device(device_index) {}
  ~ArenaState();

  const int64_t slab_bytes;  // a normal slab's size (a multiple of 2 MiB)
  const bool pinned;
  const int device;

  std::mutex mu;
  std::condition_variable cv;  // a slab was added, a region returned, or growth ended
  std::vector<std::unique_ptr<Slab>> slabs;
  int64_t reserved = 0, used = 0;
  // Background growth: pin slabs until `reserved` reaches `grow_target`.
  int64_t grow_target = 0;
  int64_t grow_slab = 0;  // size of the slabs the grower pins (a multiple of 2 MiB)
  bool growing = false, stop = false;
  std::string grow_error;  // the background thread's failure, raised by wait_grown
  SlabTiming pinning;      // summed over every pinned slab this arena made

  void release(Slab* slab, int64_t offset, int64_t bytes);
};

// Hidden like pybind11 itself, which binds it (else g++ warns about the visibility mismatch).
class __attribute__((visibility("hidden"))) PinnedArena {
 public:
  PinnedArena(int64_t slab_bytes, bool pinned, int device);
  ~PinnedArena();
  PinnedArena(const PinnedArena&) = delete;
  PinnedArena& operator=(const PinnedArena&) = delete;

  // A contiguous CPU tensor over a fresh region of exactly numel * itemsize bytes (uninitialised).
  at::Tensor allocate(const std::vector<int64_t>& shape, at::ScalarType dtype);
  // Pins slabs on a background thread until bytes_reserved >= total_bytes; with region_bytes > 0,
  // slabs that hold a whole number of regions of that size (one if it exceeds a normal slab).
  void grow_async(int64_t total_bytes, int64_t region_bytes = 0);
  // Blocks until the background growth has ended; raises what it failed on, if anything.
  void wait_grown();
  // Frees every slab with no live region; returns the bytes freed.
  int64_t trim();

  int64_t bytes_reserved() const;
  int64_t bytes_used() const;
  int64_t slab_count() const;
  int64_t slab_bytes() const { return state_->slab_bytes; }
  bool pinned() const { return state_->pinned; }
  int device() const { return state_->device; }
  bool growing() const;
  // Seconds spent pinning so far: faulting pages in, and cudaHostRegister (0, 0 when not pinned).
  SlabTiming pinning_seconds() const;

 private:
  std::shared_ptr<ArenaState> state_;
  std::mutex thread_mu_;  // guards grower_ between concurrent grow_async calls
  std::thread grower_;
};

}  // namespace chunkinfer::offload
