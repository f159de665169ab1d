// Small-batch matrix-vector products for decode steps: y[n] = W h[n] for n <= 4 rows, with the work
// around them folded in: q|k|v from three weights in one launch, act(gate)·up, and in front the
// residual add + RMSNorm that produces h (so the norm costs no launch of its own). Pure CUDA (see
// device_util.cuh).
//
// Why: a decode step reads every weight once and is bound by HBM bandwidth, but as cuBLAS GEMVs plus
// norms and elementwise kernels it costs ~14 launches per layer, and the small projections (q|k|v:
// 50 MB) spend much of their time ramping up and draining.
#pragma once

#include <cstdint>

#include "activation_kernels.cuh"
#include "device_util.cuh"
#include "layernorm_kernels.cuh"

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

// What the kernel multiplies: h = x, or with norm_weight h = rms_norm(x (+ add)) with the rounding
// points of rms_norm / fused_add_rms_norm; residual_out (if set) receives x (+ add), as the residual
// stream after the add. residual_out must not overlap x or add: every block reads them.
template <typename T>
struct GemvInput {
  const T* x;            // [n, K]
  const T* add;          // [n, K] or null
  T* residual_out;       // [n, K] or null
  const T* norm_weight;  // [K] or null: h = x (+ add) as it is
  float eps;
  bool gemma;            // scale by (1 + weight)
  int64_t K;
  int n;
};

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
// A stage is 2 KB of one weight row per warp: against it, 1 KB stages measured 0.14 ms slower per 8B
// decode step (the stream's bookkeeping per byte doubles) and 512-byte ones 0.85 ms; a fifth stage (two
// blocks per multiprocessor instead of three, 8 KB in flight per warp) 0.06 ms faster
// (profile_decode_h200.md, session 9)
constexpr int kGemvStageVecs = 4;  // 16-byte vectors per lane in one stage of a warp's stream
constexpr int kGemvStages = 5;     // a warp's ring: 4 stages (8 KB) in flight while it computes one
constexpr int kGemvStageElems16 = kGemvStageVecs * 32;  // 16-byte vectors per stage
constexpr int kGemvRingBytes = kGemvWarps * kGemvStages * kGemvStageElems16 * 16;
// x's rows staged in shared memory beside the rings; larger x is a matrix product (ops.h has the same)
constexpr int64_t kGemvMaxXBytes = 144 * 1024;

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

// h into shared memory: every block builds it from x (and add, the norm) while its first weight
// loads fly; block 0 also writes the residual. Each thread revisits only the vectors it wrote.
template <typename T>
__device__ void stage_input(const GemvInput<T>& in, T* hs) {
  constexpr int VEC = kVecElems<T>;
  __shared__ float scratch[32];
  const int64_t nvec = in.K / VEC;
  T* res = blockIdx.x == 0 ? in.residual_out : nullptr;
  for (int i = 0; i < in.n; ++i) {
    const int64_t off = i * in.K;
    float ss = 0.0f;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      Vec16<T> xv = load16(in.x + off + v * VEC);
      if (in.add) {
        const Vec16<T> av = load16(in.add + off + v * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) xv.v[k] = from_float<T>(to_float(xv.v[k]) + to_float(av.v[k]));
      }
      if (res) store16(res + off + v * VEC, xv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) ss += to_float(xv.v[k]) * to_float(xv.v[k]);
      store16(hs + off + v * VEC, xv);
    }
    if (!in.norm_weight) continue;  // uniform over the block
    const float inv = rsqrtf(block_sum(ss, scratch) / static_cast<float>(in.K) + in.eps);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      Vec16<T> hv = load16(hs + off + v * VEC);
      const Vec16<T> w = load16(in.norm_weight + v * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        hv.v[k] = in.gemma ? normalise<T, true>(to_float(hv.v[k]), inv, to_float(w.v[k]))
                           : normalise<T, false>(to_float(hv.v[k]), inv, to_float(w.v[k]));
      }
      store16(hs + off + v * VEC, hv);
    }
  }
  __syncthreads();
}

// Where a warp is in its stream of weight rows: output row, piece (kActMul: gate, then up) and
// stage within the piece, with the piece's first element.
template <typename T, int kPieces>
struct StreamCursor {
  int64_t row, stride;  // the warp's rows: row, row + stride, ...
  int piece, stage;
  const T* src;

