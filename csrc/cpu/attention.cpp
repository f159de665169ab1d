// CPU kernels of the attention ops, for CPU tensors and for attending over KV that lives in host
// memory. decode_attention runs at::parallel_for over (batch, kv head, split of the keys); a task
// converts a block of K (and V) rows to fp32 in a small buffer of its own and updates an online
// softmax for all g * T query rows of its kv head, so K and V stream from memory once. The hot
// loops are plain loops over contiguous floats, compiled once per vector ISA (target_clones) and
// picked at load time, because the extension itself is built for baseline x86-64.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../dispatch.h"
#include "../kv_codec_ops.h"
#include "../merge_weights.h"
#include "../ops.h"
#include "../register_backend.h"
#include "simd16.h"

namespace chunkinfer::cpu {
namespace {

constexpr int64_t kBlockKeys = 64;      // keys converted and scored at a time (fits L1 with V)
constexpr int64_t kMinSplitKeys = 1024;  // below this a task's fixed costs stop being small
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x in [-87, 0] as plain arithmetic the compiler vectorises (std::exp it does not), on a
// float or on 16 lanes (V = v16f, I = v16i) alike: 2^n * e^r with |r| <= ln2/2, degree-6 Taylor,
// relative error under 2e-7.
template <typename V, typename I>
__attribute__((always_inline)) inline V exp_clamped(V x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const V t = x * 1.44269504088896341f + shifter;
  const V n = t - shifter;
  const V r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = r * (1.0f / 720) + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I pi, ti;
  static_assert(sizeof(I) == sizeof(V));
  std::memcpy(&pi, &p, sizeof(V));
  std::memcpy(&ti, &t, sizeof(V));
  pi += (ti - 0x4B400000) << 23;  // 0x4B400000 is the bit pattern of the shifter
  std::memcpy(&p, &pi, sizeof(V));
  return p;
}

// exp(x) for x <= 0; underflows to ~1e-38.
inline float exp_nonpositive(float x) { return exp_clamped<float, int32_t>(std::max(x, -87.0f)); }


// exp_nonpositive on 16 lanes, and exactly 0 below -87 (masked keys are -inf)
__attribute__((always_inline)) inline v16f exp16(v16f x) {
  const v16f lo = splat16(-87.0f);
  const v16f e = exp_clamped<v16f, v16i>(x < lo ? lo : x);
  return x < lo ? v16f{} : e;
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

CHUNKINFER_SIMD_CLONES
void bf16_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    store16(dst + i, load_row16(src + i));
  }
  for (; i < n; ++i) {
    const uint32_t bits = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &bits, 4);
  }
}


