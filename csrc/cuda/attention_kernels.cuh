// Decode attention (flash-decoding) and the log-sum-exp merge of partial attentions, as plain
// CUDA: no torch includes, so bench/cuda/bench_attention.cu builds against this header alone.
// csrc/cuda/attention.cu wraps these launchers as torch ops.
//
// Layouts (strides in elements, last dimension contiguous):
//   q        [B, Hq, T, D]      T new tokens; query t sits at position seq_len - T + t
//   k, v     [B, Hkv, cap, D]   positions [start, seq_len) are valid; query head h reads kv head h / g
//   out      [B, Hq, T, D]      q's dtype
//   lse      [B, Hq, T]         fp32, natural log; -inf where a query saw no key (out is then 0)
// Every block handles one (batch, kv head, split of the key range, chunk of its g*T query rows):
// it loads each K, V row once for all the rows of its group. The key range is cut into `splits`
// equal pieces at run time from seq_lens on the device, so one launch shape (fixed from the
// capacity) serves every length and a captured CUDA graph stays valid while the cache grows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../merge_weights.h"
#include "device_util.cuh"

#include <cstdint>
#include <type_traits>

namespace chunkinfer {
namespace attention {

struct DecodeParams {
  const void* q;         // [B, Hq, T, D]
  const void* k;         // [B, Hkv, cap, D]
  const void* v;         // [B, Hkv, cap, D]
  const int* seq_lens;   // [B] device int32: keys [start, seq_len) are valid
  const int* starts;     // [B] device int32, or nullptr for 0
  void* out;             // [B, Hq, T, D]
  float* lse;            // [B, Hq, T]
  float* part_out;       // [B, Hq, T, splits, D] workspace: each split's normalised output
  float* part_lse;       // [B, Hq, T, splits] workspace: each split's lse (log2 units)
  int64_t q_sb, q_sh, q_st;
  int64_t k_sb, k_sh, k_sp;
  int64_t v_sb, v_sh, v_sp;
  int64_t o_sb, o_sh, o_st;
  int64_t l_sb, l_sh, l_st;
  int B, Hq, Hkv, T, D, cap;
  int window;            // > 0: query at p sees keys (p - window, p], key j at slot j % cap (a ring); <= 0: none
  int splits;            // blocks per (batch, kv head, row chunk): pieces of the key range
  int split_keys;        // > 0: every piece is [a * split_keys, (a + 1) * split_keys) of absolute position
  float scale_log2;      // softmax scale * log2(e): scores live in base 2 inside the kernels
  bool prefix_ready;     // keys before the new tokens may be read before waiting for the kernel ahead
};

struct MergeParams {
  const void* out_a;     // [rows, D] (row strides below)
  const float* lse_a;    // [rows]
  const void* out_b;     // [rows, D]
  const float* lse_b;    // [rows]
  void* out;             // [rows, D]; may alias out_a or out_b
  float* lse;            // [rows]; may alias lse_a or lse_b
  int64_t sa, sb, so;    // row strides of out_a, out_b, out
  int64_t la, lb, lo;    // element strides of lse_a, lse_b, lse
  int64_t rows;
  int D;
};

constexpr int kDecodeThreads = 256;
constexpr int kVec = 8;  // head-dim elements a thread owns: one 16-byte load for 16-bit types
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// loads of 8 consecutive elements, converted to fp32

template <typename T>
struct Pack8 {
  uint4 raw[sizeof(T) == 4 ? 2 : 1];
};

using ::chunkinfer::cuda::cp_async16;
using ::chunkinfer::cuda::cp_async16_zfill;
using ::chunkinfer::cuda::cp_async_commit;
using ::chunkinfer::cuda::cp_async_wait;

template <typename T>
__device__ __forceinline__ void cp_async_pack(Pack8<T>* smem, const T* src) {
#pragma unroll
  for (int i = 0; i < int(sizeof(Pack8<T>) / sizeof(uint4)); ++i)
    cp_async16(reinterpret_cast<uint4*>(smem) + i, reinterpret_cast<const uint4*>(src) + i);
}

template <typename T>
__device__ __forceinline__ void zero_pack(Pack8<T>& p) {
#pragma unroll
  for (int i = 0; i < int(sizeof(p.raw) / sizeof(uint4)); ++i) p.raw[i] = make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ void unpack(const Pack8<float>& p, float f[kVec]) {
  const float* s = reinterpret_cast<const float*>(p.raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) f[i] = s[i];
}

__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }

// fp16, bf16: four pairs, each converted at once
template <typename T>
__device__ __forceinline__ void unpack(const Pack8<T>& p, float f[kVec]) {
  using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  const Pair* s = reinterpret_cast<const Pair*>(p.raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    float2 x = to_float2(s[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// single elements to and from fp32 (round to nearest even)
using ::chunkinfer::cuda::from_float;
using ::chunkinfer::cuda::to_float;

// Programmatic dependent launch (device_util.cuh): pass 2 is launched while pass 1 still runs and
// waits for it on the device, which hides the launch gap between the two.
using ::chunkinfer::cuda::allow_dependent_launch;
using ::chunkinfer::cuda::wait_for_prerequisite_grid;

// exp2 of a difference whose reference may be -inf (nothing seen yet): 0 instead of NaN.
__device__ __forceinline__ float safe_ref(float m) { return m == -INFINITY ? 0.f : m; }

// Which (row chunk, kv head, batch, split) a block serves. The split is the grid's slowest dimension, so
// blocks go out split by split: a range's last splits (empty or short while the cache has room) are the
// last blocks, and a grid a little over one wave leaves only them for the second. A row chunk's blocks
// of one split are neighbours: K, V reuse in L2.
struct BlockIndex {
  int chunk, h, b, split;
};

__device__ __forceinline__ BlockIndex block_index(const DecodeParams& p, int rows_per_block) {
  const int n_chunks = ((p.Hq / p.Hkv) * p.T + rows_per_block - 1) / rows_per_block;
  BlockIndex ix;
  ix.chunk = blockIdx.x % n_chunks;
  const int hb = blockIdx.x / n_chunks;
  ix.h = hb % p.Hkv;
  ix.b = hb / p.Hkv;
  ix.split = blockIdx.y;
  return ix;
}

// The keys one block reduces, [k0, k1), and `base`, where its tiles (or load steps) start. With
// split_keys = L > 0 the block holds the absolute piece a = split (mod splits) at or after lo's piece:
// [aL, (a + 1)L), its tiles aligned at aL. Which keys a query's partials hold, and in which order, then
// depends on positions alone (never on T, the other queries, the lengths or the capacity), so a T-token
// step computes each row bit for bit as a one-token step at its position does. split_keys = 0: the
// range [lo, len) cut into `splits` equal pieces, multiples of `align` keys.
struct KeyRange {
  int len, start, lo, base, k0, k1;
};

__device__ __forceinline__ KeyRange block_keys(const DecodeParams& p, int b, int split, int align) {
  KeyRange r;
  const bool ring = p.window > 0;  // the caller keeps cap >= window + T - 1: the keys in view fit the ring
  r.len = ring ? max(p.seq_lens[b], 0) : min(max(p.seq_lens[b], 0), p.cap);
  r.start = p.starts ? min(max(p.starts[b], 0), r.len) : 0;
  // keys any of the T queries may see: [lo, len); the first query's window starts earliest
  r.lo = ring ? max(r.start, r.len - p.T - p.window + 1) : r.start;
  if (p.split_keys > 0) {
    const int first = r.lo / p.split_keys;
    const int a = first + ((split - first) % p.splits + p.splits) % p.splits;
    r.base = a * p.split_keys;
    r.k0 = max(r.base, r.lo);
    r.k1 = min(r.len, r.base + p.split_keys);
  } else {
    const int n = r.len - r.lo;
    const int per_split = n > 0 ? ((n + p.splits - 1) / p.splits + align - 1) / align * align : 0;
    r.k0 = r.lo + min(split * per_split, max(n, 0));
    r.k1 = min(r.len, r.k0 + per_split);
    r.base = r.k0;
  }
  if (r.k0 >= r.k1) r.k0 = r.k1 = r.base;  // nothing: no tile, no step
  return r;
}

// The cache slot of key j: j, or j % cap in a ring (sliding window)
__device__ __forceinline__ int64_t key_slot(const DecodeParams& p, int key) {
  return p.window > 0 ? key % p.cap : key;
}

// The end of both pass-1 kernels: the block's W warps' partial (m, l, o) of one query row and head-dim
// element, read from shared memory at the given strides, merged into this split's normalised output
// and (at d == 0) its lse. row = head_in_group * T + t within kv head h.
template <int W>
__device__ __forceinline__ void store_split_partial(const DecodeParams& p, int b, int h, int row, int split, int d,
                                                    const float* m, const float* l, int ml_stride,
                                                    const float* o, int o_stride) {
  float mt = -INFINITY;
#pragma unroll
  for (int w = 0; w < W; ++w) mt = fmaxf(mt, m[w * ml_stride]);
  const float ref = safe_ref(mt);
  float lt = 0.f, acc = 0.f;
#pragma unroll
  for (int w = 0; w < W; ++w) {
    const float c = exp2f(m[w * ml_stride] - ref);
    lt += c * l[w * ml_stride];
    acc += c * o[w * o_stride];
  }
  const int g = p.Hq / p.Hkv;
  const int hq = h * g + row / p.T, t = row % p.T;
  const int64_t prow = ((int64_t(b) * p.Hq + hq) * p.T + t) * p.splits + split;
  p.part_out[prow * p.D + d] = lt > 0.f ? acc / lt : 0.f;
  if (d == 0) p.part_lse[prow] = lt > 0.f ? mt + __log2f(lt) : -INFINITY;
}

// ---------------------------------------------------------------------------------------------
// pass 1 on FMAs (fp32, or when tensor cores are not asked for): one block per (row chunk, split)
// x kv head x batch; partial (out, lse) per split

template <typename T, int D, int ROWS>
struct DecodeConfig {
  static constexpr int kThreads = kDecodeThreads;
  static constexpr int kRows = ROWS;
  static constexpr int kThreadsPerRow = D / kVec;                 // threads sharing one key
  static constexpr int kGroups = kDecodeThreads / kThreadsPerRow; // keys in flight per load step
  static constexpr int kUnroll = sizeof(T) == 4 ? 2 : 4;          // keys per group per step
  static constexpr int kKeysPerStep = kGroups * kUnroll;
  static constexpr int kWarps = kDecodeThreads / 32;
  // rows of the cross-warp reduction buffer per pass, within 32 KiB of shared memory
  static constexpr int kPassRows0 = (32 * 1024) / (kWarps * D * 4);
  static constexpr int kPassRows = kPassRows0 < ROWS ? kPassRows0 : ROWS;
  static constexpr int kMinBlocks = ROWS <= 4 ? 2 : 1;
  // K, V pipeline: kStages steps of this thread's own 16-byte pieces in shared memory; a thread
  // reads back only what it copied, so the pipeline needs no barrier
  static constexpr int kStages = 3;
  static constexpr int kPipeBytes = 2 * kStages * kUnroll * kDecodeThreads * int(sizeof(Pack8<T>));
  static constexpr int kReduceBytes = (2 * kWarps * ROWS + kWarps * kPassRows * D) * 4;
  static constexpr int kSmemBytes = kPipeBytes > kReduceBytes ? kPipeBytes : kReduceBytes;
  static_assert(D % (kVec * 1) == 0 && kThreadsPerRow <= 32, "the kernel's head dim must be 64, 128 or 256");
};

template <typename T, int D, int ROWS>
__global__ void __launch_bounds__(kDecodeThreads, (DecodeConfig<T, D, ROWS>::kMinBlocks))
decode_attention_kernel(const DecodeParams p) {
  using C = DecodeConfig<T, D, ROWS>;
  constexpr int TPR = C::kThreadsPerRow, GROUPS = C::kGroups, U = C::kUnroll;
  wait_for_prerequisite_grid();  // launched early (programmatic): q and the new K, V come from the kernel before
  allow_dependent_launch();

  const int g = p.Hq / p.Hkv;
  const int rows_total = g * p.T;
  const BlockIndex ix = block_index(p, ROWS);
  const int chunk = ix.chunk, split = ix.split, h = ix.h, b = ix.b;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = tid % TPR, group = tid / TPR;
  // a head dim below D (dispatch_padded_head_dim): lanes past it read zeros and store nothing
  const bool live = sub * kVec < p.D;

  const KeyRange kr_ = block_keys(p, b, split, C::kKeysPerStep);
  const int len = kr_.len, start = kr_.start, k0 = kr_.k0, k1 = kr_.k1;
  // load steps aligned at the range's base: a key's place (thread, step) depends on its position alone
  const int first_step = (k0 - kr_.base) / C::kKeysPerStep;
  const int step_base = kr_.base + first_step * C::kKeysPerStep;

  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + sub * kVec;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + sub * kVec;

  extern __shared__ uint4 smem_raw[];
  Pack8<T>* const kpipe = reinterpret_cast<Pack8<T>*>(smem_raw);  // [stages][U][threads]
  Pack8<T>* const vpipe = kpipe + C::kStages * U * kDecodeThreads;
  const int steps = k1 > k0 ? (k1 - step_base + C::kKeysPerStep - 1) / C::kKeysPerStep : 0;
  auto issue = [&](int step) {  // one commit group per step, empty past the end
    if (step < steps) {
      const int slot = (step % C::kStages) * U;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int key = step_base + step * C::kKeysPerStep + u * GROUPS + group;
        if (live && key >= k0 && key < k1) {
          const int64_t at = key_slot(p, key);
          cp_async_pack(kpipe + (slot + u) * kDecodeThreads + tid, kb + at * p.k_sp);
          cp_async_pack(vpipe + (slot + u) * kDecodeThreads + tid, vb + at * p.v_sp);
        }
      }
    }
    cp_async_commit();
  };
  // the K, V pipeline fills while q is loaded (independent loads: no idle memory at the start)
#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) issue(st);

  // this block's query rows: row = head_in_group * T + t
  int row_lo[ROWS], row_hi[ROWS];
  float q[ROWS][kVec];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = chunk * ROWS + r;
    row_lo[r] = 0;
    row_hi[r] = 0;  // an empty key range for padding rows
    if (row < rows_total) {
      const int hq = h * g + row / p.T, t = row % p.T;
      const int pos = len - p.T + t;
      row_hi[r] = pos + 1;
      row_lo[r] = p.window > 0 ? max(start, pos - p.window + 1) : start;
      const T* qp = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh + t * p.q_st + sub * kVec;
#pragma unroll
      for (int i = 0; i < kVec; ++i) q[r][i] = live ? to_float(qp[i]) * p.scale_log2 : 0.f;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) q[r][i] = 0.f;
    }
  }

  float m[ROWS], l[ROWS], acc[ROWS][kVec];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[r][i] = 0.f;
  }

  for (int step = 0; step < steps; ++step) {
    issue(step + C::kStages - 1);
    cp_async_wait<C::kStages - 1>();  // this step's group has landed
    const int base = step_base + step * C::kKeysPerStep, slot = (step % C::kStages) * U;
    int key[U];
    Pack8<T> kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      key[u] = base + u * GROUPS + group;
      if (live && key[u] >= k0 && key[u] < k1) {
        kr[u] = kpipe[(slot + u) * kDecodeThreads + tid];
        vr[u] = vpipe[(slot + u) * kDecodeThreads + tid];
      } else {
        zero_pack(kr[u]);
        zero_pack(vr[u]);
      }
    }
    float s[ROWS][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[kVec];
      unpack(kr[u], kf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) d = fmaf(q[r][i], kf[i], d);
        s[r][u] = d;
      }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int u = 0; u < U; ++u) s[r][u] += __shfl_xor_sync(0xffffffffu, s[r][u], off);
    }
    // online softmax: one rescale per step, not per key
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool ok = key[u] >= row_lo[r] && key[u] < row_hi[r] && key[u] >= k0 && key[u] < k1;
        s[r][u] = ok ? s[r][u] : -INFINITY;
        mx = fmaxf(mx, s[r][u]);
      }
      const float m_new = fmaxf(m[r], mx);
      const float ref = safe_ref(m_new);
      const float corr = exp2f(m[r] - ref);
      m[r] = m_new;
      float lsum = l[r] * corr;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[r][u] = exp2f(s[r][u] - ref);
        lsum += s[r][u];
      }
      l[r] = lsum;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[r][i] *= corr;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[kVec];
      unpack(vr[u], vf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[r][i] = fmaf(s[r][u], vf[i], acc[r][i]);
    }
  }

  // merge the groups of a warp (butterfly: every lane ends with the warp's total)
