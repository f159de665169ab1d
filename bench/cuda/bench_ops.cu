// nvcc benchmark of the activation and norm kernels against the copy bandwidth it measures itself.
// Bytes counted = bytes read + bytes written, as for the device-to-device copy.
//   cmake -S . -B build/cmake && cmake --build build/cmake --target bench_ops && build/cmake/bench_ops
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/activation_kernels.cuh"
#include "cuda/layernorm_kernels.cuh"
#include "bench_util.cuh"

using bf16 = __nv_bfloat16;
using namespace chunkinfer::cuda;


__global__ void fill_random(bf16* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2bfloat16((h & 0xffff) / 32768.0f - 1.0f);
  }
}


bf16* alloc_random(int64_t n, uint32_t seed) {
  bf16* p;
  CHECK_CUDA(cudaMalloc(&p, n * sizeof(bf16)));
  fill_random<<<1024, 256>>>(p, n, seed);
  CHECK_CUDA(cudaGetLastError());
  return p;
}

chunkinfer::RowLayout contiguous_rows(int64_t rows, int64_t stride) {
  return chunkinfer::RowLayout{rows, stride, 0};
}

int main() {
  const int64_t rows = 32768, d = 14336, hidden = 4096;

  const CopyRate copy = measure_copy_rate();
  const double copy_gbs = copy.gbs;
  std::printf("| kernel | shape | ms | GB/s | of copy |\n|---|---|---|---|---|\n");
  std::printf("| device-to-device copy | %lld B | %.3f | %.0f | 1.00 |\n", (long long)copy.bytes, copy.ms, copy_gbs);

  bf16* x = alloc_random(rows * 2 * d, 1);
  bf16* out = alloc_random(rows * d, 2);
  const float act_ms = median_ms([&] {
    launch_act_and_mul<bf16, chunkinfer::Activation::kSilu>(out, x, x + d, rows, d, contiguous_rows(rows, 2 * d),
                                             contiguous_rows(rows, 2 * d), contiguous_rows(rows, d), 0);
  });
  const double act_gbs = 3.0 * rows * d * sizeof(bf16) / act_ms / 1e6;
  std::printf("| silu_and_mul bf16 | [%lld, 2*%lld] | %.3f | %.0f | %.2f |\n", (long long)rows, (long long)d, act_ms,
              act_gbs, act_gbs / copy_gbs);
  CHECK_CUDA(cudaFree(x));
  CHECK_CUDA(cudaFree(out));

  bf16* hx = alloc_random(rows * hidden, 3);
  bf16* res = alloc_random(rows * hidden, 4);
  bf16* w = alloc_random(hidden, 5);
  const float norm_ms = median_ms([&] {
    const chunkinfer::RowLayout dense = contiguous_rows(rows, hidden);
    launch_rms_norm<bf16, false, true>(hx, hx, res, w, rows, hidden, dense, dense, dense, 1e-6f, 0);
  });
  const double norm_gbs = 4.0 * rows * hidden * sizeof(bf16) / norm_ms / 1e6;
  std::printf("| fused_add_rms_norm bf16 | [%lld, %lld] | %.3f | %.0f | %.2f |\n", (long long)rows,
              (long long)hidden, norm_ms, norm_gbs, norm_gbs / copy_gbs);
  CHECK_CUDA(cudaFree(hx));
  CHECK_CUDA(cudaFree(res));
  CHECK_CUDA(cudaFree(w));
  return 0;
}
