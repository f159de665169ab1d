// dtype dispatch for chunkinfer's kernels: fp32, fp16 and bf16, nothing else.
#pragma once

#include <ATen/Dispatch.h>

#define CHUNKINFER_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)
