#include "kv_transfer.h"

#include <utility>

#include "../message.h"
#include "cuda_check.h"

#ifdef CHUNKINFER_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace chunkinfer::offload {
namespace {

constexpr const char* kCpuEngine =
    "a CPU engine (built with device=-1, or any engine of a CPU-only build), which copies only "
    "between CPU tensors";

struct Names {
  const char *op, *src, *dst, *gpu, *host;
};
Names names_of(bool to_host) {
  return to_host ? Names{"offload", "src_gpu", "dst_host", "src_gpu", "dst_host"}
                 : Names{"prefetch", "src_host", "dst_gpu", "dst_gpu", "src_host"};
}

#ifdef CHUNKINFER_WITH_CUDA
c10::DeviceIndex index_of(int64_t device) { return static_cast<c10::DeviceIndex>(device); }

// Page-locked memory (cudaHostAlloc, cudaHostRegister): what an asynchronous copy needs. Pageable
// memory would make cudaMemcpy2DAsync silently synchronous (or staged), breaking the overlap.
bool is_pinned_host(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();  // older runtimes report unregistered memory as an error
    return false;
  }
  return attr.type == cudaMemoryTypeHost;
}
#endif

}  // namespace

KVTransferEngine::KVTransferEngine(int64_t device) : device_(device) {
  CHUNKINFER_CHECK_VALUE(device >= -1, "KVTransferEngine: device must be a CUDA device index or -1 "
                         "(a CPU engine), got ", device);
#ifdef CHUNKINFER_WITH_CUDA
  if (device_ < 0) return;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    count = 0;
  }
  CHUNKINFER_CHECK(device_ < count, "KVTransferEngine: CUDA device ", device_, " is not available (",
                   err == cudaSuccess ? message(count, " visible") : std::string(cudaGetErrorString(err)),
                   "); pass device=-1 for a CPU engine");
  const c10::cuda::CUDAGuard guard(index_of(device_));
  try {
    // Non-blocking: the copies must not serialise with the legacy default stream.
    CHUNKINFER_CUDA_CHECK(cudaStreamCreateWithFlags(&h2d_, cudaStreamNonBlocking),
                          "KVTransferEngine: creating the host-to-device stream failed");
    CHUNKINFER_CUDA_CHECK(cudaStreamCreateWithFlags(&d2h_, cudaStreamNonBlocking),
                          "KVTransferEngine: creating the device-to-host stream failed");
    CHUNKINFER_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming),
                          "KVTransferEngine: creating an event failed");
  } catch (...) {
    release_cuda();
    throw;
  }
#else
  device_ = -1;  // a CPU-only build has only the CPU engine
#endif
}

KVTransferEngine::~KVTransferEngine() {
#ifdef CHUNKINFER_WITH_CUDA
  release_cuda();
#endif
}

int64_t KVTransferEngine::offload(const at::Tensor& src, const at::Tensor& dst, int64_t p0, int64_t p1,
                                  int64_t dst_p0) {
  return copy(Direction::kToHost, src, dst, p0, p1, dst_p0);
}

int64_t KVTransferEngine::prefetch(const at::Tensor& src, const at::Tensor& dst, int64_t p0, int64_t p1,
                                   int64_t dst_p0) {
  return copy(Direction::kToDevice, src, dst, p0, p1, dst_p0);
}

int64_t KVTransferEngine::copy(Direction dir, const at::Tensor& src, const at::Tensor& dst, int64_t p0,
                               int64_t p1, int64_t dst_p0) {
  const bool to_host = dir == Direction::kToHost;
  const Names n = names_of(to_host);
  const at::Tensor& gpu = to_host ? src : dst;
  const at::Tensor& host = to_host ? dst : src;
  CHUNKINFER_CHECK_VALUE(host.is_cpu(), n.op, ": ", n.host, " must be a CPU tensor, got one on ",
                         host.device());
  if (!gpu.is_cpu()) {
    CHUNKINFER_CHECK_VALUE(device_ >= 0, n.op, ": ", n.gpu, " is on ", gpu.device(), " but this engine is ",
                           kCpuEngine);
    CHUNKINFER_CHECK_VALUE(gpu.is_cuda() && gpu.get_device() == device_, n.op, ": ", n.gpu, " is on ",
                           gpu.device(), " but this engine copies for cuda:", device_);
  }
  const KVCopy plan = plan_kv_copy(n.op, n.src, src, n.dst, dst, p0, p1, dst_p0);
  const auto issue_done_ticket = [&] {
    const std::lock_guard<std::mutex> lk(mu_);
    (to_host ? bytes_to_host_ : bytes_to_device_) += plan.bytes();
    return ++last_ticket_;
  };
  if (gpu.is_cpu()) {
    copy_on_host(plan);  // CPU <-> CPU: synchronous, its ticket complete at once
    return issue_done_ticket();
  }
  if (plan.bytes() == 0) return issue_done_ticket();
#ifdef CHUNKINFER_WITH_CUDA
  CHUNKINFER_CHECK_VALUE(is_pinned_host(host.data_ptr()), n.op, ": ", n.host,
                         " must be pinned (page-locked) host memory, e.g. from PinnedArena.allocate or "
                         "tensor.pin_memory(); got pageable memory");
  return copy_async(dir, plan, src, dst);
#else
  return -1;  // unreachable: in a CPU-only build device_ is -1, so gpu is a CPU tensor
#endif
}