// acc[rows] += p[rows] V over keys [ja, jb) for NR rows and 16 * NV columns starting at column c:
// every V vector is loaded (and widened) once for all NR rows; NR * NV accumulators stay in registers.
template <int NR, int NV, typename E>
__attribute__((always_inline)) inline void pv_tile(const float* __restrict s, float* __restrict acc, int64_t D,
                                                   const E* __restrict v, int64_t v_stride, int64_t ja, int64_t jb,
                                                   int64_t c) {
  v16f o[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i) o[r][i] = load16(acc + r * D + c + 16 * i);
  for (int64_t j = ja; j < jb; ++j) {
    const E* vj = v + j * v_stride + c;
    v16f vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = load_row16(vj + 16 * i);
    for (int r = 0; r < NR; ++r) {
      const v16f p = splat16(s[r * kBlockKeys + j]);
      for (int i = 0; i < NV; ++i) o[r][i] += p * vv[i];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i) store16(acc + r * D + c + 16 * i, o[r][i]);
}

template <int NR, typename E>
__attribute__((always_inline)) inline void pv_rows(const float* s, float* acc, int64_t D, const E* v,
                                                   int64_t v_stride, int64_t ja, int64_t jb) {
  const int64_t nv = D / 16;
  int64_t i = 0;
  for (; i + 4 <= nv; i += 4) pv_tile<NR, 4>(s, acc, D, v, v_stride, ja, jb, 16 * i);
  for (; i < nv; ++i) pv_tile<NR, 1>(s, acc, D, v, v_stride, ja, jb, 16 * i);
}

// One block of n <= kBlockKeys keys for R query rows: row r sees block keys [lo[r], hi[r]).
// Updates the online softmax state: m (running max), l (running sum), acc (unnormalised output).
// For head dims that are a multiple of 16, K and V in fp32 or bf16 (E = uint16_t, widened in
// registers: no conversion pass): every K and V row is loaded once for four query rows.
template <typename E>
__attribute__((always_inline)) inline void attend_block16_body(
    const float* __restrict q,  // [R, D], already times the softmax scale
    int64_t R, int64_t D,
    const E* __restrict k, int64_t k_stride,  // [kBlockKeys, k_stride]: only rows [vlo, vhi) are read
    const E* __restrict v, int64_t v_stride,  // [kBlockKeys, v_stride]
    int64_t vlo, int64_t vhi, const int64_t* lo, const int64_t* hi,  // block-relative
    float* __restrict s,                              // [R, kBlockKeys] scratch
    float* __restrict m, float* __restrict l,         // [R]
    float* __restrict acc) {                          // [R, D]
  const int64_t nv = D / 16;
  int64_t j0 = vhi, j1 = vlo;
  for (int64_t r = 0; r < R; ++r) {
    j0 = std::min(j0, std::max(lo[r], vlo));
    j1 = std::max(j1, std::min(hi[r], vhi));
  }
  if (j0 >= j1) return;
  // scores, four rows at a time against each key row
  for (int64_t j = j0; j < j1; ++j) {
    const E* kj = k + j * k_stride;
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) {
      v16f a0{}, a1{}, a2{}, a3{};
      for (int64_t i = 0; i < nv; ++i) {
        const v16f kv = load_row16(kj + 16 * i);
        a0 += load16(q + r * D + 16 * i) * kv;
        a1 += load16(q + (r + 1) * D + 16 * i) * kv;
        a2 += load16(q + (r + 2) * D + 16 * i) * kv;
        a3 += load16(q + (r + 3) * D + 16 * i) * kv;
      }
      s[r * kBlockKeys + j] = hsum(a0);
      s[(r + 1) * kBlockKeys + j] = hsum(a1);
      s[(r + 2) * kBlockKeys + j] = hsum(a2);
      s[(r + 3) * kBlockKeys + j] = hsum(a3);
    }
    for (; r < R; ++r) {
      v16f a0{};
      for (int64_t i = 0; i < nv; ++i) a0 += load16(q + r * D + 16 * i) * load_row16(kj + 16 * i);
      s[r * kBlockKeys + j] = hsum(a0);
    }
  }
  // softmax update per row over the whole block, 16 keys a lane group, the keys outside the row's range
  // at probability 0: a row's sum then runs in the same order whatever the other rows (a T-token step
  // computes each row as a one-token step does), and the P V tiles below may run over the union of ranges
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * kBlockKeys;
    const int64_t a = std::max(lo[r], vlo), b = std::min(hi[r], vhi);
    if (a >= b) {
      std::fill(sr + j0, sr + j1, 0.f);
      continue;
    }
    for (int64_t j = 0; j < kBlockKeys; ++j)
      if (j < a || j >= b) sr[j] = kNegInf;
    float mx = m[r];
    for (int64_t j = a; j < b; ++j) mx = std::max(mx, sr[j]);
    const float corr = m[r] == kNegInf ? 0.f : std::exp(m[r] - mx);
    m[r] = mx;
    v16f sum{};
    for (int64_t j = 0; j < kBlockKeys; j += 16) {
      const v16f p = exp16(load16(sr + j) - mx);
      store16(sr + j, p);
      sum += p;
    }
    l[r] = l[r] * corr + hsum(sum);
    float* o = acc + r * D;
    for (int64_t i = 0; i < nv; ++i) store16(o + 16 * i, load16(o + 16 * i) * corr);
  }
  // acc += P V over [j0, j1): four rows per pass over V
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) pv_rows<4>(s + r * kBlockKeys, acc + r * D, D, v, v_stride, j0, j1);
  for (; r < R; ++r) pv_rows<1>(s + r * kBlockKeys, acc + r * D, D, v, v_stride, j0, j1);
}

