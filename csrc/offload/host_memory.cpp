#include "host_memory.h"

#include <sys/mman.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>

#include "../message.h"
#include "cuda_check.h"

#ifdef CHUNKINFER_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace chunkinfer::offload {

#ifdef CHUNKINFER_WITH_CUDA
namespace {

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Anonymous memory on a 2 MiB boundary, asked to be backed by transparent huge pages and faulted in
// here, before any CUDA call. Where THP is "madvise" (the H200 host) only memory that asks gets huge
// pages; 4 KiB pages are 512 times as many for cudaHostRegister to pin and map. Measured there: a
// 262k-token streamed prefill after stock's offloaded run, 0.79-0.83x resident with 4 KiB pages,
// 0.96x with huge pages (bench/results/offload_h200.md).
void* map_faulted_in(int64_t bytes) {
  const size_t n = static_cast<size_t>(bytes), align = static_cast<size_t>(kSlabAlign);
  void* raw = mmap(nullptr, n + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHUNKINFER_CHECK(raw != MAP_FAILED, "PinnedArena: mmap of ", bytes, " bytes failed");
  const uintptr_t lo = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t base = (lo + align - 1) / align * align;
  if (base > lo) munmap(raw, base - lo);
  munmap(reinterpret_cast<void*>(base + n), lo + align - base);  // base - lo < align: never empty
  char* p = reinterpret_cast<char*>(base);
  (void)madvise(p, n, MADV_HUGEPAGE);  // advice only: without THP the pages are 4 KiB
  if (madvise(p, n, MADV_POPULATE_WRITE) != 0) {
    const int err = errno;
    if (err != EINVAL) {  // EINVAL: a kernel before 5.14; fault the pages in by touching them
      munmap(p, n);
      CHUNKINFER_CHECK(false, "PinnedArena: faulting in ", bytes, " bytes of host memory failed (errno ", err,
                       "): not enough free memory?");
    }
    for (size_t off = 0; off < n; off += 4096) static_cast<volatile char*>(p)[off] = 0;
  }
  return p;
}

}  // namespace
#endif  // CHUNKINFER_WITH_CUDA


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

void* alloc_host_slab(int64_t bytes, bool pinned, int device, SlabTiming* timing) {
  void* p = nullptr;
  if (pinned) {
#ifdef CHUNKINFER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    // Not cudaHostAlloc: it holds the driver's lock while it faults and locks the pages, which
    // stalls the compute stream's launches (a 262k-token streamed prefill ran at 0.56x resident on the
    // H200 that way, 0.97x like this). Here the kernel faults the pages in without any CUDA lock held
    // and cudaHostRegister only locks and maps them.
    auto t0 = std::chrono::steady_clock::now();
    p = map_faulted_in(bytes);
    const double fault_in = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    const cudaError_t err = cudaHostRegister(p, static_cast<size_t>(bytes), cudaHostRegisterDefault);
    if (err != cudaSuccess) munmap(p, static_cast<size_t>(bytes));
    CHUNKINFER_CUDA_CHECK(err, "PinnedArena: cudaHostRegister of ", bytes, " bytes failed");
    if (timing != nullptr) *timing = SlabTiming{fault_in, seconds_since(t0)};
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
