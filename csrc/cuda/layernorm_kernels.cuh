// RMSNorm and fused residual-add + RMSNorm: fp32 statistics, HF's rounding points. Pure CUDA.
#pragma once

#include "../row_layout.h"
#include "device_util.cuh"

namespace chunkinfer::cuda {

// Llama rounds x * inv to the dtype before the weight multiply; Gemma multiplies by (1 + w) in fp32.
template <typename T, bool kGemma>
__device__ __forceinline__ T normalise(float v, float inv, float w) {
  if constexpr (kGemma) return from_float<T>(v * inv * (1.0f + w));
  return from_float<T>(to_float(from_float<T>(v * inv)) * w);
}

// One block per row (grid-stride over rows). Pass 1 (fused: residual = round(residual + x), written
// back) accumulates the sum of squares; pass 2 re-reads the row, which this thread itself just read
// or wrote, and writes the normalised output. kVec: 16-byte accesses (h and strides multiples of VEC).
template <typename T, bool kGemma, bool kFused, bool kVec>
__global__ void rms_norm_kernel(T* out,                        // [rows, h] at out_rows; x itself when fused
                                const T* in,                   // [rows, h] at in_rows
                                T* residual,                   // [rows, h] at res_rows; only when fused
                                const T* __restrict__ weight,  // [h]
                                int64_t rows, int64_t h, RowLayout in_rows, RowLayout out_rows,
                                RowLayout res_rows, float eps) {
  constexpr int VEC = kVec ? kVecElems<T> : 1;
  __shared__ float scratch[32];
  const int64_t nvec = h / VEC;
  allow_dependent_launch();  // a decode step's projection after it may start streaming its weights
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x = in + in_rows.offset(row);
    T* r = kFused ? residual + res_rows.offset(row) : nullptr;
    const T* src = kFused ? r : x;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      if constexpr (kVec) {
        Vec16<T> xv = load16(x + i * VEC);
        if constexpr (kFused) {
          const Vec16<T> rv = load16(r + i * VEC);
#pragma unroll
          for (int k = 0; k < VEC; ++k) xv.v[k] = from_float<T>(to_float(rv.v[k]) + to_float(xv.v[k]));
          store16(r + i * VEC, xv);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) ss += to_float(xv.v[k]) * to_float(xv.v[k]);
      } else {
        T v = x[i];
        if constexpr (kFused) {
          v = from_float<T>(to_float(r[i]) + to_float(v));
          r[i] = v;
        }
        ss += to_float(v) * to_float(v);
      }
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / static_cast<float>(h) + eps);
    T* o = out + out_rows.offset(row);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      if constexpr (kVec) {
        const Vec16<T> v = load16(src + i * VEC), w = load16(weight + i * VEC);
        Vec16<T> ov;
#pragma unroll
        for (int k = 0; k < VEC; ++k) ov.v[k] = normalise<T, kGemma>(to_float(v.v[k]), inv, to_float(w.v[k]));
        store16(o + i * VEC, ov);
      } else {
        o[i] = normalise<T, kGemma>(to_float(src[i]), inv, to_float(weight[i]));
      }
    }
  }
}

template <typename T, bool kGemma, bool kFused>
void launch_rms_norm(T* out, const T* in, T* residual, const T* weight, int64_t rows, int64_t h,
                     RowLayout in_rows, RowLayout out_rows, RowLayout res_rows, float eps, cudaStream_t stream) {
  constexpr int VEC = kVecElems<T>;
  const bool vec = h % VEC == 0 && in_rows.strides_multiple_of(VEC) && out_rows.strides_multiple_of(VEC) &&
                   (!kFused || res_rows.strides_multiple_of(VEC)) && aligned16(out) && aligned16(in) &&
                   (!kFused || aligned16(residual)) && aligned16(weight);
  const int64_t nvec = vec ? h / VEC : h;
  int threads = static_cast<int>(((nvec < 1024 ? nvec : 1024) + 31) / 32 * 32);
  threads = threads < 32 ? 32 : threads;
  const unsigned grid = static_cast<unsigned>(rows < (1LL << 30) ? rows : (1LL << 30));
  if (vec) {
    rms_norm_kernel<T, kGemma, kFused, true><<<grid, threads, 0, stream>>>(out, in, residual, weight, rows, h,
                                                                          in_rows, out_rows, res_rows, eps);
  } else {
    rms_norm_kernel<T, kGemma, kFused, false><<<grid, threads, 0, stream>>>(out, in, residual, weight, rows, h,
                                                                           in_rows, out_rows, res_rows, eps);
  }
}

}  // namespace chunkinfer::cuda
