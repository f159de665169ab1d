#include "pinned_arena.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>

#include "../message.h"
#include "cuda_check.h"
#include "host_memory.h"

namespace chunkinfer::offload {
namespace {

struct Region {
  Slab* slab;
  int64_t offset;
};

// First fit over the slabs in creation order; the caller holds s.mu.
std::optional<Region> first_fit(ArenaState& s, int64_t bytes) {
  for (auto& slab : s.slabs) {
    if (auto offset = slab->free.take(bytes)) return Region{slab.get(), *offset};
  }
  return std::nullopt;
}

// The caller holds s.mu; the new slab's first `bytes` (none if 0) are taken before anyone else can see it.
Region add_slab_and_take(ArenaState& s, void* base, int64_t slab_size, int64_t bytes, const SlabTiming& timing) {
  s.slabs.push_back(std::make_unique<Slab>(static_cast<char*>(base), slab_size));
  s.reserved += slab_size;
  s.pinning.fault_in_seconds += timing.fault_in_seconds;
  s.pinning.register_seconds += timing.register_seconds;
  Slab* slab = s.slabs.back().get();
  const int64_t offset = bytes > 0 ? *slab->free.take(bytes) : 0;
  return Region{slab, offset};
}

// A slab for regions of `region` bytes (already a multiple of kRegionAlign): as many whole regions as
// a normal slab holds, at least one. A fixed slab size wastes up to half of each slab on regions a
// little over half its size (one 514 MiB region per 1 GiB slab: 262k tokens of an 8B model's KV).
int64_t slab_for(int64_t region, int64_t normal) {
  const int64_t per = std::max<int64_t>(1, normal / region);
  return round_up(per * region, kSlabAlign);
}

int64_t checked_nbytes(const std::vector<int64_t>& shape, at::ScalarType dtype) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  int64_t n = static_cast<int64_t>(c10::elementSize(dtype));
  for (const int64_t d : shape) {
    CHUNKINFER_CHECK_VALUE(d >= 0, "PinnedArena.allocate: shape ", c10::IntArrayRef(shape),
                           " has a negative size");
    CHUNKINFER_CHECK_VALUE(d == 0 || n <= kMax / d, "PinnedArena.allocate: shape ",
                           c10::IntArrayRef(shape), " of ", dtype, " overflows 64-bit byte counts");
    n *= d;
  }
  return n;
}

std::string error_text(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) return c10_error->what_without_backtrace();
  return e.what();
}

// The background grower: pins slabs of grow_slab bytes until the target is reached, stop is set, or an
// allocation fails (kept for wait_grown to raise).
void grow_loop(std::shared_ptr<ArenaState> s) {
  std::string error;
#ifdef CHUNKINFER_WITH_CUDA
  // A new thread's current device is 0: pin on (and for) the arena's device.
  if (s->pinned) {
    const cudaError_t err = cudaSetDevice(s->device);
    if (err != cudaSuccess) error = message("cudaSetDevice(", s->device, ") failed: ", cudaGetErrorString(err));
  }
#endif
  std::unique_lock<std::mutex> lk(s->mu);
  while (error.empty() && !s->stop && s->reserved < s->grow_target) {
    const int64_t bytes = s->grow_slab;
    lk.unlock();
    void* p = nullptr;
    SlabTiming timing;
    try {
      p = alloc_host_slab(bytes, s->pinned, s->device, &timing);
    } catch (const std::exception& e) {
      error = error_text(e);
    }
    lk.lock();
    if (p == nullptr) break;
    add_slab_and_take(*s, p, bytes, 0, timing);
    s->cv.notify_all();
  }
  if (!error.empty()) {
    s->grow_error = message("PinnedArena: growing to ", s->grow_target, " bytes stopped with ",
                            s->reserved, " bytes reserved: ", error);
  }
  s->growing = false;
  s->cv.notify_all();
}

}  // namespace

ArenaState::~ArenaState() {
  for (auto& slab : slabs) free_host_slab(slab->base, slab->size, pinned);
}

void ArenaState::release(Slab* slab, int64_t offset, int64_t bytes) {
  {
    const std::lock_guard<std::mutex> lk(mu);
    slab->free.give(offset, bytes);
    used -= bytes;
  }
  cv.notify_all();
}

PinnedArena::PinnedArena(int64_t slab_bytes, bool pinned, int device) {
  CHUNKINFER_CHECK_VALUE(slab_bytes > 0, "PinnedArena: slab_bytes must be positive, got ", slab_bytes);
  if (pinned) check_pinned_supported(device);
  state_ = std::make_shared<ArenaState>(round_up(slab_bytes, kSlabAlign), pinned, pinned ? device : -1);
}

PinnedArena::~PinnedArena() {
  {
    const std::lock_guard<std::mutex> lk(state_->mu);
    state_->stop = true;  // the grower finishes the slab in hand, then exits
  }
  state_->cv.notify_all();
  const std::lock_guard<std::mutex> tl(thread_mu_);
  if (grower_.joinable()) grower_.join();
}

