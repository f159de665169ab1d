// CUDA kernels of the lossless KV codec. Pure CUDA (no torch headers), so an nvcc benchmark or a
// fused consumer can include it alone; csrc/cuda/kv_codec.cu wraps the launchers as torch ops.
//
// The format (csrc/kv_codec_format.h has the bytes): x [..., S, D] bf16/fp16 is a set of streams of S
// rows; a stream is cut into blocks of block_rows rows (N = block_rows * D elements, Np = N rounded up
// to 128) and block b of stream s lives in a fixed-size slot at blocks + stream_offset(s) + b * slot_bytes:
//   header   16 B   u32 n_escapes, u32 spill (0xFFFFFFFF: not spilled, 0xFFFFFFFE: lost, else index)
//   rest     Np B   one byte per element: bf16 sign << 7 | mantissa, fp16 the low 8 mantissa bits
//   codes    Np/2 B the exponent's 4-bit code, element i in nibble (i & 1) of byte i / 2
//   extra    3 * Np/8 B (fp16 only) bit planes of extra = sign << 2 | mantissa bits 9..8: plane j
//                   holds bit j, element i's at bit i % 8 of byte i / 8
//   escapes  4E B   sorted u32 entries position << 8 | exponent for code-15 elements (first E of them)
// A block with more than E escapes has its exponent plane (Np bytes) in spill[index] instead.
//
// What a consumer does to read block b of stream s (a decode-attention tile loader, the H2D staging
// expander, a CPU attention loop): load the slot (cp.async / 16-byte loads: every plane is 16-byte
// aligned); read the header once; for element i: exponent = spilled ? spill[index][i]
// : code != 15 ? table[code] : entry with position i (binary search, n_escapes <= E entries, taken only
// by elements whose code is 15, ~0.01-0.4% of real K, V elements); word = the dtype's join of
// (exponent, rest[i], extra bits). 8 elements (one 16-byte output) need 8 rest bytes + 4 code bytes and
// a few integer ops each: no shared state, no atomics, no other block.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../kv_codec_format.h"
#include "../row_layout.h"

namespace chunkinfer::kv_codec::cuda {

constexpr int kEncodeThreads = 256;  // one CTA per block: the escape list needs a block-wide order
constexpr int kDecodeThreads = 256;
constexpr int kDecodeChunks = 2;     // chunks per decode thread: both loaded before either is stored
constexpr int kChunk = 8;            // elements per thread step: one 16-byte load/store of x or out
constexpr int kMaxGridY = 65535;

// Launch grids are [blocks or chunks of a stream, streams (y, then z)]: a thread's stream is uniform
// over its CTA and the in-stream index fits 32 bits (the launchers check), so no 64-bit division.
__device__ __forceinline__ int64_t stream_index() { return blockIdx.y + int64_t(blockIdx.z) * gridDim.y; }

// Where the data and the blocks are, shared by both kernels.
struct Geometry {
  RowLayout data_streams;   // in elements: where stream s of x (encode) or out (decode) starts
  RowLayout block_streams;  // in bytes: where stream s's first slot starts
  Layout layout;
  int64_t streams, stream_elems, blocks_per_stream, spill_capacity;  // stream_elems = S * D
  bool data_vec;            // every stream of the data starts 16-byte aligned: 16-byte accesses
};

struct EncodeParams {
  const uint16_t* x;        // [streams, S * D]
  uint8_t* blocks;          // [streams, nb, slot_bytes]
  uint8_t* spill;           // [spill_capacity, spill_unit_bytes]
  int* spill_used;          // [1]: the next free spill unit; advanced once per spilled block
  const uint8_t* table;     // [16]
  Geometry g;
};

struct DecodeParams {
  uint16_t* out;            // [streams, S * D]
  const uint8_t* blocks;
  const uint8_t* spill;
  const uint8_t* table;
  Geometry g;
  uint32_t chunks_per_block;  // ceil(N / 8)
};

// Loads elements [i0, i0 + 8) of a block of n valid elements (zeros past n): one 16-byte load when
// aligned and whole, else element by element.
__device__ __forceinline__ void load_chunk(const uint16_t* x, int64_t i0, int64_t n, bool vec, uint16_t w[kChunk]) {
  if (vec && i0 + kChunk <= n) {
    const uint4 v = *reinterpret_cast<const uint4*>(x + i0);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[2 * k] = static_cast<uint16_t>(words[k] & 0xFFFF);
      w[2 * k + 1] = static_cast<uint16_t>(words[k] >> 16);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunk; ++k) w[k] = i0 + k < n ? x[i0 + k] : 0;
}

__device__ __forceinline__ void store_chunk(uint16_t* out, int64_t i0, int64_t n, bool vec, const uint16_t w[kChunk]) {
  if (vec && i0 + kChunk <= n) {
    uint4 v;
    v.x = w[0] | (uint32_t(w[1]) << 16);
    v.y = w[2] | (uint32_t(w[3]) << 16);
    v.z = w[4] | (uint32_t(w[5]) << 16);
    v.w = w[6] | (uint32_t(w[7]) << 16);
    *reinterpret_cast<uint4*>(out + i0) = v;
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    if (i0 + k < n) out[i0 + k] = w[k];
  }
}

// Exclusive prefix sum of v over the CTA (blockDim.x a multiple of 32); `total` gets the sum. Warp
// shuffles, then the warps' totals through shared memory: no atomics.
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t v, uint32_t* warp_totals, uint32_t& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  uint32_t inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  if (lane == 31) warp_totals[warp] = inc;
  __syncthreads();
  uint32_t before = 0, all = 0;
  for (int w = 0; w < warps; ++w) {
    const uint32_t t = warp_totals[w];
    before += w < warp ? t : 0;
    all += t;
  }
  __syncthreads();  // warp_totals is reused by the next call
  total = all;
  return before + inc - v;
}

