// Decode attention bandwidth without libtorch: the kernels of csrc/cuda/attention_kernels.cuh on a
// bf16 cache of Hq=32, Hkv=8, D=128, batch 1, one query token, against cudaMemcpy device-to-device
// copy bandwidth measured in the same run (bytes read + written, as the copy's own figure).
//
// Build and run (no CMakeLists.txt in this tree yet):
//   nvcc -O3 -std=c++17 --use_fast_math -gencode=arch=compute_90a,code=sm_90a \
//        -o bench_attention bench/cuda/bench_attention.cu && ./bench_attention [L ...]
// Default lengths: 8192 32768 131072 524288. Prints one line per length. SPLITS=n overrides the
// library's split count (to sweep it); KERNEL=fma runs pass 1 on FMAs instead of tensor cores.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../../csrc/cuda/attention_kernels.cuh"
#include "bench_util.cuh"


using chunkinfer::attention::DecodeParams;
using bf16 = __nv_bfloat16;

__global__ void fill_random(bf16* x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16((h & 0xffff) / 32768.0f - 1.0f);
  }
}


int main(int argc, char** argv) {
  std::vector<int> lengths = {8192, 32768, 131072, 524288};
  if (argc > 1) {
    lengths.clear();
    for (int i = 1; i < argc; ++i) lengths.push_back(std::atoi(argv[i]));
  }
  const int B = 1, Hq = 32, Hkv = 8, T = 1, D = 128;
  const char* pdl_env = std::getenv("PDL");  // PDL=0: pass 2 as an ordinary launch, to compare
  const bool pdl = !(pdl_env && std::atoi(pdl_env) == 0);
  const char* kernel_env = std::getenv("KERNEL");  // KERNEL=fma: pass 1 without tensor cores, to compare
  const bool tensor_cores = !(kernel_env && std::string(kernel_env) == "fma");
  int dev = 0, sms = 0, l2 = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));

  const double copy_gbps = measure_copy_rate(int64_t(1) << 30).gbs;
  std::printf("device-to-device copy: %.0f GB/s (read + written), %d SMs, L2 %d MB, programmatic launch %s, pass 1 on %s\n",
              copy_gbps, sms, l2 >> 20, pdl ? "on" : "off", tensor_cores ? "tensor cores" : "FMAs");

  for (const int L : lengths) {
    const size_t kv_elems = size_t(B) * Hkv * L * D;
    const size_t kv_bytes = 2 * kv_elems * sizeof(bf16);
    // rotate among enough caches that each call finds its K, V out of L2
    const int copies = int(std::max<size_t>(1, (4 * size_t(l2) + kv_bytes - 1) / kv_bytes));
    std::vector<bf16*> ks(copies), vs(copies);
    for (int c = 0; c < copies; ++c) {
      CHECK_CUDA(cudaMalloc(&ks[c], kv_elems * sizeof(bf16)));
      CHECK_CUDA(cudaMalloc(&vs[c], kv_elems * sizeof(bf16)));
      fill_random<<<1024, 256>>>(ks[c], kv_elems, 2 * c + 1);
      fill_random<<<1024, 256>>>(vs[c], kv_elems, 2 * c + 2);
    }
    bf16 *q, *out;
    float *lse, *work;
    int* lens;
    CHECK_CUDA(cudaMalloc(&q, size_t(B) * Hq * T * D * sizeof(bf16)));
    CHECK_CUDA(cudaMalloc(&out, size_t(B) * Hq * T * D * sizeof(bf16)));
    CHECK_CUDA(cudaMalloc(&lse, size_t(B) * Hq * T * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&lens, B * sizeof(int)));
    fill_random<<<32, 256>>>(q, size_t(B) * Hq * T * D, 99);
    CHECK_CUDA(cudaMemcpy(lens, &L, sizeof(int), cudaMemcpyHostToDevice));

    DecodeParams p{};
    p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.T = T, p.D = D, p.cap = L, p.window = 0;
    p.scale_log2 = chunkinfer::attention::kLog2e / 11.313708498984761f;
    p.splits = chunkinfer::attention::decode_attention_num_splits<bf16>(B, Hq, Hkv, T, D, L, sms, tensor_cores);
    if (const char* env = std::getenv("SPLITS")) p.splits = std::atoi(env);  // to sweep the split count
    const size_t part_rows = size_t(B) * Hq * T * p.splits;
    CHECK_CUDA(cudaMalloc(&work, part_rows * (D + 1) * sizeof(float)));
    p.part_out = work;
    p.part_lse = work + part_rows * D;
    p.q = q, p.out = out, p.lse = lse, p.seq_lens = lens, p.starts = nullptr;
    p.q_sb = int64_t(Hq) * T * D, p.q_sh = int64_t(T) * D, p.q_st = D;
    p.k_sb = p.v_sb = int64_t(Hkv) * L * D, p.k_sh = p.v_sh = int64_t(L) * D, p.k_sp = p.v_sp = D;
    p.o_sb = p.q_sb, p.o_sh = p.q_sh, p.o_st = p.q_st;
    p.l_sb = int64_t(Hq) * T, p.l_sh = T, p.l_st = 1;

    int next = 0;
    const float ms = median_ms(
        [&] {
          p.k = ks[next];
          p.v = vs[next];
          next = (next + 1) % copies;
          chunkinfer::attention::launch_decode_attention<bf16>(p, 0, pdl, tensor_cores);
          CHECK_CUDA(cudaGetLastError());
        },
        200);
    const double gbps = kv_bytes / (ms * 1e6);
    std::printf("L=%7d splits=%3d caches=%2d: %.4f ms, %.0f GB/s of K,V = %.1f%% of copy\n", L, p.splits, copies, ms,
                gbps, 100.0 * gbps / copy_gbps);
    for (int c = 0; c < copies; ++c) {
      CHECK_CUDA(cudaFree(ks[c]));
      CHECK_CUDA(cudaFree(vs[c]));
    }
    CHECK_CUDA(cudaFree(q));
    CHECK_CUDA(cudaFree(out));
    CHECK_CUDA(cudaFree(lse));
    CHECK_CUDA(cudaFree(lens));
    CHECK_CUDA(cudaFree(work));
  }
  return 0;
}
