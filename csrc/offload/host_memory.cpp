#include "host_memory.h"

#include <sys/mman.h>

#include <cstdlib>

#include "../message.h"
#include "cuda_check.h"

#ifdef CHUNKINFER_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace chunkinfer::offload {


void check_pinned_supported(int device) {
#ifdef CHUNKINFER_WITH_CUDA
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // a missing driver or device is not an error later calls should see
    count = 0;
  }
  CHUNKINFER_CHECK(count > 0, "PinnedArena: pinned=True needs a CUDA device and none is usable (",
                   err == cudaSuccess ? "0 devices" : cudaGetErrorString(err),
                   "); pass pinned=False for plain host memory");
  CHUNKINFER_CHECK(device >= 0 && device < count, "PinnedArena: device ", device,
                   " does not exist (", count, " CUDA devices visible)");
#else
  (void)device;
  CHUNKINFER_CHECK(false, "PinnedArena: pinned=True needs the CUDA build of chunkinfer, this is a "
                   "CPU-only build; pass pinned=False for plain host memory");
#endif
}

void* alloc_host_slab(int64_t bytes, bool pinned, int device) {
  void* p = nullptr;
  if (pinned) {
#ifdef CHUNKINFER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    // Not cudaHostAlloc: it holds the driver's lock while it faults and locks the pages, which
    // stalls the compute stream's launches (a 262k-token streamed prefill ran at 0.56x resident on the
    // H200 that way, 0.97x like this). Here the kernel faults the pages in without any CUDA lock held
    // (MAP_POPULATE) and cudaHostRegister only locks and maps them.
    p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    CHUNKINFER_CHECK(p != MAP_FAILED, "PinnedArena: mmap of ", bytes, " bytes failed");
    const cudaError_t err = cudaHostRegister(p, static_cast<size_t>(bytes), cudaHostRegisterDefault);
    if (err != cudaSuccess) munmap(p, static_cast<size_t>(bytes));
    CHUNKINFER_CUDA_CHECK(err, "PinnedArena: cudaHostRegister of ", bytes, " bytes failed");
#else
    (void)device;
    CHUNKINFER_CHECK(false, "PinnedArena: pinned memory needs the CUDA build");
#endif
    return p;
  }
  p = std::aligned_alloc(static_cast<size_t>(kSlabAlign), static_cast<size_t>(bytes));
  CHUNKINFER_CHECK(p != nullptr, "PinnedArena: allocating ", bytes, " bytes of host memory failed");
  return p;
}

void free_host_slab(void* p, int64_t bytes, bool pinned) noexcept {
  if (p == nullptr) return;
  if (pinned) {
#ifdef CHUNKINFER_WITH_CUDA
    // At interpreter exit the runtime may already be unloaded; nothing useful to do about an error.
    if (cudaHostUnregister(p) != cudaSuccess) (void)cudaGetLastError();
    munmap(p, static_cast<size_t>(bytes));
#else
    (void)bytes;
#endif
    return;
  }
  std::free(p);
}

}  // namespace chunkinfer::offload