CHUNKINFER_SIMD_CLONES
void attend_block16(const float* __restrict q, int64_t R, int64_t D, const float* __restrict k, int64_t k_stride,
                    const float* __restrict v, int64_t v_stride, int64_t vlo, int64_t vhi, const int64_t* lo,
                    const int64_t* hi, float* __restrict s, float* __restrict m, float* __restrict l,
                    float* __restrict acc) {
  attend_block16_body(q, R, D, k, k_stride, v, v_stride, vlo, vhi, lo, hi, s, m, l, acc);
}

CHUNKINFER_SIMD_CLONES
void attend_block16_bf16(const float* __restrict q, int64_t R, int64_t D, const uint16_t* __restrict k,
                         int64_t k_stride, const uint16_t* __restrict v, int64_t v_stride, int64_t vlo, int64_t vhi,
                         const int64_t* lo, const int64_t* hi, float* __restrict s, float* __restrict m,
                         float* __restrict l, float* __restrict acc) {
  attend_block16_body(q, R, D, k, k_stride, v, v_stride, vlo, vhi, lo, hi, s, m, l, acc);
}

// The same for any head dim, in plain scalar loops (a row's sum runs over its own keys in order).
void attend_block_any(const float* __restrict q, int64_t R, int64_t D, const float* __restrict k, int64_t k_stride,
                      const float* __restrict v, int64_t v_stride, int64_t vlo, int64_t vhi, const int64_t* lo,
                      const int64_t* hi, float* __restrict s, float* __restrict m, float* __restrict l,
                      float* __restrict acc) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t a = std::max(lo[r], vlo), b = std::min(hi[r], vhi);
    if (a >= b) continue;
    float* sr = s + r * kBlockKeys;
    float mx = m[r];
    for (int64_t j = a; j < b; ++j) {
      sr[j] = dot(q + r * D, k + j * k_stride, D);
      mx = std::max(mx, sr[j]);
    }
    const float corr = m[r] == kNegInf ? 0.f : std::exp(m[r] - mx);
    m[r] = mx;
    float sum = 0.f;
    for (int64_t j = a; j < b; ++j) {
      sr[j] = exp_nonpositive(sr[j] - mx);
      sum += sr[j];
    }
    l[r] = l[r] * corr + sum;
    float* o = acc + r * D;
    for (int64_t d = 0; d < D; ++d) o[d] *= corr;
    for (int64_t j = a; j < b; ++j)
      for (int64_t d = 0; d < D; ++d) o[d] += sr[j] * v[j * v_stride + d];
  }
}

// The block of kBlockKeys keys from position `base` as fp32 rows: only rows [vlo, vhi) (the keys that
// exist) are read. fp32 rows outside a ring are used where they are; the others are converted (and, in a
// ring, gathered from slot key % cap) into buf [kBlockKeys, D].
template <typename T>
const float* block_as_float(const T* src, int64_t stride, int64_t base, int64_t vlo, int64_t vhi, int64_t D,
                            int64_t ring_cap, float* buf, int64_t* out_stride) {
  if constexpr (std::is_same_v<T, float>) {
    if (ring_cap == 0) {
      *out_stride = stride;
      return src + base * stride;
    }
  }
  for (int64_t j = vlo; j < vhi; ++j) {
    const int64_t key = base + j;
    const T* row = src + (ring_cap ? key % ring_cap : key) * stride;
    if constexpr (std::is_same_v<T, at::BFloat16>)
      bf16_to_float(reinterpret_cast<const uint16_t*>(row), buf + j * D, D);
    else
      for (int64_t d = 0; d < D; ++d) buf[j * D + d] = static_cast<float>(row[d]);
  }
  *out_stride = D;
  return buf;
}