#ifdef CHUNKINFER_WITH_CUDA

int64_t KVTransferEngine::copy_async(Direction dir, const KVCopy& plan, const at::Tensor& src,
                                     const at::Tensor& dst) {
  const bool to_host = dir == Direction::kToHost;
  const char* op = names_of(to_host).op;
  const c10::cuda::CUDAGuard guard(index_of(device_));
  const cudaStream_t current = c10::cuda::getCurrentCUDAStream(index_of(device_)).stream();
  const cudaStream_t stream = to_host ? d2h_ : h2d_;
  std::vector<InFlight> finished;  // declared before the lock: dropped after it is released
  const std::lock_guard<std::mutex> lk(mu_);
  collect_done_locked(finished);
  const cudaEvent_t event = take_event_locked();
  try {
    // After everything queued so far on the current stream: it may still write src (offload) or
    // read dst (prefetch).
    CHUNKINFER_CUDA_CHECK(cudaEventRecord(ready_, current), op, ": recording an event on the current stream failed");
    CHUNKINFER_CUDA_CHECK(cudaStreamWaitEvent(stream, ready_, 0), op, ": ordering the copy stream after the current stream failed");
    CHUNKINFER_CUDA_CHECK(
        cudaMemcpy2DAsync(plan.dst, static_cast<size_t>(plan.dst_pitch), plan.src, static_cast<size_t>(plan.src_pitch),
                          static_cast<size_t>(plan.width), static_cast<size_t>(plan.rows),
                          to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, stream),
        op, ": cudaMemcpy2DAsync of ", plan.rows, " rows of ", plan.width, " bytes (source pitch ",
        plan.src_pitch, ", destination pitch ", plan.dst_pitch, " bytes) failed");
    CHUNKINFER_CUDA_CHECK(cudaEventRecord(event, stream), op, ": recording the copy's event failed");
  } catch (...) {
    free_events_.push_back(event);
    throw;
  }
  const int64_t ticket = ++last_ticket_;
  (to_host ? bytes_to_host_ : bytes_to_device_) += plan.bytes();
  in_flight_.emplace(ticket, InFlight{event, src, dst});
  return ticket;
}

void KVTransferEngine::collect_done_locked(std::vector<InFlight>& finished) {
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    const cudaError_t err = cudaEventQuery(it->second.event);
    if (err == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: keep it out of the next check
      ++it;
      continue;
    }
    CHUNKINFER_CUDA_CHECK(err, "KVTransferEngine: the copy of ticket ", it->first, " failed");
    free_events_.push_back(it->second.event);
    finished.push_back(std::move(it->second));
    it = in_flight_.erase(it);
  }
}

cudaEvent_t KVTransferEngine::take_event_locked() {
  if (!free_events_.empty()) {
    const cudaEvent_t event = free_events_.back();
    free_events_.pop_back();
    return event;
  }
  cudaEvent_t event = nullptr;
  CHUNKINFER_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
                        "KVTransferEngine: creating an event failed");
  return event;
}

void KVTransferEngine::release_cuda() noexcept {
  if (device_ < 0) return;
  try {
    const c10::cuda::CUDAGuard guard(index_of(device_));
    // Errors are ignored: this runs in a destructor, possibly at interpreter exit.
    if (d2h_ != nullptr) (void)cudaStreamSynchronize(d2h_);
    if (h2d_ != nullptr) (void)cudaStreamSynchronize(h2d_);
    for (auto& [ticket, copy] : in_flight_) (void)cudaEventDestroy(copy.event);
    in_flight_.clear();
    for (const cudaEvent_t event : free_events_) (void)cudaEventDestroy(event);
    free_events_.clear();
    if (ready_ != nullptr) (void)cudaEventDestroy(ready_);
    if (d2h_ != nullptr) (void)cudaStreamDestroy(d2h_);
    if (h2d_ != nullptr) (void)cudaStreamDestroy(h2d_);
    (void)cudaGetLastError();
  } catch (...) {
  }
  ready_ = nullptr;
  d2h_ = h2d_ = nullptr;
}

