// Correctness of csrc/cuda/attention_kernels.cuh without libtorch: random inputs, a double
// precision host reference, NaN-poisoned cache outside [start, seq_len) and NaN-poisoned outputs,
// GQA groups, several new tokens, sliding windows, and a CUDA graph captured at one length and
// replayed after seq_lens grew. The torch tests (tests/ops/test_attention.py) cover the same on a
// machine where the extension builds; this one needs only nvcc:
//   nvcc -O3 -std=c++17 --use_fast_math -gencode=arch=compute_90a,code=sm_90a \
//        -o check_attention bench/cuda/check_attention.cu && ./check_attention
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../../csrc/cuda/attention_kernels.cuh"
#include "bench_util.cuh"


using namespace chunkinfer::attention;

template <typename T> T to_t(float x);
template <> float to_t(float x) { return x; }
template <> __nv_bfloat16 to_t(float x) { return __float2bfloat16(x); }
template <> __half to_t(float x) { return __float2half(x); }
template <typename T> float from_t(T x);
template <> float from_t(float x) { return x; }
template <> float from_t(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> float from_t(__half x) { return __half2float(x); }

struct Case {
  int B, Hq, Hkv, T, D, cap, window;
  std::vector<int> lens, starts;
};

int failures = 0;
bool tensor_cores = true;  // main runs every case with and without them

template <typename T>
void run(const Case& c, const char* name, double tol, bool graph = false) {
  std::mt19937 gen(1234 + c.D + c.T * 7 + c.window);
  std::normal_distribution<float> nd;
  const size_t nq = size_t(c.B) * c.Hq * c.T * c.D, nkv = size_t(c.B) * c.Hkv * c.cap * c.D;
  std::vector<T> q(nq), k(nkv), v(nkv);
  for (auto& x : q) x = to_t<T>(nd(gen));
  for (size_t i = 0; i < nkv; ++i) {
    const int pos = int((i / c.D) % c.cap), b = int(i / (size_t(c.Hkv) * c.cap * c.D));
    const bool valid = pos >= c.starts[b] && pos < c.lens[b];
    k[i] = to_t<T>(valid ? nd(gen) : NAN);
    v[i] = to_t<T>(valid ? nd(gen) : NAN);
  }
  const float scale = 1.0f / std::sqrt(float(c.D));
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  DecodeParams p{};
  p.B = c.B, p.Hq = c.Hq, p.Hkv = c.Hkv, p.T = c.T, p.D = c.D, p.cap = c.cap, p.window = c.window;
  p.scale_log2 = scale * kLog2e;
  p.splits = decode_attention_num_splits<T>(c.B, c.Hq, c.Hkv, c.T, c.D, c.cap, sms, tensor_cores);
  T *dq, *dk, *dv, *dout;
  float *dlse, *work;
  int *dlens, *dstarts;
  const size_t part_rows = size_t(c.B) * c.Hq * c.T * p.splits;
  CHECK_CUDA(cudaMalloc(&dq, nq * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dk, nkv * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dv, nkv * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dout, nq * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dlse, nq / c.D * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&work, part_rows * (c.D + 1) * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dlens, c.B * sizeof(int)));
  CHECK_CUDA(cudaMalloc(&dstarts, c.B * sizeof(int)));
  CHECK_CUDA(cudaMemcpy(dq, q.data(), nq * sizeof(T), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dk, k.data(), nkv * sizeof(T), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dv, v.data(), nkv * sizeof(T), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dstarts, c.starts.data(), c.B * sizeof(int), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(dout, 0xff, nq * sizeof(T)));  // NaN in every dtype
  CHECK_CUDA(cudaMemset(dlse, 0xff, nq / c.D * sizeof(float)));
  p.q = dq, p.k = dk, p.v = dv, p.out = dout, p.lse = dlse, p.seq_lens = dlens, p.starts = dstarts;
  p.part_out = work, p.part_lse = work + part_rows * c.D;
  p.q_sb = int64_t(c.Hq) * c.T * c.D, p.q_sh = int64_t(c.T) * c.D, p.q_st = c.D;
  p.k_sb = p.v_sb = int64_t(c.Hkv) * c.cap * c.D, p.k_sh = p.v_sh = int64_t(c.cap) * c.D, p.k_sp = p.v_sp = c.D;
  p.o_sb = p.q_sb, p.o_sh = p.q_sh, p.o_st = p.q_st;
  p.l_sb = int64_t(c.Hq) * c.T, p.l_sh = c.T, p.l_st = 1;
  if (graph) {  // capture at length 1, then grow to the real lengths and replay
    std::vector<int> ones(c.B, 1);
    CHECK_CUDA(cudaMemcpy(dlens, ones.data(), c.B * sizeof(int), cudaMemcpyHostToDevice));
    cudaStream_t s;
    CHECK_CUDA(cudaStreamCreate(&s));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    launch_decode_attention<T>(p, s, false, tensor_cores);
    CHECK_CUDA(cudaStreamEndCapture(s, &g));
    CHECK_CUDA(cudaGraphInstantiate(&ge, g, 0));
    CHECK_CUDA(cudaGraphLaunch(ge, s));
    CHECK_CUDA(cudaMemcpyAsync(dlens, c.lens.data(), c.B * sizeof(int), cudaMemcpyHostToDevice, s));
    CHECK_CUDA(cudaMemsetAsync(dout, 0xff, nq * sizeof(T), s));
    CHECK_CUDA(cudaGraphLaunch(ge, s));
    CHECK_CUDA(cudaStreamSynchronize(s));
  } else {
    CHECK_CUDA(cudaMemcpy(dlens, c.lens.data(), c.B * sizeof(int), cudaMemcpyHostToDevice));
    launch_decode_attention<T>(p, 0, false, tensor_cores);
  }
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<T> out(nq);
  std::vector<float> lse(nq / c.D);
  CHECK_CUDA(cudaMemcpy(out.data(), dout, nq * sizeof(T), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(lse.data(), dlse, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));

  double num = 0, den = 0, lse_err = 0;
  int bad = 0;
  const int g = c.Hq / c.Hkv;
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h)
      for (int t = 0; t < c.T; ++t) {
        const int pos = c.lens[b] - c.T + t;
        const int lo = std::max(c.starts[b], c.window > 0 ? pos - c.window + 1 : 0), hi = std::min(pos + 1, c.lens[b]);
        const size_t qi = ((size_t(b) * c.Hq + h) * c.T + t) * c.D;
        std::vector<double> s, o(c.D, 0.0);
        double mx = -INFINITY;
        for (int j = lo; j < hi; ++j) {
          const size_t ki = ((size_t(b) * c.Hkv + h / g) * c.cap + j) * c.D;
          double d = 0;
          for (int i = 0; i < c.D; ++i) d += double(from_t(q[qi + i])) * from_t(k[ki + i]);
          s.push_back(d * scale);
          mx = std::max(mx, s.back());
        }
        double sum = 0;
        for (int j = lo; j < hi; ++j) {
          const size_t vi = ((size_t(b) * c.Hkv + h / g) * c.cap + j) * c.D;
          const double e = std::exp(s[j - lo] - mx);
          sum += e;
          for (int i = 0; i < c.D; ++i) o[i] += e * from_t(v[vi + i]);
        }
        const double ref_lse = hi > lo ? mx + std::log(sum) : -INFINITY;
        const float got_lse = lse[(size_t(b) * c.Hq + h) * c.T + t];
        if (std::isnan(got_lse) || (std::isinf(ref_lse) != std::isinf(got_lse))) ++bad;
        else if (!std::isinf(ref_lse)) lse_err = std::max(lse_err, std::abs(got_lse - ref_lse));
        for (int i = 0; i < c.D; ++i) {
          const double ref = hi > lo ? o[i] / sum : 0.0, got = from_t(out[qi + i]);
          if (std::isnan(got)) ++bad;
          num += (got - ref) * (got - ref);
          den += ref * ref;
        }
      }
  const double rel = std::sqrt(num / std::max(den, 1e-30));
  const bool ok = bad == 0 && rel <= tol && lse_err <= 1e-3;
  failures += !ok;
  std::printf("%-4s %-34s %-3s splits=%3d rel=%.2e lse_err=%.1e nan=%d%s\n", ok ? "ok" : "FAIL", name,
              tensor_cores ? "mma" : "fma", p.splits, rel, lse_err, bad, graph ? " (graph replay)" : "");
  for (void* ptr : {(void*)dq, (void*)dk, (void*)dv, (void*)dout, (void*)dlse, (void*)work, (void*)dlens, (void*)dstarts})
    CHECK_CUDA(cudaFree(ptr));
}

int main() {
  for (const bool tc : {true, false}) {
    tensor_cores = tc;
    const Case base{2, 8, 2, 1, 128, 4200, 0, {4097, 7}, {0, 2}};
    for (int D : {64, 128, 256}) {
      Case c = base;
      c.D = D;
      char name[64];
      std::snprintf(name, sizeof(name), "bf16 D=%d lens 4097,7", D);
      run<__nv_bfloat16>(c, name, 1e-2);
      std::snprintf(name, sizeof(name), "fp16 D=%d lens 4097,7", D);
      run<__half>(c, name, 1e-2);
      std::snprintf(name, sizeof(name), "fp32 D=%d lens 4097,7", D);
      run<float>(c, name, 2e-5);
  }
    run<__nv_bfloat16>({3, 4, 1, 1, 64, 16, 0, {1, 0, 9}, {0, 0, 9}}, "bf16 lens 1,0,9 (empty rows)", 1e-2);
    for (int T : {1, 4})
      for (int w : {1, 5, 300}) {
        char name[64];
        std::snprintf(name, sizeof(name), "bf16 T=%d window=%d starts 3,0", T, w);
        run<__nv_bfloat16>({2, 4, 2, T, 128, 4200, w, {4097, 610}, {3, 0}}, name, 1e-2);
      }
    run<__nv_bfloat16>({2, 6, 3, 1, 64, 2000, 0, {1500, 77}, {10, 0}}, "bf16 g=2", 1e-2);
    run<__nv_bfloat16>({2, 6, 2, 1, 64, 2000, 0, {1500, 77}, {10, 0}}, "bf16 g=3", 1e-2);
    run<__nv_bfloat16>({2, 32, 2, 1, 64, 2000, 0, {1500, 77}, {10, 0}}, "bf16 g=16 (two row chunks)", 1e-2);
    run<__nv_bfloat16>({2, 16, 1, 2, 64, 2000, 0, {1500, 77}, {10, 0}}, "bf16 g=16 T=2 (four chunks)", 1e-2);
    run<__nv_bfloat16>({1, 32, 8, 1, 128, 131072, 0, {131072}, {0}}, "bf16 Hq32/Hkv8 L=131072", 1e-2);
    run<__nv_bfloat16>({2, 32, 8, 2, 128, 16384, 4000, {9000, 16384}, {1, 300}}, "bf16 T=2 window", 1e-2, true);
    run<__half>({2, 64, 8, 1, 256, 3000, 0, {2999, 1}, {0, 0}}, "fp16 D=256 g=8", 1e-2, true);
    run<__half>({1, 16, 1, 3, 64, 700, 0, {700}, {5}}, "fp16 g=16 T=3 (three 16-row chunks)", 1e-2);
  }
  std::printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