// One CTA per block (grid [blocks per stream, streams]). Each thread codes 8 consecutive elements per
// step: a 16-byte load of x, an 8-byte store of rest bytes and a 4-byte store of codes, so a warp's
// loads and stores are contiguous (coalesced). The escape entries must be in position order: a
// CTA-wide prefix sum of the per-thread escape counts (skipped when a step has none) gives each its
// slot. A block with too many escapes takes a spill unit with one atomicAdd (per block, never per
// element) and writes its exponent plane there in a second pass over x (rare).
template <typename Bits>
__global__ void __launch_bounds__(kEncodeThreads) kv_encode_kernel(const EncodeParams p) {
  __shared__ uint8_t code_of[256];
  __shared__ uint32_t warp_totals[kEncodeThreads / 32];
  __shared__ uint32_t spill_field;
  for (int e = threadIdx.x; e < 256; e += blockDim.x) {  // exponent -> code, as build_code_of
    uint32_t c = kEscape;
    for (int k = kTableSize - 2; k >= 0; --k) c = p.table[k] == e ? uint32_t(k) : c;
    code_of[e] = static_cast<uint8_t>(c);
  }
  __syncthreads();
  const Geometry& g = p.g;
  const Layout& l = g.layout;
  const int64_t step = int64_t(blockDim.x) * kChunk;
  const int64_t s = stream_index(), b = blockIdx.x;
  if (s >= g.streams) return;  // the z dimension rounds the streams up (uniform over the CTA)
  const int64_t elem0 = b * l.block_elems;
  const int64_t n = min(l.block_elems, g.stream_elems - elem0);
  const uint16_t* x = p.x + g.data_streams.offset(s) + elem0;
  uint8_t* slot = p.blocks + g.block_streams.offset(s) + b * l.slot_bytes;
  const bool vec = g.data_vec && elem0 % kChunk == 0;
  uint32_t n_esc = 0;  // escapes so far: the same in every thread
  for (int64_t base = 0; base < l.padded_elems; base += step) {
    const int64_t i0 = base + threadIdx.x * kChunk;
    const bool active = i0 < l.padded_elems;
    uint32_t escaped = 0, exps[kChunk];
    if (active) {
      uint16_t w[kChunk];
      load_chunk(x, i0, n, vec, w);
      uint32_t rest_lo = 0, rest_hi = 0, codes = 0, extra[3] = {0, 0, 0};
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        const bool valid = i0 + k < n;  // padding: code 0, rest 0
        exps[k] = Bits::exponent(w[k]);
        const uint32_t c = valid ? code_of[exps[k]] : 0u;
        const uint32_t r = Bits::rest(w[k]);
        if (k < 4) rest_lo |= r << (8 * k); else rest_hi |= r << (8 * (k - 4));
        codes |= c << (4 * k);
        escaped |= uint32_t(c == kEscape) << k;
        if constexpr (Bits::kExtraPlanes > 0) {
          const uint32_t ex = Bits::extra(w[k]);
#pragma unroll
          for (int j = 0; j < Bits::kExtraPlanes; ++j) extra[j] |= ((ex >> j) & 1u) << k;
        }
      }
      *reinterpret_cast<uint2*>(slot + l.rest_offset + i0) = make_uint2(rest_lo, rest_hi);
      *reinterpret_cast<uint32_t*>(slot + l.codes_offset + i0 / 2) = codes;
#pragma unroll
      for (int j = 0; j < Bits::kExtraPlanes; ++j) {
        slot[l.extra_offset + j * l.extra_plane_bytes + i0 / kChunk] = static_cast<uint8_t>(extra[j]);
      }
    }
    const uint32_t count = __popc(escaped);
    if (__syncthreads_or(count != 0)) {
      uint32_t total = 0;
      uint32_t rank = n_esc + block_exclusive_scan(count, warp_totals, total);
      uint32_t* entries = reinterpret_cast<uint32_t*>(slot + l.escape_offset);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {  // static indices: exps stays in registers
        if ((escaped >> k) & 1u) {
          if (rank < l.escape_capacity) entries[rank] = escape_entry(uint32_t(i0 + k), exps[k]);
          ++rank;
        }
      }
      n_esc += total;
    }
  }
  uint32_t* entries = reinterpret_cast<uint32_t*>(slot + l.escape_offset);
  for (int64_t r = ::min(int64_t(n_esc), l.escape_capacity) + threadIdx.x; r < l.escape_capacity; r += blockDim.x) {
    entries[r] = 0;
  }
  if (threadIdx.x == 0) {
    uint32_t field = kNotSpilled;
    if (n_esc > l.escape_capacity) {
      const int index = atomicAdd(p.spill_used, 1);
      field = index >= 0 && index < g.spill_capacity ? uint32_t(index) : kSpillLost;
    }
    spill_field = field;
    *reinterpret_cast<uint4*>(slot) = make_uint4(n_esc, field, 0, 0);
  }
  __syncthreads();
  const uint32_t field = spill_field;
  if (n_esc > l.escape_capacity && field != kSpillLost) {  // the rare pass: the exponent plane
    uint8_t* plane = p.spill + int64_t(field) * l.spill_unit_bytes;
    for (int64_t i0 = threadIdx.x * kChunk; i0 < l.padded_elems; i0 += step) {
      uint16_t w[kChunk];
      load_chunk(x, i0, n, vec, w);
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        const uint32_t e = Bits::exponent(w[k]);
        if (k < 4) lo |= e << (8 * k); else hi |= e << (8 * (k - 4));
      }
      *reinterpret_cast<uint2*>(plane + i0) = make_uint2(lo, hi);
    }
  }
}

