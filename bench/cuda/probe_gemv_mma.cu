// Probe for issue #25's lever: a gemv on tensor cores whose every row is computed the same way whatever
// the number of rows (1 to 16), so that a T-token step reads each weight once and still equals T one-token
// steps bit for bit. Not used by the library; it answers, on the H200, before any integration:
//   1. are rows of an n-row call bit-equal to one-row calls (n = 2..16)?
//   2. how far from the copy rate is it at n = 1, 4, 16, against the library's gemv (CUDA cores, <= 4 rows)?
//   3. what does a fixed split of K over blocks (needed where 16 rows of x do not fit in shared memory,
//      down_proj's K = 14336) cost?
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -o probe_gemv_mma \
//        bench/cuda/probe_gemv_mma.cu && ./probe_gemv_mma
//
// The design. y[t, o] = sum_k x[t, k] w[o, k]. One mma.m16n8k16 takes x's rows as A (16 rows: the step's
// tokens, rows past n zero) and 8 weight rows as B; a warp owns 16 weight rows (two n-tiles sharing A).
// K is walked in 32-element chunks in a fixed order, and inside a chunk lane (g, c) holds elements
// [8c, 8c + 8) of weight rows g and g + 8 and of x rows g and g + 8: the first four are the k-slots
// {2c, 2c + 1, 2c + 8, 2c + 9} of one mma, the last four of the next (a fixed permutation of k inside the
// chunk, the same for A and B, so every operand is one 16-byte load). Each output element is its own dot
// product in the tensor core, so row t's result depends on x[t] and the weights alone. Weights stream
// through a per-warp cp.async ring in shared memory (each lane reads back what it copied: no barrier);
// x sits in shared memory (n rows; rows past n are zero registers). With a split of K in S parts, block
// part s writes fp32 partials and a second kernel adds the S parts in order: fixed by the shape, so rows
// stay invariant.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/device_util.cuh"
#include "cuda/gemv_kernels.cuh"
#include "bench_util.cuh"

using bf16 = __nv_bfloat16;
using chunkinfer::cuda::cp_async16;
using chunkinfer::cuda::cp_async_commit;
using chunkinfer::cuda::cp_async_wait;

namespace probe {

constexpr int kWarps = 4;         // warps per block, 16 weight rows each
constexpr int kStageChunks = 4;   // 32-element chunks of K per stage: 128 elements, 4 KB of a warp's 16 rows
constexpr int kStages = 5;        // a warp's ring: 4 stages (16 KB) in flight while it computes one
constexpr int kRingVecs = kStages * 2 * kStageChunks * 32;  // 16-byte vectors per warp
constexpr int kMaxRows = 16;

__device__ __forceinline__ void mma_bf16(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// grid: (O / 16 / kWarps, S). Block (i, s): weight rows [16 (kWarps i + warp), + 16) over K-part s.
// out: bf16 [n, O] when S == 1, else fp32 partials [S, n, O].
__global__ void __launch_bounds__(kWarps * 32) gemv_mma_kernel(void* out, const bf16* __restrict__ x,
                                                             const bf16* __restrict__ w, int n, int64_t K,
                                                             int64_t O) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int S = gridDim.y, part = blockIdx.y;
  const int64_t k_part = K / S, k0 = part * k_part;   // K % (32 S) == 0 (host checks)
  const int64_t chunks = k_part / 32;
  uint4* ring = reinterpret_cast<uint4*>(smem) + warp * kRingVecs;
  bf16* xs = reinterpret_cast<bf16*>(smem + kWarps * kRingVecs * 16);
  const int64_t xstride = k_part + 32;  // 64 bytes of padding per row: two rows' 64-byte pieces share no bank

  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bf16* w0 = w + (tile * 16 + g) * K + k0 + 8 * c;
  const bf16* w1 = w0 + 8 * K;
  const int64_t stages = (chunks + kStageChunks - 1) / kStageChunks;
  auto issue = [&](int64_t s) {
    if (s < stages) {
      uint4* slot = ring + (s % kStages) * (2 * kStageChunks * 32);
#pragma unroll
      for (int u = 0; u < kStageChunks; ++u) {
        const int64_t ch = s * kStageChunks + u;
        if (ch < chunks) {
          cp_async16(slot + (2 * u) * 32 + lane, w0 + ch * 32);
          cp_async16(slot + (2 * u + 1) * 32 + lane, w1 + ch * 32);
        }
      }
    }
    cp_async_commit();
  };
  for (int s = 0; s < kStages - 1; ++s) issue(s);

  for (int64_t i = threadIdx.x; i < n * (k_part / 8); i += blockDim.x) {
    const int64_t r = i / (k_part / 8), v = i % (k_part / 8);
    *reinterpret_cast<uint4*>(xs + r * xstride + v * 8) = *reinterpret_cast<const uint4*>(x + r * K + k0 + v * 8);
  }
  __syncthreads();

  float acc[2][4] = {};
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const bf16* xa_row = xs + g * xstride + 8 * c;
  const bf16* xb_row = xs + (g + 8) * xstride + 8 * c;
  for (int64_t s = 0; s < stages; ++s) {
    cp_async_wait<kStages - 2>();
    const uint4* slot = ring + (s % kStages) * (2 * kStageChunks * 32);
#pragma unroll
    for (int u = 0; u < kStageChunks; ++u) {
      const int64_t ch = s * kStageChunks + u;
      if (ch < chunks) {
        const uint4 wa = slot[(2 * u) * 32 + lane], wb = slot[(2 * u + 1) * 32 + lane];
        const uint4 xa = g < n ? *reinterpret_cast<const uint4*>(xa_row + ch * 32) : zero;
        const uint4 xb = g + 8 < n ? *reinterpret_cast<const uint4*>(xb_row + ch * 32) : zero;
        const unsigned a0[4] = {xa.x, xb.x, xa.y, xb.y}, a1[4] = {xa.z, xb.z, xa.w, xb.w};
        mma_bf16(acc[0], a0, wa.x, wa.y);
        mma_bf16(acc[1], a0, wb.x, wb.y);
        mma_bf16(acc[0], a1, wa.z, wa.w);
        mma_bf16(acc[1], a1, wb.z, wb.w);
      }
    }
    asm volatile("" ::: "memory");  // the slot is read before the copy that refills it is issued
    issue(s + kStages - 1);
  }
  cp_async_wait<0>();

  // C fragment: acc[t][0..1] = (x row g, weight rows 8t + 2c, + 1), acc[t][2..3] = (x row g + 8, same)
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    const int64_t o = tile * 16 + 8 * t + 2 * c;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = g + 8 * h;
      if (r >= n) continue;
      if (S == 1) {
        bf16* y = static_cast<bf16*>(out) + r * O + o;
        y[0] = __float2bfloat16_rn(acc[t][2 * h]);
        y[1] = __float2bfloat16_rn(acc[t][2 * h + 1]);
      } else {
        float* y = static_cast<float*>(out) + (static_cast<int64_t>(part) * n + r) * O + o;
        y[0] = acc[t][2 * h];
        y[1] = acc[t][2 * h + 1];
      }
    }
  }
}

