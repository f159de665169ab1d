// 16-float vectors for the CPU kernels' hot loops, written once as GCC vector extensions: GCC lowers a
// v16f to one zmm (x86-64-v4), two ymm (v3) or four xmm (baseline). The extension is built for baseline
// x86-64, so the functions holding the loops are compiled once per vector ISA (CHUNKINFER_SIMD_CLONES)
// and the best is picked at load time.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CHUNKINFER_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CHUNKINFER_SIMD_CLONES
#endif

namespace chunkinfer::cpu {

// aligned(4): unaligned loads.
typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
typedef uint32_t v16u __attribute__((vector_size(64), aligned(4)));
typedef uint16_t v16h __attribute__((vector_size(32), aligned(2)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

__attribute__((always_inline)) inline v16f load16(const float* p) { return *reinterpret_cast<const v16f*>(p); }
__attribute__((always_inline)) inline void store16(float* p, v16f x) { *reinterpret_cast<v16f*>(p) = x; }
__attribute__((always_inline)) inline v16f splat16(float x) { return v16f{} + x; }

__attribute__((always_inline)) inline float hsum(v16f x) {
  const v8f a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// 16 consecutive elements as fp32: fp32 loaded as is, bf16 (raw uint16) widened in registers.
__attribute__((always_inline)) inline v16f load_row16(const float* p) { return load16(p); }
__attribute__((always_inline)) inline v16f load_row16(const uint16_t* p) {
  const v16h h = *reinterpret_cast<const v16h*>(p);
  return (v16f)(__builtin_convertvector(h, v16u) << 16);  // a vector cast reinterprets the bits
}

// One element as fp32, the same way.
__attribute__((always_inline)) inline float load_one(const float* p) { return *p; }
__attribute__((always_inline)) inline float load_one(const uint16_t* p) {
  const uint32_t bits = uint32_t(*p) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// bf16 words from the codec's code nibbles, table and rest bytes (kv_codec::Bf16CodesLoop): n a multiple of 32.
// Defined in kv_codec.cpp, compiled once per vector ISA (the table lookup is a byte shuffle).
int64_t bf16_codes_to_words(const uint8_t* codes, const uint8_t* rest, const uint8_t* table, uint16_t* out, int64_t n);

}  // namespace chunkinfer::cpu