#pragma unroll
  for (int off = TPR; off < 32; off <<= 1) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[r], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[r], off);
      const float m_new = fmaxf(m[r], m_o);
      const float ref = safe_ref(m_new);
      const float c_s = exp2f(m[r] - ref), c_o = exp2f(m_o - ref);
      m[r] = m_new;
      l[r] = l[r] * c_s + l_o * c_o;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float a_o = __shfl_xor_sync(0xffffffffu, acc[r][i], off);
        acc[r][i] = acc[r][i] * c_s + a_o * c_o;
      }
    }
  }

  // merge the warps through shared memory (the pipeline's, now drained), kPassRows rows at a time
  cp_async_wait<0>();
  __syncthreads();
  float(*sm_m)[ROWS] = reinterpret_cast<float(*)[ROWS]>(smem_raw);
  float(*sm_l)[ROWS] = sm_m + C::kWarps;
  float(*sm_acc)[C::kPassRows][D] = reinterpret_cast<float(*)[C::kPassRows][D]>(sm_l + C::kWarps);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      sm_m[warp][r] = m[r];
      sm_l[warp][r] = l[r];
    }
  }
#pragma unroll
  for (int r0 = 0; r0 < ROWS; r0 += C::kPassRows) {
    if (lane < TPR) {
#pragma unroll
      for (int r = 0; r < C::kPassRows; ++r)
        if (r0 + r < ROWS)
#pragma unroll
          for (int i = 0; i < kVec; ++i) sm_acc[warp][r][lane * kVec + i] = acc[r0 + r][i];
    }
    __syncthreads();
    for (int idx = tid; idx < C::kPassRows * D; idx += kDecodeThreads) {
      const int r = r0 + idx / D, d = idx % D;
      const int row = chunk * ROWS + r;
      if (r >= ROWS || row >= rows_total || d >= p.D) continue;
      store_split_partial<C::kWarps>(p, b, h, row, split, d, &sm_m[0][r], &sm_l[0][r], ROWS, &sm_acc[0][r - r0][d],
                                     C::kPassRows * D);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// pass 2: one block per (b, hq, t) row merges its splits. Pass 1 writes every split's partials
// (zeros and -inf where a split saw no key), so all loads here are unconditional: the warps take
// splits in turn and each thread loads float4s of its split's row, many in flight at once.

constexpr int kCombineThreads = 256;

template <typename T, int D>
__global__ void __launch_bounds__(kCombineThreads) decode_attention_combine_kernel(const DecodeParams p) {
  constexpr int kLanes = D / 4;                          // threads per split row (float4 each); D >= p.D
  constexpr int kGroups = kCombineThreads / kLanes;      // splits in flight per step
  extern __shared__ float smem_f[];
  float* w = smem_f;                                     // [splits] weights
  float* red = w + p.splits;                             // [kGroups][D], then [32] for the max
  const int64_t row = blockIdx.x;
  const int t = row % p.T, hq = (row / p.T) % p.Hq, b = row / (int64_t(p.T) * p.Hq);
  const int S = p.splits, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* pl = p.part_lse + row * S;
  const float* po = p.part_out + row * S * p.D;
  wait_for_prerequisite_grid();  // pass 1's partials are complete and visible from here on

  float mx = -INFINITY;
  for (int s = tid; s < S; s += kCombineThreads) mx = fmaxf(mx, pl[s]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float* red_max = red + kGroups * D;
  if (lane == 0) red_max[warp] = mx;
  __syncthreads();
  mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kCombineThreads / 32; ++i) mx = fmaxf(mx, red_max[i]);
  const float ref = safe_ref(mx);
  for (int s = tid; s < S; s += kCombineThreads) w[s] = exp2f(pl[s] - ref);  // 0 for empty splits
  __syncthreads();

  const int group = tid / kLanes, j = tid % kLanes;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
  for (int s = 4 * j < p.D ? group : S; s < S; s += kGroups) {
    const float ws = w[s];
    const float4 x = *reinterpret_cast<const float4*>(po + int64_t(s) * p.D + 4 * j);
    acc.x = fmaf(ws, x.x, acc.x);
    acc.y = fmaf(ws, x.y, acc.y);
    acc.z = fmaf(ws, x.z, acc.z);
    acc.w = fmaf(ws, x.w, acc.w);
  }
  *reinterpret_cast<float4*>(red + group * D + 4 * j) = acc;
  __syncthreads();
  if (tid < p.D) {
    float o = 0.f, sum = 0.f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) o += red[g * D + tid];
    for (int s = 0; s < S; ++s) sum += w[s];
    T* out = static_cast<T*>(p.out) + b * p.o_sb + hq * p.o_sh + t * p.o_st;
    out[tid] = from_float<T>(sum > 0.f ? o / sum : 0.f);
    if (tid == 0)
      p.lse[b * p.l_sb + hq * p.l_sh + t * p.l_st] = sum > 0.f ? (mx + __log2f(sum)) * kLn2 : -INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------
// pass 1 on tensor cores (16-bit K, V): QK^T and PV by mma.sync m16n8k16, the way flash-decoding
// does it. The FMA kernel above issues ~40 instructions per key for a GQA group of 4 and keeps only
// ~84% of the copy rate at 131k; here a warp spends ~8 per key. The block's query rows (g*T, at most
// 16) are the mma's 16 rows: rows past g*T are zeros, which costs tensor throughput we have spare.
// Each warp streams its own tiles of K, V (cp.async into a swizzled per-warp ring of shared
// memory, read back with ldmatrix), keeps its own online softmax, and the block's warps merge once
// at the end, as the FMA kernel's do.

__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a (16x16, row-major) * b (16x8, column-major), fp32 accumulators
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // sm_80+ only: the dispatch never picks this kernel on older devices
#endif
}

// two floats as one register of T pairs (lo in the low half: the lower column)
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  unsigned r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<unsigned*>(&h);
  } else {
    __half2 h = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<unsigned*>(&h);
  }
  return r;
}