at::Tensor PinnedArena::allocate(const std::vector<int64_t>& shape, at::ScalarType dtype) {
  const int64_t nbytes = checked_nbytes(shape, dtype);
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  if (nbytes == 0) return at::empty(shape, options);
  const int64_t bytes = round_up(nbytes, kRegionAlign);

  ArenaState& s = *state_;
  std::optional<Region> region;
  {
    std::unique_lock<std::mutex> lk(s.mu);
    for (;;) {
      region = first_fit(s, bytes);
      // Growth adds slabs of grow_slab bytes: worth waiting for only if one of them can hold this request.
      if (region || !(s.growing && bytes <= s.grow_slab)) break;
      s.cv.wait(lk);
    }
    if (region) s.used += bytes;
  }
  if (!region) {
    const int64_t slab_size = slab_for(bytes, s.slab_bytes);
    SlabTiming timing;
    void* base = alloc_host_slab(slab_size, s.pinned, s.device, &timing);
    {
      const std::lock_guard<std::mutex> lk(s.mu);
      region = add_slab_and_take(s, base, slab_size, bytes, timing);
      s.used += bytes;
    }
    s.cv.notify_all();  // the rest of the new slab may serve a waiting caller
  }

  // The deleter holds the state, so the region goes back even after the arena object is gone.
  auto deleter = [state = state_, slab = region->slab, offset = region->offset, bytes](void*) {
    state->release(slab, offset, bytes);
  };
  return at::from_blob(region->slab->base + region->offset, shape, std::move(deleter), options);
}

void PinnedArena::grow_async(int64_t total_bytes, int64_t region_bytes) {
  CHUNKINFER_CHECK_VALUE(total_bytes >= 0, "PinnedArena.grow_async: total_bytes must be >= 0, got ",
                         total_bytes);
  CHUNKINFER_CHECK_VALUE(region_bytes >= 0, "PinnedArena.grow_async: region_bytes must be >= 0, got ",
                         region_bytes);
  ArenaState& s = *state_;
  const std::lock_guard<std::mutex> tl(thread_mu_);
  {
    const std::lock_guard<std::mutex> lk(s.mu);
    int64_t slab = s.slab_bytes, usable = s.slab_bytes;
    if (region_bytes > 0) {
      const int64_t region = round_up(region_bytes, kRegionAlign);
      slab = slab_for(region, s.slab_bytes);
      usable = slab / region * region;  // a slab's tail smaller than a region holds none
    }
    // Enough slabs that their whole regions cover what is missing.
    const int64_t missing = std::max<int64_t>(0, total_bytes - s.reserved);
    const int64_t target = s.reserved + (missing + usable - 1) / usable * slab;
    // A running grower sees a raised target; a new one starts from this target alone.
    s.grow_target = s.growing ? std::max(s.grow_target, target) : target;
    s.grow_slab = s.growing ? std::max(s.grow_slab, slab) : slab;
    if (s.growing || s.reserved >= s.grow_target) return;
    s.growing = true;
  }
  if (grower_.joinable()) grower_.join();  // the previous grower, which has already finished
  try {
    grower_ = std::thread(grow_loop, state_);
  } catch (...) {
    {
      const std::lock_guard<std::mutex> lk(s.mu);
      s.growing = false;
    }
    s.cv.notify_all();
    throw;
  }
}

void PinnedArena::wait_grown() {
  ArenaState& s = *state_;
  std::string error;
  {
    std::unique_lock<std::mutex> lk(s.mu);
    s.cv.wait(lk, [&] { return !s.growing; });
    std::swap(error, s.grow_error);  // raised once
  }
  CHUNKINFER_CHECK(error.empty(), error);
}

int64_t PinnedArena::trim() {
  ArenaState& s = *state_;
  std::vector<std::unique_ptr<Slab>> unused;
  int64_t freed = 0;
  {
    const std::lock_guard<std::mutex> lk(s.mu);
    auto keep = std::stable_partition(s.slabs.begin(), s.slabs.end(),
                                      [](const std::unique_ptr<Slab>& slab) { return !slab->free.all_free(); });
    for (auto it = keep; it != s.slabs.end(); ++it) {
      freed += (*it)->free.size();
      unused.push_back(std::move(*it));
    }
    s.slabs.erase(keep, s.slabs.end());
    s.reserved -= freed;
  }
  for (auto& slab : unused) free_host_slab(slab->base, slab->size, s.pinned);  // outside the lock: it is slow
  return freed;
}

int64_t PinnedArena::bytes_reserved() const {
  const std::lock_guard<std::mutex> lk(state_->mu);
  return state_->reserved;
}

int64_t PinnedArena::bytes_used() const {
  const std::lock_guard<std::mutex> lk(state_->mu);
  return state_->used;
}

int64_t PinnedArena::slab_count() const {
  const std::lock_guard<std::mutex> lk(state_->mu);
  return static_cast<int64_t>(state_->slabs.size());
}

bool PinnedArena::growing() const {
  const std::lock_guard<std::mutex> lk(state_->mu);
  return state_->growing;
}

SlabTiming PinnedArena::pinning_seconds() const {
  const std::lock_guard<std::mutex> lk(state_->mu);
  return state_->pinning;
}

}  // namespace chunkinfer::offload
