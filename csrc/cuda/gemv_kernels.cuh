// Small-batch matrix-vector products for decode steps: y[n] = W x[n] for n <= 4 rows of x, with the
// work around them folded in (q|k|v from three weights in one launch, act(gate)·up). Pure CUDA (see
// device_util.cuh).
//
// Why: a decode step reads every weight once and is bound by HBM bandwidth, but as separate
// cuBLAS GEMVs plus elementwise kernels it costs ~14 launches per layer, and the small ones
// (k_proj, v_proj: 8 MB) never reach full bandwidth.
#pragma once

#include <cstdint>

#include "activation_kernels.cuh"
#include "device_util.cuh"

namespace chunkinfer::cuda {

constexpr int kGemvMaxRows = 4;      // rows of x; more go to cuBLAS (the Python side decides)
constexpr int kGemvMaxSegments = 4;  // weights whose outputs are concatenated (q, k, v)

enum class GemvEpilogue { kStore, kActMul };

// The weights of one call. kStore: segment s holds rows [row_end[s-1], row_end[s]) of the output,
// each with an optional bias. kActMul: w[0] is the gate and w[1] the up projection (row_end[0] rows
// each).
template <typename T>
struct GemvWeights {
  const T* w[kGemvMaxSegments];
  const T* bias[kGemvMaxSegments];  // kStore only; null: none
  int64_t row_end[kGemvMaxSegments];
  int segments;
};

// A streamed weight load: read once, so it should not evict x from L1.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

template <typename T>
__device__ __forceinline__ float dot16(const uint4& wbits, const Vec16<T>& x) {
  Vec16<T> w;
  *reinterpret_cast<uint4*>(&w) = wbits;
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) s = fmaf(to_float(w.v[i]), to_float(x.v[i]), s);
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kGemvThreads = 256;  // 8 rows per block

// One warp per output row: it streams the row in 16-byte loads, kUnroll in flight per lane and
// weight, dots them with every x row, and writes the epilogue (more warps per row, reduced through
// shared memory, measured slower on the H200). The first loads are issued before waiting for the
// kernel that writes x (programmatic dependent launch): weights never depend on it.
// kRows: the compile-time bound of x's rows (n <= kRows). out: [n, out_stride].
template <typename T, int kRows, GemvEpilogue E, ActKind A>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(T* __restrict__ out, int64_t out_stride,
                                                            const T* __restrict__ x, int64_t K, int n,
                                                            const GemvWeights<T> wts, int64_t rows) {
  constexpr int VEC = kVecElems<T>;
  constexpr int kUnroll = 4;  // 8 measured slower
  constexpr bool kTwo = E == GemvEpilogue::kActMul;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;

  int seg = 0;
  if constexpr (E == GemvEpilogue::kStore) {
    while (seg + 1 < wts.segments && row >= wts.row_end[seg]) ++seg;
  }
  const int64_t local = seg ? row - wts.row_end[seg - 1] : row;
  const T* w0 = wts.w[seg] + local * K;
  const T* w1 = kTwo ? wts.w[1] + row * K : nullptr;

  float acc0[kRows], acc1[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc0[i] = acc1[i] = 0.0f;

  const int64_t vecs = K / VEC;
  uint4 a[kUnroll], b[kUnroll];
  auto load_round = [&](int64_t base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + u * 32;
      if (v < vecs) {
        a[u] = load_stream16(w0 + v * VEC);
        if constexpr (kTwo) b[u] = load_stream16(w1 + v * VEC);
      }
    }
  };
  load_round(lane);
  wait_for_prerequisite_grid();  // x is written by the kernel before
  for (int64_t base = lane; base < vecs; base += 32 * kUnroll) {
    if (base != lane) load_round(base);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + u * 32;
      if (v >= vecs) break;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (i < n) {
          const Vec16<T> xv = load16(x + i * K + v * VEC);
          acc0[i] += dot16(a[u], xv);
          if constexpr (kTwo) acc1[i] += dot16(b[u], xv);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (i >= n) break;
    const float s0 = warp_sum(acc0[i]);
    const float s1 = kTwo ? warp_sum(acc1[i]) : 0.0f;
    if (lane != i) continue;
    // roundings as the unfused ops make them: each projection's output in T, then the epilogue
    if constexpr (E == GemvEpilogue::kStore) {
      const T* bias = wts.bias[seg];
      out[i * out_stride + row] = from_float<T>(bias ? s0 + to_float(bias[local]) : s0);
    } else {
      const float g = to_float(from_float<T>(s0)), u = to_float(from_float<T>(s1));
      out[i * out_stride + row] = from_float<T>(act<A>(g) * u);
    }
  }
}

template <typename T, int kRows, GemvEpilogue E, ActKind A>
void launch_gemv_rows(T* out, int64_t out_stride, const T* x, int64_t K, int n, const GemvWeights<T>& wts,
                      int64_t rows, cudaStream_t stream, bool programmatic_launch) {
  const auto kernel = gemv_kernel<T, kRows, E, A>;
  const unsigned grid = static_cast<unsigned>((rows * 32 + kGemvThreads - 1) / kGemvThreads);
  if (programmatic_launch &&
      launch_programmatic(kernel, dim3(grid), dim3(kGemvThreads), 0, stream, out, out_stride, x, K, n, wts, rows)) {
    return;
  }
  kernel<<<grid, kGemvThreads, 0, stream>>>(out, out_stride, x, K, n, wts, rows);
}

// `programmatic_launch` (compute capability 9.0+): may start before the kernel before it ends.
template <typename T, GemvEpilogue E, ActKind A = ActKind::kSilu>
void launch_gemv(T* out, int64_t out_stride, const T* x, int64_t K, int n, const GemvWeights<T>& wts,
                 int64_t rows, cudaStream_t stream, bool programmatic_launch) {
  if (n == 1) {
    launch_gemv_rows<T, 1, E, A>(out, out_stride, x, K, n, wts, rows, stream, programmatic_launch);
  } else {
    launch_gemv_rows<T, kGemvMaxRows, E, A>(out, out_stride, x, K, n, wts, rows, stream, programmatic_launch);
  }
}

}  // namespace chunkinfer::cuda