// two consecutive 16-bit elements as one register, whatever their address's alignment
__device__ __forceinline__ unsigned load_pair16(const void* p) {
  const unsigned short* s = static_cast<const unsigned short*>(p);
  return unsigned(s[0]) | (unsigned(s[1]) << 16);
}

template <int D, bool UPPER>
struct MmaDecodeConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = UPPER ? 16 : 8;           // query rows a block serves
  static constexpr int kTileKeys = D == 64 ? 32 : 16;   // keys per warp step
  static constexpr int kStages = D == 256 ? 2 : 3;      // per-warp ring: ~2 tiles per warp in flight
  static constexpr int kRowBytes = D * 2;
  static constexpr int kChunks = D / 8;                 // 16-byte pieces of a K or V row
  static constexpr int kTileBytes = kTileKeys * kRowBytes;  // K (or V) of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kCopies = kTileBytes / (16 * 32);    // 16-byte copies per lane per tile, K or V
  static constexpr int kKeysPerStep = kWarps * kTileKeys;   // a block's keys per step
  static constexpr int kPipeBytes = kWarps * kStages * kStageBytes;
  static constexpr int kReduceBytes = kWarps * 16 * (D + 2) * 4;
  static constexpr int kSmemBytes = kPipeBytes > kReduceBytes ? kPipeBytes : kReduceBytes;
  static constexpr int kNT = kTileKeys / 8;   // QK^T n-tiles (8 keys each)
  static constexpr int kKS = D / 16;          // QK^T k-steps (16 dims each)
  static constexpr int kDT = D / 8;           // PV n-tiles (8 dims each)
  static_assert(kChunks >= 8 && kTileBytes % (16 * 32) == 0, "head dim must be 64, 128 or 256");
};

