// Loading and storing fp32/fp16/bf16 rows as fp32 vectors, shared by the CPU kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <type_traits>

namespace chunkinfer::cpu {

using fVec = at::vec::Vectorized<float>;

// kStep elements per iteration: one vector of scalar_t, i.e. two fp32 vectors for fp16/bf16.
template <typename scalar_t>
constexpr int64_t kStep = at::vec::Vectorized<scalar_t>::size();

template <typename scalar_t>
inline void load_float(const scalar_t* p, fVec& lo, fVec& hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lo = fVec::loadu(p);
    hi = fVec::loadu(p + fVec::size());
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  }
}

template <typename scalar_t>
inline void store_float(scalar_t* p, const fVec& lo, const fVec& hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lo.store(p);
    hi.store(p + fVec::size());
  } else {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
  }
}

// For float, kStep is one fp32 vector; the pair above then covers two, so step by this instead.
template <typename scalar_t>
constexpr int64_t kPairStep = std::is_same_v<scalar_t, float> ? 2 * fVec::size() : kStep<scalar_t>;

}  // namespace chunkinfer::cpu

namespace chunkinfer::cpu {

// Round two fp32 vectors to scalar_t and back: reproduces an intermediate rounding to the dtype.
template <typename scalar_t>
inline void round_to(fVec& lo, fVec& hi) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(lo, hi));
  }
}

template <typename scalar_t>
inline float round_to(float v) {
  return static_cast<float>(static_cast<scalar_t>(v));
}

// out[c] = f(a[c], b[c]) for c in [begin, end), in fp32 with one rounding to scalar_t. Whole vector
// pairs go to vf(a0, a1, b0, b1), which leaves the results in a0, a1; the tail to sf(a, b). out may be a.
template <typename scalar_t, typename VecF, typename ScalarF>
inline void map2_row(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t begin, int64_t end, VecF vf,
                     ScalarF sf) {
  constexpr int64_t step = kPairStep<scalar_t>;
  int64_t c = begin;
  for (; c + step <= end; c += step) {
    fVec a0, a1, b0, b1;
    load_float(a + c, a0, a1);
    load_float(b + c, b0, b1);
    vf(a0, a1, b0, b1);
    store_float(out + c, a0, a1);
  }
  for (; c < end; ++c) out[c] = static_cast<scalar_t>(sf(static_cast<float>(a[c]), static_cast<float>(b[c])));
}

inline float sum_lanes(const fVec& v) {
  alignas(64) float lanes[fVec::size()];
  v.store(lanes);
  float s = 0.0f;
  for (int i = 0; i < fVec::size(); ++i) s += lanes[i];
  return s;
}

}  // namespace chunkinfer::cpu