#endif  // CHUNKINFER_WITH_CUDA

void KVTransferEngine::check_ticket(const char* op, int64_t ticket, bool allow_all) const {
  CHUNKINFER_CHECK_VALUE((allow_all && ticket == -1) || (ticket >= 1 && ticket <= last_ticket_), op,
                         ": unknown ticket ", ticket, " (tickets issued so far: 1 to ", last_ticket_,
                         allow_all ? "; -1 means every copy)" : ")");
}

void KVTransferEngine::wait(int64_t ticket) {
  const std::lock_guard<std::mutex> lk(mu_);
  check_ticket("wait", ticket, false);
#ifdef CHUNKINFER_WITH_CUDA
  const auto it = in_flight_.find(ticket);
  if (it == in_flight_.end()) return;  // complete (or a synchronous copy): nothing to wait for
  const c10::cuda::CUDAGuard guard(index_of(device_));
  const cudaStream_t current = c10::cuda::getCurrentCUDAStream(index_of(device_)).stream();
  CHUNKINFER_CUDA_CHECK(cudaStreamWaitEvent(current, it->second.event, 0),
                        "wait: making the current stream wait for ticket ", ticket, " failed");
#endif
}

void KVTransferEngine::synchronize(int64_t ticket) {
#ifdef CHUNKINFER_WITH_CUDA
  cudaEvent_t event = nullptr;
  {
    const std::lock_guard<std::mutex> lk(mu_);
    check_ticket("synchronize", ticket, true);
    if (ticket != -1) {
      const auto it = in_flight_.find(ticket);
      if (it == in_flight_.end()) return;
      event = it->second.event;
    } else if (in_flight_.empty()) {
      return;
    }
  }
  // Outside the lock so other threads keep issuing copies. Should the event be recycled meanwhile,
  // it is re-recorded for a later copy: the wait only gets longer, never too short.
  const c10::cuda::CUDAGuard guard(index_of(device_));
  if (event != nullptr) {
    CHUNKINFER_CUDA_CHECK(cudaEventSynchronize(event), "synchronize: waiting for ticket ", ticket, " failed");
  } else {
    CHUNKINFER_CUDA_CHECK(cudaStreamSynchronize(d2h_), "synchronize: waiting for the device-to-host stream failed");
    CHUNKINFER_CUDA_CHECK(cudaStreamSynchronize(h2d_), "synchronize: waiting for the host-to-device stream failed");
  }
  std::vector<InFlight> finished;
  const std::lock_guard<std::mutex> lk(mu_);
  collect_done_locked(finished);
#else
  const std::lock_guard<std::mutex> lk(mu_);
  check_ticket("synchronize", ticket, true);
#endif
}

bool KVTransferEngine::done(int64_t ticket) {
#ifdef CHUNKINFER_WITH_CUDA
  std::vector<InFlight> finished;
  const std::lock_guard<std::mutex> lk(mu_);
  check_ticket("done", ticket, false);
  collect_done_locked(finished);
  return in_flight_.count(ticket) == 0;
#else
  const std::lock_guard<std::mutex> lk(mu_);
  check_ticket("done", ticket, false);
  return true;
#endif
}

int64_t KVTransferEngine::pending() {
#ifdef CHUNKINFER_WITH_CUDA
  std::vector<InFlight> finished;
  const std::lock_guard<std::mutex> lk(mu_);
  collect_done_locked(finished);
  return static_cast<int64_t>(in_flight_.size());
#else
  return 0;
#endif
}

int64_t KVTransferEngine::bytes_to_host() const {
  const std::lock_guard<std::mutex> lk(mu_);
  return bytes_to_host_;
}

int64_t KVTransferEngine::bytes_to_device() const {
  const std::lock_guard<std::mutex> lk(mu_);
  return bytes_to_device_;
}

int64_t KVTransferEngine::last_ticket() const {
  const std::lock_guard<std::mutex> lk(mu_);
  return last_ticket_;
}

}  // namespace chunkinfer::offload