// swizzled byte offset of a 16-byte piece in a tile: piece ^ (row % 8) puts the 8 rows an ldmatrix
// reads at one logical piece in 8 different bank groups
__device__ __forceinline__ unsigned tile_offset(int row, int piece, int row_bytes) {
  return unsigned(row * row_bytes + ((piece ^ (row & 7)) << 4));
}

template <typename T, int D, bool UPPER>
__global__ void __launch_bounds__(MmaDecodeConfig<D, UPPER>::kThreads)
decode_attention_mma_kernel(const DecodeParams p) {
  using C = MmaDecodeConfig<D, UPPER>;
  constexpr int W = C::kWarps, ROWS = C::kRows, TK = C::kTileKeys, NT = C::kNT, KS = C::kKS, DT = C::kDT;
  constexpr int HALVES = UPPER ? 2 : 1;
  // launched early (programmatic): q and the new keys come from the kernel ahead; with prefix_ready
  // the lengths and older keys are read before waiting for it (below)
  if (!p.prefix_ready) wait_for_prerequisite_grid();

  const int g = p.Hq / p.Hkv;
  const int rows_total = g * p.T;
  const BlockIndex ix = block_index(p, ROWS);
  const int chunk = ix.chunk, split = ix.split, h = ix.h, b = ix.b;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, cq = lane & 3;  // the mma fragments' row group and column pair

  const KeyRange kr_ = block_keys(p, b, split, C::kKeysPerStep);
  const int len = kr_.len, start = kr_.start, k0 = kr_.k0, k1 = kr_.k1;

  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  extern __shared__ uint4 smem_raw[];
  const unsigned ring = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) +
                        unsigned(warp * C::kStages * C::kStageBytes);
  // tiles aligned at the range's base, tile j to warp j % W: a key's (warp, tile) depends on its
  // position alone; warp w takes the tiles j = w (mod W) of [first, last)
  const int first = (k0 - kr_.base) / TK, last = k1 > k0 ? (k1 - kr_.base + TK - 1) / TK : first;
  const int my_first = first + ((warp - first) % W + W) % W;
  const int my_tiles = my_first < last ? (last - my_first + W - 1) / W : 0;
  auto tile_key0 = [&](int i) { return kr_.base + (my_first + i * W) * TK; };
  auto issue = [&](int i) {  // this warp's i-th tile; one commit group per call, empty past the end
    if (i < my_tiles) {
      const int key0 = tile_key0(i);
      const unsigned st = ring + unsigned((i % C::kStages) * C::kStageBytes);
#pragma unroll
      for (int j = 0; j < C::kCopies; ++j) {
        const int idx = lane + 32 * j, row = idx / C::kChunks, piece = idx % C::kChunks;
        const int key = key0 + row;
        const bool ok = key >= k0 && key < k1;  // outside the block's range: zeros (finite, masked below)
        const int64_t at = ok ? key_slot(p, key) : 0;
        const unsigned off = tile_offset(row, piece, C::kRowBytes);
        cp_async16_zfill(st + off, kb + (ok ? at * p.k_sp + piece * 8 : 0), ok);
        cp_async16_zfill(st + C::kTileBytes + off, vb + (ok ? at * p.v_sp + piece * 8 : 0), ok);
      }
    }
    cp_async_commit();
  };
  // With prefix_ready nothing in flight writes the lengths or the keys before the new ones [len - T,
  // len), so a warp whose first tiles hold only older keys loads them before waiting for the kernel
  // ahead (0.06 ms of an 8B decode step at 32k: profile_decode_h200.md, session 9).
  const bool early = p.prefix_ready && tile_key0(C::kStages - 2) + TK <= len - p.T;
  if (p.prefix_ready && !early) wait_for_prerequisite_grid();
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) issue(s);
  if (early) wait_for_prerequisite_grid();
  allow_dependent_launch();

  // query rows of this thread's fragments: block row gq (+ 8); row = head_in_group * T + t
  int row_lo[HALVES], row_hi[HALVES];
  unsigned qa[KS][4];
