// Error messages assembled without std::ostream. On the device (torch 2.11 wheel, extension built by
// the system g++ 13) an extension's inlined ostream number formatting crashed inside libstdc++'s
// locale facets (segfault in ostream::operator<<(long) under c10::str). Formatting numbers with
// std::to_string and handing TORCH_CHECK one finished std::string avoids that path entirely.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace chunkinfer {

inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(c10::ScalarType t) { return c10::toString(t); }
inline std::string to_text(const c10::Device& d) { return d.str(); }
inline std::string to_text(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
std::string to_text(T v) {
  return std::to_string(v);
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  ((s += to_text(args)), ...);
  return s;
}

}  // namespace chunkinfer

// TORCH_CHECK with a message built by chunkinfer::message.
#define CHUNKINFER_CHECK(cond, ...) TORCH_CHECK((cond), ::chunkinfer::message(__VA_ARGS__))

// The same for a bad argument: raised in Python as ValueError rather than RuntimeError.
#define CHUNKINFER_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE((cond), ::chunkinfer::message(__VA_ARGS__))
