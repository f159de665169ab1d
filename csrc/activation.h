// The activations of the act-and-mul ops: one enum for the argument checks, every backend and the
// pure-CUDA kernel headers (no torch here).
#pragma once

#include <type_traits>

namespace chunkinfer {

enum class Activation { kSilu, kGeluErf, kGeluTanh };

// f(std::integral_constant<Activation, act>{}): the runtime choice as a template argument, so a
// backend writes its dispatch over the activations once.
template <typename F>
decltype(auto) with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kSilu:
      return f(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGeluErf:
      return f(std::integral_constant<Activation, Activation::kGeluErf>{});
    default:
      return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
  }
}

}  // namespace chunkinfer
