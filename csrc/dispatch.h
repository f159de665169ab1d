// dtype dispatch for chunkinfer's kernels: fp32, fp16 and bf16, nothing else.
#pragma once

#include <ATen/Dispatch.h>

// Not AT_DISPATCH_FLOATING_TYPES_AND2: that one also instantiates every kernel for double.
#define CHUNKINFER_DISPATCH_FLOATING(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
