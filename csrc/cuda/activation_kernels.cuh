// act(gate) * up: fp32 math, one rounding to the output dtype. Pure CUDA (see device_util.cuh).
#pragma once

#include "../activation.h"
#include "../row_layout.h"
#include "device_util.cuh"

namespace chunkinfer::cuda {

// GELU as 0.5·g·erfc(−g/√2) and its tanh form as g·sigmoid(2u): 1 + erf / 1 + tanh cancel for very
// negative g and would lose every digit of the (tiny) result.
template <Activation A>
__device__ __forceinline__ float act(float g) {
  if constexpr (A == Activation::kSilu) return g / (1.0f + __expf(-g));
  if constexpr (A == Activation::kGeluErf) return 0.5f * g * erfcf(g * -0.70710678118654752f);
  const float u = 0.79788456080286536f * (g + 0.044715f * g * g * g);
  return g / (1.0f + __expf(-2.0f * u));
}

// One work item = one (row, column block) of kThreads * VEC elements; a grid-stride loop covers any
// number of items. kVec: every row start is 16-byte aligned and d is a multiple of VEC.
template <typename T, Activation A, bool kVec>
__global__ void act_and_mul_kernel(T* __restrict__ out,          // [rows, d] at out_rows
                                   const T* __restrict__ gate,   // [rows, d] at gate_rows
                                   const T* __restrict__ up,     // [rows, d] at up_rows
                                   int64_t d, RowLayout gate_rows, RowLayout up_rows, RowLayout out_rows,
                                   int64_t blocks_per_row, int64_t items) {
  constexpr int VEC = kVec ? kVecElems<T> : 1;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / blocks_per_row;
    const int64_t c = ((item % blocks_per_row) * blockDim.x + threadIdx.x) * VEC;
    if (c >= d) continue;
    const T* g = gate + gate_rows.offset(row) + c;
    const T* u = up + up_rows.offset(row) + c;
    T* o = out + out_rows.offset(row) + c;
    if constexpr (kVec) {
      const Vec16<T> gv = load16(g), uv = load16(u);
      Vec16<T> ov;
#pragma unroll
      for (int i = 0; i < VEC; ++i) ov.v[i] = from_float<T>(act<A>(to_float(gv.v[i])) * to_float(uv.v[i]));
      store16(o, ov);
    } else {
      *o = from_float<T>(act<A>(to_float(*g)) * to_float(*u));
    }
  }
}

template <typename T, Activation A>
void launch_act_and_mul(T* out, const T* gate, const T* up, int64_t rows, int64_t d, RowLayout gate_rows,
                        RowLayout up_rows, RowLayout out_rows, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int VEC = kVecElems<T>;
  const bool vec = d % VEC == 0 && gate_rows.strides_multiple_of(VEC) && up_rows.strides_multiple_of(VEC) &&
                   out_rows.strides_multiple_of(VEC) && aligned16(gate) && aligned16(up) && aligned16(out);
  const int64_t per_block = kThreads * (vec ? VEC : 1);
  const int64_t blocks_per_row = (d + per_block - 1) / per_block;
  const int64_t items = rows * blocks_per_row;
  const unsigned grid = static_cast<unsigned>(items < (1LL << 30) ? items : (1LL << 30));
  if (vec) {
    act_and_mul_kernel<T, A, true><<<grid, kThreads, 0, stream>>>(out, gate, up, d, gate_rows, up_rows,
                                                                 out_rows, blocks_per_row, items);
  } else {
    act_and_mul_kernel<T, A, false><<<grid, kThreads, 0, stream>>>(out, gate, up, d, gate_rows, up_rows,
                                                                  out_rows, blocks_per_row, items);
  }
}

}  // namespace chunkinfer::cuda