  __device__ __forceinline__ void seek(const GemvWeights<T>& wts, int64_t K) {
    if constexpr (kPieces == 2) {
      src = (piece ? wts.w[1] : wts.w[0]) + row * K;  // constant indices: no local copy of the weights
    } else {
      const T* base = wts.w[0];
      int64_t local = row;
#pragma unroll  // constant indices keep the weights in the parameter space (no local copy)
      for (int s = 1; s < kGemvMaxSegments; ++s) {
        if (s < wts.segments && row >= wts.row_end[s - 1]) {
          base = wts.w[s];
          local = row - wts.row_end[s - 1];
        }
      }
      src = base + local * K;
    }
  }
  // true where the step finished a piece
  __device__ __forceinline__ bool advance(const GemvWeights<T>& wts, int64_t K, int stages) {
    if (++stage < stages) return false;
    stage = 0;
    if (++piece == kPieces) {
      piece = 0;
      row += stride;
    }
    seek(wts, K);
    return true;
  }
};

// Persistent: warp w of W owns output rows w, w + W, ... (neighbouring warps stream neighbouring
// rows: measured faster than contiguous ranges per warp) and streams their weights through its own
// cp.async ring in shared memory, so ~8 KB per warp are in flight
// without holding registers; every lane reads back only what it copied (no synchronisation between
// lanes). The first stages are issued before waiting for the kernel that writes x (programmatic
// dependent launch): weights never depend on it. kRows: the compile-time bound of x's rows.
// out: [n, out_stride].
template <typename T, int kRows, GemvEpilogue E, Activation A>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(T* __restrict__ out, int64_t out_stride,
                                                            const GemvInput<T> in, const GemvWeights<T> wts,
                                                            int64_t rows) {
  constexpr int VEC = kVecElems<T>;
  constexpr int kPieces = E == GemvEpilogue::kActMul ? 2 : 1;
  constexpr int S = kGemvStages;
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  allow_dependent_launch();  // a gemv after this one may start loading weights as this one's blocks retire
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint4* ring = reinterpret_cast<uint4*>(gemv_smem) + warp * (S * kGemvStageElems16);
  T* hs = reinterpret_cast<T*>(gemv_smem + kGemvRingBytes);

  const int64_t K = in.K, vecs = K / VEC;
  const int stages = static_cast<int>((vecs + kGemvStageElems16 - 1) / kGemvStageElems16);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kGemvWarps;
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  const int64_t my_rows = wid < rows ? (rows - wid + warps - 1) / warps : 0;
  const int64_t total = my_rows * kPieces * stages;

  StreamCursor<T, kPieces> load{wid, warps, 0, 0, nullptr};
  load.seek(wts, K);
  auto issue = [&](int64_t t) {
    if (t < total) {
      uint4* slot = ring + (t % S) * kGemvStageElems16;
#pragma unroll
      for (int u = 0; u < kGemvStageVecs; ++u) {
        const int64_t v = static_cast<int64_t>(load.stage) * kGemvStageElems16 + u * 32 + lane;
        if (v < vecs) cp_async16(slot + u * 32 + lane, load.src + v * VEC);
      }
      load.advance(wts, K, stages);
    }
    cp_async_commit();  // possibly empty: keeps one group per stage
  };
  for (int t = 0; t < S - 1; ++t) issue(t);

  wait_for_prerequisite_grid();  // x (and add) are written by the kernel before
  stage_input(in, hs);

  StreamCursor<T, kPieces> use{wid, warps, 0, 0, nullptr};
  use.seek(wts, K);
  float acc[kRows], gate[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = gate[i] = 0.0f;
  for (int64_t t = 0; t < total; ++t) {
    cp_async_wait<S - 2>();  // this lane's copies of stage t have landed
    const uint4* slot = ring + (t % S) * kGemvStageElems16;
#pragma unroll
    for (int u = 0; u < kGemvStageVecs; ++u) {
      const int64_t v = static_cast<int64_t>(use.stage) * kGemvStageElems16 + u * 32 + lane;
      if (v < vecs) {
        const uint4 w = slot[u * 32 + lane];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          if (i < in.n) acc[i] += dot16(w, load16(hs + i * K + v * VEC));
        }
      }
    }
    asm volatile("" ::: "memory");  // the slot is read before the copy that refills it is issued
    issue(t + S - 1);

    const int64_t row = use.row;
    const int piece = use.piece;
    if (!use.advance(wts, K, stages)) continue;
    // a piece is complete: reduce over the warp; lane i writes x row i's output
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (i >= in.n) break;
      const float s = warp_sum(acc[i]);
      acc[i] = 0.0f;
      // roundings as the unfused ops make them: each projection's output in T, then the epilogue
      if constexpr (E == GemvEpilogue::kStore) {
        if (lane != i) continue;
        // segment and bias worked out here, not kept by the cursor: carrying them through the stream
        // loop measured 0.2 ms slower per 8B decode step (profile_decode_h200.md, session 8)
        int seg = 0;
#pragma unroll
        for (int k = 1; k < kGemvMaxSegments; ++k) seg += k < wts.segments && row >= wts.row_end[k - 1];
        const T* bias = nullptr;
        int64_t local = row;
#pragma unroll
        for (int k = 0; k < kGemvMaxSegments; ++k) {
          if (k == seg) {
            bias = wts.bias[k];
            local = k ? row - wts.row_end[k - 1] : row;
          }
        }
        out[i * out_stride + row] = from_float<T>(bias ? s + to_float(bias[local]) : s);
      } else if (piece == 0) {
        gate[i] = to_float(from_float<T>(s));
      } else if (lane == i) {
        out[i * out_stride + row] = from_float<T>(act<A>(gate[i]) * to_float(from_float<T>(s)));
      }
    }
  }
  cp_async_wait<0>();
}