// The keys a task of sequence b reduces: [k0, k1), its blocks aligned at `base`. split_keys = L > 0:
// the absolute piece a = split (mod splits) at or after lo's, [aL, (a + 1)L), so that a query's blocks
// and their order depend on positions alone (a T-token step computes each row as a one-token step
// does); 0: [lo, len) in equal pieces.
struct TaskKeys {
  int64_t base = 0, k0 = 0, k1 = 0;
};

TaskKeys task_keys(int64_t lo, int64_t len, int64_t split, int64_t splits, int64_t split_keys) {
  TaskKeys t;
  if (split_keys > 0) {
    const int64_t first = lo / split_keys;
    const int64_t piece = first + ((split - first) % splits + splits) % splits;
    t.base = piece * split_keys;
    t.k0 = std::max(t.base, lo);
    t.k1 = std::min(len, t.base + split_keys);
  } else {
    const int64_t n = std::max<int64_t>(len - lo, 0);
    const int64_t per = (n + splits - 1) / splits;
    t.k0 = lo + std::min(split * per, n);
    t.k1 = std::min(len, t.k0 + per);
    t.base = t.k0;
  }
  return t;
}

// K and V held as codec blocks (kv_codec_format.h), [B, Hkv, nb, slot_bytes] each, contiguous: a task
// decodes the blocks holding a block of keys into a small buffer of raw 16-bit rows of its own, where the
// plain kernel reads the cache's rows, so the attention that follows is the plain kernel's, bit for bit.
struct CodecKV {
  struct Side {  // K's or V's blocks, spill pool, table and layout
    const uint8_t *blocks, *spill, *table;
    int64_t spill_capacity;
    kv_codec::Layout layout;
  };
  Side k, v;
  int64_t block_rows, blocks_per_stream, Hkv;

  // Raw rows for a buffer holding any kBlockKeys keys from any position (a block_rows boundary before them).
  int64_t buffer_rows() const { return (1 + (kBlockKeys + block_rows - 1) / block_rows) * block_rows; }

  // Decodes into raw the blocks of stream (b, h) holding keys [j0, j0 + n) (n >= 1) from one side and
  // returns where key j0's row is.
  template <typename Bits>
  const uint16_t* rows(const Side& side, int64_t b, int64_t h, int64_t j0, int64_t n, uint16_t* raw) const {
    const kv_codec::Layout& l = side.layout;
    const uint8_t* stream = side.blocks + (b * Hkv + h) * blocks_per_stream * l.slot_bytes;
    const int64_t first = j0 / block_rows, last = (j0 + n - 1) / block_rows, D = l.block_elems / block_rows;
    for (int64_t c = first; c <= last; ++c)
      kv_codec::decode_block<Bits>(stream + c * l.slot_bytes, side.spill, side.spill_capacity, side.table, l,
                                   raw + (c - first) * l.block_elems, l.block_elems, &bf16_codes_to_words);
    return raw + (j0 - first * block_rows) * D;
  }
};