#pragma unroll
  for (int hf = 0; hf < HALVES; ++hf) {
    const int row = chunk * ROWS + hf * 8 + gq;
    row_lo[hf] = 0;
    row_hi[hf] = 0;  // an empty key range for padding rows
    const T* qp = nullptr;
    if (row < rows_total) {
      const int hq = h * g + row / p.T, t = row % p.T;
      const int pos = len - p.T + t;
      row_hi[hf] = pos + 1;
      row_lo[hf] = p.window > 0 ? max(start, pos - p.window + 1) : start;
      qp = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh + t * p.q_st;
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      qa[ks][hf] = qp ? load_pair16(qp + ks * 16 + 2 * cq) : 0u;
      qa[ks][2 + hf] = qp ? load_pair16(qp + ks * 16 + 8 + 2 * cq) : 0u;
    }
  }
  if constexpr (!UPPER) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) qa[ks][1] = qa[ks][3] = 0u;
  }

  float m[HALVES], l[HALVES], o[DT][4];
#pragma unroll
  for (int hf = 0; hf < HALVES; ++hf) {
    m[hf] = -INFINITY;
    l[hf] = 0.f;
  }
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;

  const int ld_row = lane & 7, ld_mat = lane >> 3;  // ldmatrix: the row this lane addresses, of which matrix
  for (int i = 0; i < my_tiles; ++i) {
    __syncwarp();  // every lane's ldmatrix of the slot refilled next is done
    issue(i + C::kStages - 1);
    cp_async_wait<C::kStages - 1>();
    __syncwarp();  // the tile's pieces copied by the other lanes are visible
    const unsigned ks_base = ring + unsigned((i % C::kStages) * C::kStageBytes);
    const unsigned vs_base = ks_base + C::kTileBytes;
    const int key0 = tile_key0(i);

    // S = Q K^T: the tile's keys are the n dimension
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int ks2 = 0; ks2 < KS / 2; ++ks2) {
        unsigned r[4];
        ldmatrix_x4(r, ks_base + tile_offset(nt * 8 + ld_row, 4 * ks2 + ld_mat, C::kRowBytes));
        mma_16816<T>(s[nt], qa[2 * ks2], r[0], r[1]);
        mma_16816<T>(s[nt], qa[2 * ks2 + 1], r[2], r[3]);
      }
    }

    // online softmax, base 2; s[nt][2*hf + j] is row gq + 8*hf, key key0 + nt*8 + 2*cq + j