template <typename T>
constexpr size_t gemv_smem_bytes(int64_t K, int n) {
  return static_cast<size_t>(kGemvRingBytes) + static_cast<size_t>(n) * K * sizeof(T);
}

// How many blocks of a kernel stay resident per multiprocessor with `smem` bytes: asked once per
// kernel, device and size (the answer does not change, and the decode step's eager path calls this
// twice per layer).
template <typename T, int kRows, GemvEpilogue E, Activation A>
cudaError_t resident_blocks_per_sm(int device, size_t smem, int* per_sm) {
  const auto kernel = gemv_kernel<T, kRows, E, A>;
  struct Entry {
    int device;
    size_t smem;
    int per_sm;
  };
  thread_local Entry cache[8] = {};
  thread_local int filled = 0;
  for (int i = 0; i < filled; ++i) {
    if (cache[i].device == device && cache[i].smem == smem) {
      *per_sm = cache[i].per_sm;
      return cudaSuccess;
    }
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kGemvRingBytes + kGemvMaxXBytes));
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, kGemvThreads, smem);
  if (err != cudaSuccess) return err;
  cache[filled % 8] = Entry{device, smem, *per_sm};
  filled = filled < 8 ? filled + 1 : 8;
  return cudaSuccess;
}

// Blocks: at most as many as stay resident at once (the kernel is persistent). Where that leaves
// fewer than half the warps to stream a last row (4096 rows over 3168 resident warps: 928 on a
// second row, with too few loads in flight to keep HBM busy: o_proj with three blocks per
// multiprocessor), fewer warps take equal shares (2048 warps of two rows); otherwise every resident
// warp streams (14336 rows over 3168: 1664 on a fifth row), which measured faster than equal shares.
template <typename T, int kRows, GemvEpilogue E, Activation A>
cudaError_t launch_gemv_rows(T* out, int64_t out_stride, const GemvInput<T>& in, const GemvWeights<T>& wts,
                             int64_t rows, cudaStream_t stream) {
  const auto kernel = gemv_kernel<T, kRows, E, A>;
  const size_t smem = gemv_smem_bytes<T>(in.K, in.n);
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = resident_blocks_per_sm<T, kRows, E, A>(device, smem, &per_sm);
  if (err != cudaSuccess) return err;
  if (rows == 0 && in.residual_out == nullptr) return cudaSuccess;  // nothing to compute or write
  const int64_t resident_warps = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1) * kGemvWarps;
  const int64_t rows_per_warp = rows > 0 ? (rows + resident_warps - 1) / resident_warps : 1;
  const int64_t on_last_row = rows - (rows_per_warp - 1) * resident_warps;
  const int64_t warps = rows_per_warp > 1 && 2 * on_last_row >= resident_warps
                           ? resident_warps
                           : (rows + rows_per_warp - 1) / rows_per_warp;
  const dim3 grid(static_cast<unsigned>(warps > 0 ? (warps + kGemvWarps - 1) / kGemvWarps : 1));
  launch_kernel(/*programmatic=*/true, kernel, grid, dim3(kGemvThreads), smem, stream, out, out_stride, in, wts, rows);
  return cudaGetLastError();
}

// Launched programmatically where the device has it: may start before the kernel before it ends.
template <typename T, GemvEpilogue E, Activation A = Activation::kSilu>
cudaError_t launch_gemv(T* out, int64_t out_stride, const GemvInput<T>& in, const GemvWeights<T>& wts, int64_t rows,
                        cudaStream_t stream) {
  if (in.n == 1) return launch_gemv_rows<T, 1, E, A>(out, out_stride, in, wts, rows, stream);
  return launch_gemv_rows<T, kGemvMaxRows, E, A>(out, out_stride, in, wts, rows, stream);
}

}  // namespace chunkinfer::cuda
