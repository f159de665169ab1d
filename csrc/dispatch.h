// dtype dispatch for chunkinfer's kernels: fp32, fp16 and bf16, nothing else. Unsupported dtypes
// never reach it: the argument checks in checks.cpp name the op and argument first.
#pragma once

#include <ATen/Dispatch.h>

#define CHUNKINFER_DISPATCH_FLOATING(TYPE, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, "chunkinfer",                               \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