#pragma unroll
    for (int hf = 0; hf < HALVES; ++hf) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int key = key0 + nt * 8 + 2 * cq + j;
          const bool ok = key >= k0 && key < k1 && key >= row_lo[hf] && key < row_hi[hf];
          const float x = ok ? s[nt][2 * hf + j] * p.scale_log2 : -INFINITY;
          s[nt][2 * hf + j] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[hf], mx);
      const float ref = safe_ref(m_new);
      const float corr = exp2f(m[hf] - ref);
      m[hf] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float e = exp2f(s[nt][2 * hf + j] - ref);
          s[nt][2 * hf + j] = e;
          sum += e;
        }
      l[hf] = l[hf] * corr + sum;
      if (__any_sync(0xffffffffu, corr != 1.f)) {  // the running maximum rarely moves after the first tiles
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          o[dt][2 * hf] *= corr;
          o[dt][2 * hf + 1] *= corr;
        }
      }
    }

    // O += P V: P's fragments are S's accumulators (same layout), V^T by ldmatrix.trans
#pragma unroll
    for (int kk = 0; kk < TK / 16; ++kk) {
      unsigned pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = UPPER ? pack2<T>(s[2 * kk][2], s[2 * kk][3]) : 0u;
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = UPPER ? pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]) : 0u;
#pragma unroll
      for (int dt2 = 0; dt2 < DT / 2; ++dt2) {
        unsigned r[4];
        ldmatrix_x4_trans(r, vs_base + tile_offset(kk * 16 + (ld_mat & 1) * 8 + ld_row, 2 * dt2 + (ld_mat >> 1),
                                                   C::kRowBytes));
        mma_16816<T>(o[2 * dt2], pa, r[0], r[1]);
        mma_16816<T>(o[2 * dt2 + 1], pa, r[2], r[3]);
      }
    }
  }

  // each row's sum over the four lanes that share it