template <typename T>
void decode_attention_cpu_impl(at::Tensor& out, at::Tensor& lse, const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const int32_t* seq_lens, const int32_t* starts,
                               const DecodeArgs& a, const CodecKV* codec = nullptr) {
  const int64_t B = a.B, Hkv = a.Hkv, T_ = a.T, D = a.D, g = a.Hq / a.Hkv, R = g * a.T;
  const float scale = static_cast<float>(a.scale);
  const bool ring = a.window > 0;  // key j at slot j % cap (the caller keeps the keys in view within it)
  // keys the queries of sequence b may see: [lo[b], len[b]); the first query's window starts earliest
  std::vector<int64_t> len(B), start(B), lo(B);
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    len[b] = ring ? std::max<int64_t>(seq_lens[b], 0) : std::clamp<int64_t>(seq_lens[b], 0, a.cap);
    start[b] = starts ? std::clamp<int64_t>(starts[b], 0, len[b]) : 0;
    lo[b] = ring ? std::max(start[b], len[b] - T_ - a.window + 1) : start[b];
    max_keys = std::max(max_keys, len[b] - lo[b]);
  }
  int64_t splits = 0;
  if (a.split_keys > 0) {
    splits = (a.cap + a.split_keys - 1) / a.split_keys + 1;  // as the CUDA kernel: fixed by the capacity
  } else {
    const int64_t threads = at::get_num_threads();
    const int64_t want = (4 * threads + B * Hkv - 1) / (B * Hkv);
    splits = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, max_keys / kMinSplitKeys));
  }
  const int64_t tasks = B * Hkv * splits;
  // per task: R rows of (m, l) and R x D unnormalised outputs
  std::vector<float> part_ml(tasks * R * 2), part_acc(tasks * R * D);

  const T* qd = q.data_ptr<T>();
  const T* kd = codec ? nullptr : k_cache.data_ptr<T>();  // codec: k_cache, v_cache are shapes without data
  const T* vd = codec ? nullptr : v_cache.data_ptr<T>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(R * D), kbuf(kBlockKeys * D), vbuf(kBlockKeys * D), s(R * kBlockKeys);
    std::vector<uint16_t> kraw(codec ? codec->buffer_rows() * D : 0), vraw(kraw.size());
    const auto attend_block = D % 16 == 0 ? attend_block16 : attend_block_any;
    std::vector<int64_t> row_lo(R), row_hi(R), blk_lo(R), blk_hi(R);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits, h = (task / splits) % Hkv, b = task / (splits * Hkv);
      float* m = part_ml.data() + task * R * 2;
      float* l = m + R;
      float* acc = part_acc.data() + task * R * D;
      std::fill(m, m + R, kNegInf);
      std::fill(l, l + R, 0.f);
      std::fill(acc, acc + R * D, 0.f);
      const TaskKeys tk = task_keys(lo[b], len[b], split, splits, a.split_keys);
      if (tk.k0 >= tk.k1) continue;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t hq = h * g + r / T_, t = r % T_;
        const int64_t pos = len[b] - T_ + t;
        row_hi[r] = pos + 1;
        row_lo[r] = ring ? std::max(start[b], pos - a.window + 1) : start[b];
        const T* qr = qd + b * q.stride(0) + hq * q.stride(1) + t * q.stride(2);
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(qr[d]) * scale;
      }
      const T* kb = codec ? nullptr : kd + b * k_cache.stride(0) + h * k_cache.stride(1);
      const T* vb = codec ? nullptr : vd + b * v_cache.stride(0) + h * v_cache.stride(1);
      const int64_t ks = codec ? D : k_cache.stride(2), vs = codec ? D : v_cache.stride(2);
      // blocks of kBlockKeys aligned at the task's base; the keys of [k0, k1) in each are [vlo, vhi)
      for (int64_t j0 = tk.base + (tk.k0 - tk.base) / kBlockKeys * kBlockKeys; j0 < tk.k1; j0 += kBlockKeys) {
        const int64_t vlo = std::max<int64_t>(tk.k0 - j0, 0), vhi = std::min(kBlockKeys, tk.k1 - j0);
        for (int64_t r = 0; r < R; ++r) {
          blk_lo[r] = row_lo[r] - j0;
          blk_hi[r] = row_hi[r] - j0;
        }
        // key j0's row and the stride of rows: in the cache, or decoded from the codec's blocks
        const T* kj = kb ? kb + j0 * ks : nullptr;
        const T* vj = vb ? vb + j0 * vs : nullptr;
        if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
          if (codec) {
            using Bits = std::conditional_t<std::is_same_v<T, at::Half>, kv_codec::Float16Bits, kv_codec::BFloat16Bits>;
            kj = reinterpret_cast<const T*>(codec->rows<Bits>(codec->k, b, h, j0, vhi, kraw.data()));
            vj = reinterpret_cast<const T*>(codec->rows<Bits>(codec->v, b, h, j0, vhi, vraw.data()));
          }
        }
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          if (D % 16 == 0 && !ring) {  // bf16 widened in registers, straight from the cache
            attend_block16_bf16(qf.data(), R, D, reinterpret_cast<const uint16_t*>(kj), ks,
                                reinterpret_cast<const uint16_t*>(vj), vs, vlo, vhi, blk_lo.data(), blk_hi.data(),
                                s.data(), m, l, acc);
            continue;
          }
        }
        const int64_t ring_cap = ring ? a.cap : 0;
        int64_t kstr = 0, vstr = 0;
        const float* kf = ring ? block_as_float(kb, ks, j0, vlo, vhi, D, ring_cap, kbuf.data(), &kstr)
                               : block_as_float(kj, ks, 0, vlo, vhi, D, 0, kbuf.data(), &kstr);
        const float* vf = ring ? block_as_float(vb, vs, j0, vlo, vhi, D, ring_cap, vbuf.data(), &vstr)
                               : block_as_float(vj, vs, 0, vlo, vhi, D, 0, vbuf.data(), &vstr);
        attend_block(qf.data(), R, D, kf, kstr, vf, vstr, vlo, vhi, blk_lo.data(), blk_hi.data(), s.data(), m, l,
                     acc);
      }
    }
  });

  // merge the splits of each (batch, query row), in split order
  T* od = out.data_ptr<T>();
  float* ld = lse.data_ptr<float>();
  at::parallel_for(0, B * Hkv * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t r = idx % R, h = (idx / R) % Hkv, b = idx / (R * Hkv);
      const int64_t hq = h * g + r / T_, t = r % T_;
      const int64_t task0 = (b * Hkv + h) * splits;
      float mx = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) mx = std::max(mx, part_ml[(task0 + sp) * R * 2 + r]);
      float total = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      if (mx != kNegInf) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float* ml = part_ml.data() + (task0 + sp) * R * 2;
          if (ml[R + r] == 0.f) continue;
          const float c = std::exp(ml[r] - mx);
          total += c * ml[R + r];
          const float* ac = part_acc.data() + ((task0 + sp) * R + r) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += c * ac[d];
        }
      }
      T* orow = od + b * out.stride(0) + hq * out.stride(1) + t * out.stride(2);
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(o[d] * inv);
      ld[b * lse.stride(0) + hq * lse.stride(1) + t * lse.stride(2)] = total > 0.f ? mx + std::log(total) : kNegInf;
    }
  });
}

