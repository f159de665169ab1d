// How merge_attn_states weighs its two partial attentions by their log-sum-exps, written once for the
// CPU loop and the CUDA kernel so that both treat the edge cases alike. Math supplies max, exp and
// log: std:: on the CPU; fmaxf, __expf and __logf on CUDA (they round differently, and fmaxf drops a
// NaN where std::max may keep it).
#pragma once

#include <cmath>

#include "host_device.h"

namespace chunkinfer {

struct MergeWeights {
  float a, b;  // of out_a's and out_b's rows
  float lse;   // of the merged attention
};

template <typename Math>
CHUNKINFER_HOST_DEVICE inline MergeWeights merge_weights(float lse_a, float lse_b) {
  MergeWeights w;
  const float mx = Math::max(lse_a, lse_b);
  if (mx == -INFINITY) {  // neither side saw a key
    w.a = w.b = 0.f;
    w.lse = -INFINITY;
  } else if (mx == INFINITY) {  // infinite mass: shared by the infinite sides
    w.a = lse_a == INFINITY ? 1.f : 0.f;
    w.b = lse_b == INFINITY ? 1.f : 0.f;
    const float n = w.a + w.b;
    w.a /= n;
    w.b /= n;
    w.lse = INFINITY;
  } else {
    const float ea = Math::exp(lse_a - mx), eb = Math::exp(lse_b - mx);
    const float sum = ea + eb;
    w.a = ea / sum;
    w.b = eb / sum;
    w.lse = mx + Math::log(sum);
  }
  return w;
}

}  // namespace chunkinfer