#pragma unroll
  for (int hf = 0; hf < HALVES; ++hf) {
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 1);
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 2);
  }

  // merge the warps through shared memory (the rings, now drained)
  cp_async_wait<0>();
  __syncthreads();
  float(*sm_m)[16] = reinterpret_cast<float(*)[16]>(smem_raw);
  float(*sm_l)[16] = sm_m + W;
  float(*sm_o)[16][D] = reinterpret_cast<float(*)[16][D]>(sm_l + W);
#pragma unroll
  for (int hf = 0; hf < HALVES; ++hf) {
    const int r = hf * 8 + gq;
    if (cq == 0) {
      sm_m[warp][r] = m[hf];
      sm_l[warp][r] = l[hf];
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      sm_o[warp][r][dt * 8 + 2 * cq] = o[dt][2 * hf];
      sm_o[warp][r][dt * 8 + 2 * cq + 1] = o[dt][2 * hf + 1];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < ROWS * D; idx += C::kThreads) {
    const int r = idx / D, d = idx % D;
    const int row = chunk * ROWS + r;
    if (row >= rows_total) break;  // rows grow with idx
    store_split_partial<W>(p, b, h, row, split, d, &sm_m[0][r], &sm_l[0][r], 16, &sm_o[0][r][d], 16 * D);
  }
}

// ---------------------------------------------------------------------------------------------
// host side

// query rows an FMA decode block holds in registers: g * T rounded up to 1, 2, 4 or 8
inline int decode_block_rows(int rows_total) {
  return rows_total <= 1 ? 1 : rows_total <= 2 ? 2 : rows_total <= 4 ? 4 : 8;
}

// Calls f(integral_constant<D>); false if D is not 64, 128 or 256.
template <typename F>
bool dispatch_head_dim(int D, F&& f) {
  switch (D) {
    case 64: f(std::integral_constant<int, 64>{}); return true;
    case 128: f(std::integral_constant<int, 128>{}); return true;
    case 256: f(std::integral_constant<int, 256>{}); return true;
    default: return false;
  }
}

// Any head dim that is a multiple of kVec up to 256, as the kernel's head dim at or above it: the FMA
// kernel and the combine run it with the lanes past D idle (Phi-3's 96, small test models' 16). Calls
// f(integral_constant<kernel head dim>); false for other head dims.
template <typename F>
bool dispatch_padded_head_dim(int D, F&& f) {
  if (D < kVec || D % kVec != 0 || D > 256) return false;
  return dispatch_head_dim(D <= 64 ? 64 : D <= 128 ? 128 : 256, f);
}

// Calls f(integral_constant<kernel head dim>, integral_constant<ROWS>); false where
// dispatch_padded_head_dim is.
template <typename F>
bool dispatch_decode_shape(int D, int rows_total, F&& f) {
  const int rows = decode_block_rows(rows_total);
  return dispatch_padded_head_dim(D, [&](auto d) {
    switch (rows) {
      case 1: f(d, std::integral_constant<int, 1>{}); break;
      case 2: f(d, std::integral_constant<int, 2>{}); break;
      case 4: f(d, std::integral_constant<int, 4>{}); break;
      default: f(d, std::integral_constant<int, 8>{}); break;
    }
  });
}

// The pass-1 kernel chosen for a shape, with what the launch and the split count need.
struct DecodeKernel {
  void (*kernel)(DecodeParams);
  int threads, smem, rows, keys_per_step, blocks_per_sm;
};

template <typename C, void (*Kernel)(DecodeParams)>
DecodeKernel describe_decode_kernel() {
  static const int blocks_per_sm = [] {  // once per kernel and process
    int n = 0;
    if (cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, C::kThreads, C::kSmemBytes) != cudaSuccess ||
        n < 1) {
      cudaGetLastError();
      n = 1;
    }
    return n;
  }();
  return {Kernel, C::kThreads, C::kSmemBytes, C::kRows, C::kKeysPerStep, blocks_per_sm};
}

// Tensor cores (mma.sync, compute capability 8.0+) for fp16/bf16 at head dims 64, 128 and 256; the
// FMA kernel for fp32, other head dims, or where `tensor_cores` is false. The choice depends on the
// dtype and head dim, never on T: every row of a cache goes through the same kernel. False where
// dispatch_padded_head_dim is.
template <typename T>
bool select_decode_kernel(int D, int rows_total, bool tensor_cores, DecodeKernel& k) {
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores && (D == 64 || D == 128 || D == 256)) {
      return dispatch_head_dim(D, [&](auto d) {
        constexpr int kD = decltype(d)::value;
        k = rows_total > 8
                ? describe_decode_kernel<MmaDecodeConfig<kD, true>, decode_attention_mma_kernel<T, kD, true>>()
                : describe_decode_kernel<MmaDecodeConfig<kD, false>, decode_attention_mma_kernel<T, kD, false>>();
      });
    }
  }
  return dispatch_decode_shape(D, rows_total, [&](auto d, auto rows) {
    constexpr int kD = decltype(d)::value, kRows = decltype(rows)::value;
    k = describe_decode_kernel<DecodeConfig<T, kD, kRows>, decode_attention_kernel<T, kD, kRows>>();
  });
}

