// KVTransferEngine: moves position ranges of KV buffers between the GPU and pinned host memory on
// two copy streams of its own (host->device, device->host). Each copy is ordered after the work
// already queued on the caller's current stream and is tracked by a ticket (a CUDA event), so the
// compute stream waits on copies with events, never with host syncs.
// A "CPU engine" (device -1, or any engine in a CPU-only build) copies CPU tensors synchronously,
// so the Python logic above it runs without a GPU.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "kv_layout.h"

#ifdef CHUNKINFER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace chunkinfer::offload {

// Hidden like pybind11 itself, which binds it (else g++ warns about the visibility mismatch).
class __attribute__((visibility("hidden"))) KVTransferEngine {
 public:
  explicit KVTransferEngine(int64_t device);
  ~KVTransferEngine();
  KVTransferEngine(const KVTransferEngine&) = delete;
  KVTransferEngine& operator=(const KVTransferEngine&) = delete;

  // GPU -> pinned host (or CPU -> CPU, synchronously). Returns the copy's ticket.
  int64_t offload(const at::Tensor& src, const at::Tensor& dst, int64_t p0, int64_t p1, int64_t dst_p0);
  // Pinned host -> GPU (or CPU -> CPU, synchronously). Returns the copy's ticket.
  int64_t prefetch(const at::Tensor& src, const at::Tensor& dst, int64_t p0, int64_t p1, int64_t dst_p0);
  // The current stream waits for the ticket's copy (no host block).
  void wait(int64_t ticket);
  // The host blocks until the ticket's copy (ticket -1: every copy issued so far) is done.
  void synchronize(int64_t ticket);
  bool done(int64_t ticket);

  int64_t bytes_to_host() const;
  int64_t bytes_to_device() const;
  int64_t pending();
  int64_t device() const { return device_; }
  int64_t last_ticket() const;

 private:
  enum class Direction { kToHost, kToDevice };
  int64_t copy(Direction dir, const at::Tensor& src, const at::Tensor& dst, int64_t p0, int64_t p1,
               int64_t dst_p0);
  void check_ticket(const char* op, int64_t ticket, bool allow_all) const;  // holds mu_

  int64_t device_;  // -1: a CPU engine
  mutable std::mutex mu_;
  int64_t last_ticket_ = 0;
  int64_t bytes_to_host_ = 0, bytes_to_device_ = 0;

#ifdef CHUNKINFER_WITH_CUDA
  // An issued copy: its event, and its tensors kept alive until it is seen complete, so neither the
  // caching allocator nor a PinnedArena hands their memory out while the copy engine still uses it.
  struct InFlight {
    cudaEvent_t event;
    at::Tensor src, dst;
  };
  int64_t copy_async(Direction dir, const KVCopy& plan, const at::Tensor& src, const at::Tensor& dst);
  // Moves the completed copies out of in_flight_ into `finished` (their events back to the pool).
  // The caller declares `finished` before taking mu_, so the tensors are dropped after releasing it
  // (dropping one may take the GIL), also when this throws.
  void collect_done_locked(std::vector<InFlight>& finished);
  cudaEvent_t take_event_locked();
  void release_cuda() noexcept;  // waits for the streams, then destroys streams and events

  cudaStream_t h2d_ = nullptr, d2h_ = nullptr;
  cudaEvent_t ready_ = nullptr;  // recorded on the caller's stream: "what was queued before this copy"
  std::vector<cudaEvent_t> free_events_;
  std::map<int64_t, InFlight> in_flight_;
#endif
};

}  // namespace chunkinfer::offload