void decode_attention_out(at::Tensor& out, at::Tensor& lse, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& seq_lens,
                          const std::optional<at::Tensor>& starts, std::optional<double> scale, int64_t window,
                          bool /*prefix_ready: a CUDA launch-order promise, nothing to do here*/,
                          int64_t split_keys) {
  const DecodeArgs a = check_decode_attention_args("decode_attention", out, lse, q, k_cache, v_cache, seq_lens, starts,
                                                   scale, window, split_keys);
  if (a.B == 0 || a.Hq == 0 || a.T == 0) return;
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* st = starts.has_value() ? starts->data_ptr<int32_t>() : nullptr;
  CHUNKINFER_DISPATCH_FLOATING(q.scalar_type(), [&] {
    decode_attention_cpu_impl<scalar_t>(out, lse, q, k_cache, v_cache, lens, st, a);
  });
}

std::tuple<at::Tensor, at::Tensor> decode_attention_kv_codec(
    const at::Tensor& q, const at::Tensor& k_blocks, const at::Tensor& k_spill, const at::Tensor& k_table,
    const at::Tensor& v_blocks, const at::Tensor& v_spill, const at::Tensor& v_table, const at::Tensor& seq_lens,
    const std::optional<at::Tensor>& starts, std::optional<double> scale, int64_t block_rows, int64_t k_escape_capacity,
    int64_t v_escape_capacity, int64_t split_keys) {
  auto [out, lse] = decode_attention_outputs(q);
  const DecodeAttentionKVCodecArgs a =
      check_decode_attention_kv_codec_args("decode_attention_kv_codec", out, lse, q, k_blocks, k_spill, k_table, v_blocks,
                                           v_spill, v_table, seq_lens, starts, scale, block_rows, k_escape_capacity,
                                           v_escape_capacity, split_keys);
  CHUNKINFER_CHECK(q.device().is_cpu(), "decode_attention_kv_codec: expected CPU tensors (host KV), got ", q.device());
  if (a.d.B == 0 || a.d.Hq == 0 || a.d.T == 0) return {out, lse};
  const CodecKV codec{{k_blocks.const_data_ptr<uint8_t>(), k_spill.const_data_ptr<uint8_t>(),
                       k_table.const_data_ptr<uint8_t>(), a.k_spill_capacity, a.k_layout},
                      {v_blocks.const_data_ptr<uint8_t>(), v_spill.const_data_ptr<uint8_t>(),
                       v_table.const_data_ptr<uint8_t>(), a.v_spill_capacity, a.v_layout},
                      block_rows, a.blocks_per_stream, a.d.Hkv};
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* st = starts.has_value() ? starts->data_ptr<int32_t>() : nullptr;
  if (q.scalar_type() == at::kBFloat16) {
    decode_attention_cpu_impl<at::BFloat16>(out, lse, q, at::Tensor(), at::Tensor(), lens, st, a.d, &codec);
  } else {
    decode_attention_cpu_impl<at::Half>(out, lse, q, at::Tensor(), at::Tensor(), lens, st, a.d, &codec);
  }
  return {out, lse};
}