// Splits per (batch, kv head, row chunk): enough blocks for one full wave of the GPU, never
// more than the capacity can fill with one load step each. Depends on shapes and capacity only,
// never on seq_lens, so a captured graph's workspace stays the right size.
template <typename T>
int decode_attention_num_splits(int B, int Hq, int Hkv, int T_, int D, int cap, int num_sms, bool tensor_cores = true,
                                int split_keys = 0) {
  // fixed pieces: enough for the capacity's worth of keys wherever they start (a ring's window may
  // straddle a piece boundary), whatever the step's length
  if (split_keys > 0) return (cap + split_keys - 1) / split_keys + 1;
  const int rows_total = (Hq / Hkv) * T_;
  DecodeKernel k{};
  if (!select_decode_kernel<T>(D, rows_total, tensor_cores, k)) return 1;
  const int64_t chunks = (rows_total + k.rows - 1) / k.rows;
  const int64_t base = int64_t(B) * Hkv * chunks;
  const int64_t wave = int64_t(k.blocks_per_sm) * num_sms;
  int64_t s = wave / base;
  const int64_t fill = (int64_t(cap) + k.keys_per_step - 1) / k.keys_per_step;
  s = s < fill ? s : fill;
  return int(s < 1 ? 1 : s);
}

// Both passes on `stream`; false for a head dim dispatch_padded_head_dim refuses. p.splits and the
// workspace must come from decode_attention_num_splits with the same `tensor_cores`. The caller
// checks for launch errors. `programmatic_launch` (where the device has it): pass 1 is scheduled while
// the kernel before it ends (and waits for it before reading anything), pass 2 overlaps pass 1's tail.
template <typename T>
bool launch_decode_attention(const DecodeParams& p, cudaStream_t stream, bool programmatic_launch = false,
                             bool tensor_cores = true) {
  const int rows_total = (p.Hq / p.Hkv) * p.T;
  DecodeKernel k{};
  if (!select_decode_kernel<T>(p.D, rows_total, tensor_cores, k)) return false;
  const int chunks = (rows_total + k.rows - 1) / k.rows;
  const dim3 grid(unsigned(int64_t(chunks) * p.Hkv * p.B), unsigned(p.splits));
  // per launch, not once: the attribute belongs to the current device
  cudaFuncSetAttribute(k.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem);
  ::chunkinfer::cuda::launch_kernel(programmatic_launch, k.kernel, grid, dim3(k.threads), size_t(k.smem), stream, p);
  dispatch_padded_head_dim(p.D, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    const size_t smem = (size_t(p.splits) + (kCombineThreads / (kD / 4)) * kD + 32) * sizeof(float);
    const unsigned rows = unsigned(int64_t(p.B) * p.Hq * p.T);
    ::chunkinfer::cuda::launch_kernel(programmatic_launch, decode_attention_combine_kernel<T, kD>, dim3(rows),
                                      dim3(kCombineThreads), smem, stream, p);
  });
  return true;
}

// ---------------------------------------------------------------------------------------------
// merge of two partial attentions: one warp per row

constexpr int kMergeWarps = 8;

// merge_weights' math on the device: the fast intrinsics
struct FastMath {
  __device__ static float max(float a, float b) { return fmaxf(a, b); }
  __device__ static float exp(float x) { return __expf(x); }
  __device__ static float log(float x) { return __logf(x); }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kMergeWarps * 32) merge_attn_states_kernel(const MergeParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const MergeWeights w = merge_weights<FastMath>(p.lse_a[row * p.la], p.lse_b[row * p.lb]);
  const T* a = static_cast<const T*>(p.out_a) + row * p.sa;
  const T* bb = static_cast<const T*>(p.out_b) + row * p.sb;
  T* o = static_cast<T*>(p.out) + row * p.so;
  for (int d = lane * VEC; d < p.D; d += 32 * VEC) {
    T xa[VEC], xb[VEC], xo[VEC];
    if constexpr (VEC * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(xa) = *reinterpret_cast<const uint4*>(a + d);
      *reinterpret_cast<uint4*>(xb) = *reinterpret_cast<const uint4*>(bb + d);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        xa[i] = a[d + i];
        xb[i] = bb[d + i];
      }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      // a segment with zero weight contributes nothing, even where its output is not finite
      const float va = w.a != 0.f ? w.a * to_float(xa[i]) : 0.f;
      const float vb = w.b != 0.f ? w.b * to_float(xb[i]) : 0.f;
      xo[i] = from_float<T>(va + vb);
    }
    if constexpr (VEC * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(o + d) = *reinterpret_cast<const uint4*>(xo);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[d + i] = xo[i];
    }
  }
  __syncwarp();  // every lane has read lse_a, lse_b before they may be overwritten
  if (lane == 0) p.lse[row * p.lo] = w.lse;
}

// `vectorised`: D and the three row strides are multiples of 16 bytes and the pointers aligned.
// The caller checks for launch errors.
template <typename T>
void launch_merge_attn_states(const MergeParams& p, bool vectorised, cudaStream_t stream) {
  if (p.rows == 0) return;
  const unsigned blocks = unsigned((p.rows + kMergeWarps - 1) / kMergeWarps);
  constexpr int kVec16 = int(16 / sizeof(T));
  if (vectorised)
    merge_attn_states_kernel<T, kVec16><<<blocks, kMergeWarps * 32, 0, stream>>>(p);
  else
    merge_attn_states_kernel<T, 1><<<blocks, kMergeWarps * 32, 0, stream>>>(p);
}

}  // namespace attention
}  // namespace chunkinfer
