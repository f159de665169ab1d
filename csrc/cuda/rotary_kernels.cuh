// rotary_kv_write: the new tokens' q rotated in place, k rotated and written with v into the cache at
// device-held positions, fp32 math and one rounding. One launch replaces the ~10 elementwise kernels
// of rotate-then-index_copy per layer in a decode step (and the rotated K copy in a prefill chunk).
// Pure CUDA (see device_util.cuh).
#pragma once

#include <algorithm>
#include <cstdint>

#include "device_util.cuh"

namespace chunkinfer::cuda {

template <typename E>
struct RotaryParams {
  E* q;  // may be null
  const E* k;
  const E* v;
  const E* cos;
  const E* sin;
  E* k_cache;
  E* v_cache;
  const int64_t* index;
  int64_t q_sb, q_st, q_sh;
  int64_t k_sb, k_st, k_sh;
  int64_t v_sb, v_st, v_sh;
  int64_t c_sb, c_st;  // cos and sin share strides (checked); c_sb = 0 when shared by the batch
  int64_t s_sb, s_st;
  int64_t kc_sb, kc_sh, kc_sp;
  int64_t vc_sb, vc_sh, vc_sp;
  int T, Hq, Hkv, D, R, cap;
};

// Blocks (token, part); the threads of a token's parts walk its work items: q pairs, k pairs, k's
// unrotated tail, v.
template <typename E>
__global__ void rotary_kv_write_kernel(const RotaryParams<E> p) {
  allow_dependent_launch();      // the decode attention after it may start loading older keys meanwhile
  wait_for_prerequisite_grid();  // q, k, v come from the kernel before (launched early: device_util.cuh)
  const int b = blockIdx.x / p.T, t = blockIdx.x % p.T;
  const int half = p.R / 2;
  const int64_t pos = p.index[t];
  const bool write = pos >= 0 && pos < p.cap;
  const E* cs = p.cos + b * p.c_sb + t * p.c_st;
  const E* sn = p.sin + b * p.s_sb + t * p.s_st;
  const int nq = p.q ? p.Hq * half : 0, nk = p.Hkv * half, tail = p.D - p.R;
  const int nkt = p.Hkv * tail, nv = p.Hkv * p.D;
  const int total = nq + (write ? nk + nkt + nv : 0);
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.y) {
    if (i < nq + nk) {  // a rotated pair (j, j + half) of a q or k head
      const bool is_q = i < nq;
      const int w = is_q ? i : i - nq;
      const int h = w / half, j = w % half;
      const E* x = is_q ? p.q + b * p.q_sb + t * p.q_st + h * p.q_sh : p.k + b * p.k_sb + t * p.k_st + h * p.k_sh;
      const float x0 = to_float(x[j]), x1 = to_float(x[j + half]);
      const float y0 = x0 * to_float(cs[j]) + x1 * to_float(sn[j]);
      const float y1 = x1 * to_float(cs[j + half]) + x0 * to_float(sn[j + half]);
      E* y = is_q ? p.q + b * p.q_sb + t * p.q_st + h * p.q_sh : p.k_cache + b * p.kc_sb + h * p.kc_sh + pos * p.kc_sp;
      y[j] = from_float<E>(y0);
      y[j + half] = from_float<E>(y1);
    } else if (i < nq + nk + nkt) {  // k dims past the rotary dim (partial rotary): copied
      const int w = i - nq - nk, h = w / tail, j = p.R + w % tail;
      p.k_cache[b * p.kc_sb + h * p.kc_sh + pos * p.kc_sp + j] = p.k[b * p.k_sb + t * p.k_st + h * p.k_sh + j];
    } else {
      const int w = i - nq - nk - nkt, h = w / p.D, j = w % p.D;
      p.v_cache[b * p.vc_sb + h * p.vc_sh + pos * p.vc_sp + j] = p.v[b * p.v_sb + t * p.v_st + h * p.v_sh + j];
    }
  }
}

// Blocks: (batch * token, part). The caller checks for launch errors.
template <typename E>
void launch_rotary_kv_write(const RotaryParams<E>& p, int64_t B, int num_sms, cudaStream_t stream) {
  constexpr int kThreads = 256;
  // A few tokens (a decode step): their items spread over several blocks each, or one block
  // walks ~3.5k items in 14 dependent rounds (7 us per layer measured on the H200).
  const int64_t half = p.R / 2, tokens = B * p.T;
  const int64_t items = p.Hq * half + p.Hkv * (half + (p.D - p.R) + int64_t{p.D});
  const int64_t parts = tokens >= num_sms ? 1 : std::min<int64_t>((items + kThreads - 1) / kThreads, 16);
  launch_kernel(/*programmatic=*/true, rotary_kv_write_kernel<E>, dim3(unsigned(tokens), unsigned(parts)),
                dim3(kThreads), 0, stream, p);
}

}  // namespace chunkinfer::cuda