// What one decode thread loads for one 8-element chunk, all before any is stored.
struct DecodeChunk {
  const uint8_t* slot;
  uint4 header;
  uint2 rest, spilled_exps;
  uint32_t codes, extra[3];
  int64_t i0, n, elem0, b;
  bool valid;
};

// Grid [chunks of a stream / (256 threads * 2), streams]. Each thread takes two 8-element chunks, 256
// chunks apart: for each it reads its block's header (16 bytes, an L1 hit after the first chunk of a
// block), 8 rest bytes and 4 code bytes, then writes one 16-byte vector. Consecutive threads take
// consecutive chunks, so a warp's loads and stores are contiguous (coalesced); both chunks' loads are in
// flight before either store (memory-level parallelism); no thread waits on another, no atomics.
// Escaped elements (code 15) binary-search their block's sorted entries (at most E).
template <typename Bits>
__global__ void __launch_bounds__(kDecodeThreads) kv_decode_kernel(const DecodeParams p) {
  __shared__ uint8_t table[kTableSize];
  if (threadIdx.x < kTableSize) table[threadIdx.x] = p.table[threadIdx.x];
  __syncthreads();
  const Geometry& g = p.g;
  const int64_t s = stream_index();
  if (s >= g.streams) return;
  const Layout& l = g.layout;
  const uint8_t* blocks = p.blocks + g.block_streams.offset(s);
  uint16_t* out = p.out + g.data_streams.offset(s);
  DecodeChunk c[kDecodeChunks];
#pragma unroll
  for (int k = 0; k < kDecodeChunks; ++k) {
    const uint32_t u = (blockIdx.x * kDecodeChunks + k) * kDecodeThreads + threadIdx.x;
    const uint32_t b = u / p.chunks_per_block;
    c[k].b = b;
    c[k].i0 = int64_t(u - b * p.chunks_per_block) * kChunk;
    c[k].elem0 = int64_t(b) * l.block_elems;
    c[k].n = b < g.blocks_per_stream ? ::min(l.block_elems, g.stream_elems - c[k].elem0) : 0;
    c[k].valid = c[k].i0 < c[k].n;  // past the stream, or past the end of its short last block
    if (!c[k].valid) continue;
    c[k].slot = blocks + c[k].b * l.slot_bytes;
    c[k].header = *reinterpret_cast<const uint4*>(c[k].slot);
    c[k].rest = *reinterpret_cast<const uint2*>(c[k].slot + l.rest_offset + c[k].i0);
    c[k].codes = *reinterpret_cast<const uint32_t*>(c[k].slot + l.codes_offset + c[k].i0 / 2);
#pragma unroll
    for (int j = 0; j < Bits::kExtraPlanes; ++j) {
      c[k].extra[j] = c[k].slot[l.extra_offset + j * l.extra_plane_bytes + c[k].i0 / kChunk];
    }
    const uint32_t n_esc = c[k].header.x, field = c[k].header.y;
    c[k].spilled_exps = make_uint2(0, 0);
    if (n_esc > l.escape_capacity && field < g.spill_capacity) {
      c[k].spilled_exps = *reinterpret_cast<const uint2*>(p.spill + int64_t(field) * l.spill_unit_bytes + c[k].i0);
    }
  }
#pragma unroll
  for (int k = 0; k < kDecodeChunks; ++k) {
    if (!c[k].valid) continue;
    const uint32_t n_esc = c[k].header.x, field = c[k].header.y;
    const bool spilled = n_esc > l.escape_capacity, lost = spilled && field >= g.spill_capacity;
    const AlignedEntries entry{reinterpret_cast<const uint32_t*>(c[k].slot + l.escape_offset)};
    uint16_t w[kChunk];
#pragma unroll
    for (int e8 = 0; e8 < kChunk; ++e8) {
      const uint32_t r = ((e8 < 4 ? c[k].rest.x : c[k].rest.y) >> (8 * (e8 & 3))) & 0xFF;
      const uint32_t code = (c[k].codes >> (4 * e8)) & 0xF;
      uint32_t ex = 0;
#pragma unroll
      for (int j = 0; j < Bits::kExtraPlanes; ++j) ex |= ((c[k].extra[j] >> e8) & 1u) << j;
      int e;
      if (spilled) {
        e = lost ? -1 : int(((e8 < 4 ? c[k].spilled_exps.x : c[k].spilled_exps.y) >> (8 * (e8 & 3))) & 0xFF);
      } else if (code != kEscape) {
        e = table[code];
      } else {
        e = find_escape(entry, n_esc, uint32_t(c[k].i0 + e8));
      }
      w[e8] = e < 0 ? Bits::kNaN : Bits::join(uint32_t(e), r, ex);
    }
    store_chunk(out + c[k].elem0, c[k].i0, c[k].n, g.data_vec && c[k].elem0 % kChunk == 0, w);
  }
}

}  // namespace chunkinfer::kv_codec::cuda
