// The Python module: build facts and the stateful classes of KV offload (pinned arena, transfer
// engine). The ops themselves are registered with the dispatcher in registration.cpp.
#include <torch/extension.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#ifdef CHUNKINFER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include "offload/kv_transfer.h"
#include "offload/pinned_arena.h"

namespace {

namespace py = pybind11;
using chunkinfer::offload::KVTransferEngine;
using chunkinfer::offload::PinnedArena;
using release_gil = py::call_guard<py::gil_scoped_release>;

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
  info["cxx_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#ifdef CHUNKINFER_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(CHUNKINFER_CUDA_ARCHS);
  info["cuda_runtime_version"] = CUDART_VERSION;
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
  info["cuda_runtime_version"] = 0;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = std::string(__VERSION__);
  return info;
}

void bind_pinned_arena(py::module_& m) {
  py::class_<PinnedArena>(m, "PinnedArena", R"doc(
Host memory in large slabs, handed out as exact-size CPU tensors (256-byte aligned regions).

Unlike PyTorch's pinned allocator, which rounds each block up to a power of two and caches it, a
region costs its byte size rounded up to 256. Requests bigger than slab_bytes get a slab of their
own (their size rounded up to 2 MiB); others go first-fit into the slabs' free ranges, which are
coalesced when regions are freed. A region returns to the arena when its tensor is freed, also
after the arena object itself is gone. Thread-safe.

Errors: ValueError for bad arguments; RuntimeError when memory cannot be had (mmap / cudaHostRegister or the
host allocator failed, pinned=True without the CUDA build or a CUDA device).
)doc")
      .def(py::init<int64_t, bool, int>(), py::arg("slab_bytes") = int64_t{1} << 30, py::arg("pinned") = true,
           py::arg("device") = 0, R"doc(
slab_bytes: size of a normal slab, rounded up to a multiple of 2 MiB (ValueError if <= 0).
pinned: True = page-locked memory (mmap + cudaHostRegister) (RuntimeError in a CPU-only build or without
  a CUDA device: pass pinned=False); False = plain 2 MiB-aligned host memory.
device: the CUDA device the background grower pins for (ignored when pinned=False).
)doc")
      .def("allocate", &PinnedArena::allocate, py::arg("shape"), py::arg("dtype"), release_gil(), R"doc(
A contiguous, uninitialised CPU tensor of `shape` and `dtype` over a fresh region of exactly
numel * itemsize bytes (rounded up to 256). Zero elements: an ordinary empty tensor. Uses slabs
the background grower has finished; while growth is in flight and no slab can serve the request,
it waits for the grower rather than pinning a slab of its own. ValueError for a negative size.
)doc")
      .def("grow_async", &PinnedArena::grow_async, py::arg("total_bytes"), py::arg("region_bytes") = 0, release_gil(), R"doc(
Starts (or extends) a background thread that allocates/pins slabs until bytes_reserved
>= total_bytes, so that pinning (slow: ~2.6 GiB/s) overlaps GPU work. Returns at once.
region_bytes: the size of the regions about to be allocated (0: unknown, slabs of the normal size).
The grown slabs then hold a whole number of such regions (one if a region is bigger than a normal
slab), so a region a little over half a slab does not leave the other half unused.
)doc")
      .def("wait_grown", &PinnedArena::wait_grown, release_gil(), R"doc(
Blocks until the background growth has ended; raises RuntimeError with what it failed on (bytes
requested, bytes reserved, the CUDA error), once.
)doc")
      .def("trim", &PinnedArena::trim, release_gil(), "Frees every slab with no live region; returns the bytes freed.")
      .def_property_readonly("bytes_reserved", &PinnedArena::bytes_reserved, "Bytes held in slabs.")
      .def_property_readonly("bytes_used", &PinnedArena::bytes_used,
                             "Bytes in live regions (each request rounded up to 256).")
      .def_property_readonly("slab_count", &PinnedArena::slab_count, "Number of slabs held.")
      .def_property_readonly("slab_bytes", &PinnedArena::slab_bytes, "A normal slab's size in bytes.")
      .def_property_readonly("pinned", &PinnedArena::pinned, "Whether the slabs are page-locked.")
      .def_property_readonly("device", &PinnedArena::device, "The device pinned for (-1 when not pinned).")
      .def_property_readonly("growing", &PinnedArena::growing, "Whether background growth is in flight.")
      .def_property_readonly(
          "pinning_seconds",
          [](const PinnedArena& a) {
            const auto t = a.pinning_seconds();
            return py::make_tuple(t.fault_in_seconds, t.register_seconds);
          },
          "(faulting pages in, cudaHostRegister): seconds summed over the slabs pinned so far; (0, 0) when\n"
          "not pinned. Both run on the grower thread (or in allocate when no grown slab serves a request).");
}

void bind_kv_transfer_engine(py::module_& m) {
  py::class_<KVTransferEngine>(m, "KVTransferEngine", R"doc(
Moves position ranges of KV buffers between a GPU and pinned host memory on two copy streams of
its own (host->device, device->host), ordered by CUDA events, never by host syncs.

Buffers are [B, H, capacity, D] with positions on dim 2, laid out as B*H rows of capacity*D
elements (strides [H*P, P, D, 1], P >= capacity*D: contiguous, or a slice along capacity). src and
dst need the same dtype, B, H and D; their capacities may differ.

Each copy is queued after the work already on the caller's current CUDA stream and returns a
ticket (increasing ints from 1). The engine keeps src and dst alive until the copy is seen done.
Before the current stream reads a prefetched buffer, or overwrites an offloaded one, call
wait(ticket).

A CPU engine (device=-1, or any engine of a CPU-only build) copies between CPU tensors only,
synchronously. Any engine copies CPU -> CPU synchronously; its tickets are complete at once.

Errors: ValueError for bad arguments (shapes, strides, dtypes, devices, ranges, unpinned host
memory, unknown tickets); RuntimeError for CUDA failures.
)doc")
      .def(py::init<int64_t>(), py::arg("device") = 0,
           "device: the CUDA device index, or -1 for a CPU engine. RuntimeError if the device is not available.")
      .def("offload", &KVTransferEngine::offload, py::arg("src_gpu"), py::arg("dst_host"), py::arg("p0"),
           py::arg("p1"), py::arg("dst_p0") = -1, release_gil(), R"doc(
Copies positions [p0, p1) of src_gpu to [dst_p0, dst_p0 + p1 - p0) of dst_host (dst_p0=-1: p0) on
the device-to-host stream, after the current stream's queued work. dst_host must be pinned (e.g.
from PinnedArena). Returns the ticket.
)doc")
      .def("prefetch", &KVTransferEngine::prefetch, py::arg("src_host"), py::arg("dst_gpu"), py::arg("p0"),
           py::arg("p1"), py::arg("dst_p0") = -1, release_gil(), R"doc(
Copies positions [p0, p1) of src_host (pinned) to [dst_p0, dst_p0 + p1 - p0) of dst_gpu on the
host-to-device stream, after the current stream's queued work (which may still read dst_gpu).
Returns the ticket.
)doc")
      .def("wait", &KVTransferEngine::wait, py::arg("ticket"), release_gil(),
           "Makes the current CUDA stream wait for the ticket's copy (no host block).")
      .def("synchronize", &KVTransferEngine::synchronize, py::arg("ticket") = -1, release_gil(),
           "Blocks the host until the ticket's copy (-1: every copy issued so far) is done.")
      .def("done", &KVTransferEngine::done, py::arg("ticket"), release_gil(),
           "Whether the ticket's copy has finished.")
      .def_property_readonly("bytes_to_host", &KVTransferEngine::bytes_to_host, "Bytes copied by offload so far.")
      .def_property_readonly("bytes_to_device", &KVTransferEngine::bytes_to_device,
                             "Bytes copied by prefetch so far.")
      .def_property_readonly("pending", &KVTransferEngine::pending, "Tickets whose copies are still running.")
      .def_property_readonly("last_ticket", &KVTransferEngine::last_ticket, "The latest ticket issued (0: none).")
      .def_property_readonly("device", &KVTransferEngine::device, "The CUDA device index; -1 for a CPU engine.");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "chunkinfer's compiled core";
  m.def("build_info", &build_info, "What this extension was built with");
  bind_pinned_arena(m);
  bind_kv_transfer_engine(m);
}