// merge_weights' math on the CPU
struct HostMath {
  static float max(float a, float b) { return std::max(a, b); }
  static float exp(float x) { return std::exp(x); }
  static float log(float x) { return std::log(x); }
};

template <typename T>
void merge_rows(const MergeRows& r, T* out, float* lse, const T* a, const float* la, const T* b, const float* lb) {
  at::parallel_for(0, r.rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const MergeWeights w = merge_weights<HostMath>(la[i * r.lse_a_stride], lb[i * r.lse_b_stride]);
      const T* ra = a + i * r.out_a_stride;
      const T* rb = b + i * r.out_b_stride;
      T* ro = out + i * r.out_stride;
      for (int64_t d = 0; d < r.d; ++d) {
        // a segment of zero weight contributes nothing, even where its output is not finite
        const float va = w.a != 0.f ? w.a * static_cast<float>(ra[d]) : 0.f;
        const float vb = w.b != 0.f ? w.b * static_cast<float>(rb[d]) : 0.f;
        ro[d] = static_cast<T>(va + vb);
      }
      lse[i * r.lse_stride] = w.lse;  // after the reads: lse may alias lse_a or lse_b
    }
  });
}

void merge_attn_states_out(at::Tensor& out, at::Tensor& lse, const at::Tensor& out_a, const at::Tensor& lse_a,
                           const at::Tensor& out_b, const at::Tensor& lse_b) {
  const MergeRows r = check_merge_attn_states_args("merge_attn_states", out, lse, out_a, lse_a, out_b, lse_b);
  if (r.rows == 0) return;
  CHUNKINFER_DISPATCH_FLOATING(out_a.scalar_type(), [&] {
    merge_rows<scalar_t>(r, out.data_ptr<scalar_t>(), lse.data_ptr<float>(), out_a.data_ptr<scalar_t>(),
                         lse_a.data_ptr<float>(), out_b.data_ptr<scalar_t>(), lse_b.data_ptr<float>());
  });
}

}  // namespace
}  // namespace chunkinfer::cpu

TORCH_LIBRARY_IMPL(chunkinfer, CPU, m) {
  chunkinfer::register_attention<&chunkinfer::cpu::decode_attention_out, &chunkinfer::cpu::merge_attn_states_out>(m);
  m.impl("decode_attention_kv_codec", &chunkinfer::cpu::decode_attention_kv_codec);  // host KV: the CPU only
}