// out[i] = bf16(sum over s in order of partials[s, i])
__global__ void add_parts_kernel(bf16* out, const float* partials, int S, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float v = partials[i];
  for (int s = 1; s < S; ++s) v += partials[s * count + i];
  out[i] = __float2bfloat16_rn(v);
}

size_t smem_bytes(int n, int64_t K, int S) {
  return static_cast<size_t>(kWarps) * kRingVecs * 16 + static_cast<size_t>(n) * (K / S + 32) * sizeof(bf16);
}

void launch(bf16* out, float* partials, const bf16* x, const bf16* w, int n, int64_t K, int64_t O, int S) {
  const size_t smem = smem_bytes(n, K, S);
  CHECK_CUDA(cudaFuncSetAttribute(gemv_mma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned(O / 16 / kWarps), unsigned(S));
  gemv_mma_kernel<<<grid, kWarps * 32, smem>>>(S == 1 ? static_cast<void*>(out) : partials, x, w, n, K, O);
  if (S > 1) {
    const int64_t count = n * O;
    add_parts_kernel<<<unsigned((count + 255) / 256), 256>>>(out, partials, S, count);
  }
}

}  // namespace probe

static float bf16_to_float(bf16 v) { return __bfloat162float(v); }

int main() {
  int failures = 0;
  const double copy_gbs = measure_copy_rate().gbs;
  std::printf("device-to-device copy: %.0f GB/s (read + write)\n\n", copy_gbs);
  std::printf("| O x K | S | rows | kernel | ms | weight GB/s | of copy | rows = one-row calls | max rel err |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");

  struct Shape { int64_t O, K; int S; };
  // q|k|v-like, o_proj, gate or up, down (split: 16 rows of its x do not fit in shared memory), and o_proj
  // split to fill the GPU (64 blocks of 4 warps for 132 multiprocessors otherwise)
  const Shape shapes[] = {{6144, 4096, 1}, {4096, 4096, 1}, {14336, 4096, 1}, {4096, 14336, 4}, {4096, 14336, 8},
                          {4096, 4096, 2}};
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  for (const Shape& sh : shapes) {
    const int64_t O = sh.O, K = sh.K;
    const int S = sh.S;
    if (K % (32 * S) || O % (16 * probe::kWarps) || probe::smem_bytes(probe::kMaxRows, K, S) > 227 * 1024) {
      std::printf("| %lld x %lld | %d | skipped: shape not supported by the probe |\n", (long long)O, (long long)K, S);
      continue;
    }
    std::vector<bf16> hw(O * K), hx(probe::kMaxRows * K);
    for (auto& v : hw) v = __float2bfloat16_rn(nd(gen) * 0.02f);
    for (auto& v : hx) v = __float2bfloat16_rn(nd(gen));
    bf16 *w, *x, *y, *y1;
    float* parts;
    CHECK_CUDA(cudaMalloc(&w, O * K * sizeof(bf16)));
    CHECK_CUDA(cudaMalloc(&x, probe::kMaxRows * K * sizeof(bf16)));
    CHECK_CUDA(cudaMalloc(&y, probe::kMaxRows * O * sizeof(bf16)));
    CHECK_CUDA(cudaMalloc(&y1, O * sizeof(bf16)));
    CHECK_CUDA(cudaMalloc(&parts, size_t(S) * probe::kMaxRows * O * sizeof(float)));
    CHECK_CUDA(cudaMemcpy(w, hw.data(), O * K * sizeof(bf16), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(x, hx.data(), probe::kMaxRows * K * sizeof(bf16), cudaMemcpyHostToDevice));

    // one-row calls, row by row: the reference bits
    std::vector<bf16> one(probe::kMaxRows * O);
    for (int r = 0; r < probe::kMaxRows; ++r) {
      probe::launch(y1, parts, x + r * K, w, 1, K, O, S);
      CHECK_CUDA(cudaMemcpy(one.data() + r * O, y1, O * sizeof(bf16), cudaMemcpyDeviceToHost));
    }
    // float64 reference of the one-row results' accuracy
    double worst = 0.0;
    for (int r = 0; r < probe::kMaxRows; r += 5) {
      for (int64_t o = 0; o < O; o += 97) {
        double ref = 0.0;
        for (int64_t k = 0; k < K; ++k) ref += double(bf16_to_float(hx[r * K + k])) * double(bf16_to_float(hw[o * K + k]));
        const double got = bf16_to_float(one[r * O + o]);
        worst = std::max(worst, std::fabs(got - ref) / (std::fabs(ref) + 1e-2));
      }
    }
    if (worst > 1e-2) ++failures;
    for (int n : {1, 2, 4, 8, 16}) {
      CHECK_CUDA(cudaMemset(y, 0xFF, probe::kMaxRows * O * sizeof(bf16)));  // poisoned: NaN bits
      probe::launch(y, parts, x, w, n, K, O, S);
      std::vector<bf16> got(n * O);
      CHECK_CUDA(cudaMemcpy(got.data(), y, n * O * sizeof(bf16), cudaMemcpyDeviceToHost));
      const bool same = std::memcmp(got.data(), one.data(), n * O * sizeof(bf16)) == 0;
      if (!same) ++failures;
      const float ms = median_ms([&] { probe::launch(y, parts, x, w, n, K, O, S); });
      const double gbs = O * K * 2.0 / ms / 1e6;
      std::printf("| %lld x %lld | %d | %d | tensor cores | %.4f | %.0f | %.2f | %s | %.2g |\n", (long long)O,
                  (long long)K, S, n, ms, gbs, gbs / copy_gbs, same ? "bit-equal" : "DIFFERENT", worst);
    }
    // the library's gemv (CUDA cores, at most 4 rows a call) on the same weights
    for (int n : {1, 4}) {
      using namespace chunkinfer::cuda;
      if (gemv_smem_bytes<bf16>(K, n) > size_t(kGemvRingBytes + kGemvMaxXBytes)) continue;
      GemvInput<bf16> in{x, nullptr, nullptr, nullptr, 0.f, false, K, n};
      GemvWeights<bf16> wts{};
      wts.w[0] = w;
      wts.row_end[0] = O;
      wts.segments = 1;
      const float ms = median_ms([&] {
        CHECK_CUDA((launch_gemv<bf16, GemvEpilogue::kStore>(y, O, in, wts, O, nullptr)));
      });
      const double gbs = O * K * 2.0 / ms / 1e6;
      std::printf("| %lld x %lld | - | %d | library gemv | %.4f | %.0f | %.2f | | |\n", (long long)O, (long long)K, n,
                  ms, gbs, gbs / copy_gbs);
    }
    CHECK_CUDA(cudaFree(w));
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(y));
    CHECK_CUDA(cudaFree(y1));
    CHECK_CUDA(cudaFree(parts));
  }
  std::printf("\n%s (%d failures)\n", failures ? "FAILED" : "all rows bit-equal to one-row calls, error within 1e-2",
              failures);
  return failures ? 1 : 0;
}
