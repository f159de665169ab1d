// Checked CUDA runtime calls for the host-side offload code: the message names the call's purpose
// and carries cudaGetErrorString. Only meaningful in the CUDA build.
#pragma once

#ifdef CHUNKINFER_WITH_CUDA
#include <cuda_runtime_api.h>

#include "../message.h"

#define CHUNKINFER_CUDA_CHECK(call, ...)                                                        \
  do {                                                                                          \
    const cudaError_t chunkinfer_err_ = (call);                                                 \
    CHUNKINFER_CHECK(chunkinfer_err_ == cudaSuccess, __VA_ARGS__, ": ",                         \
                     cudaGetErrorString(chunkinfer_err_));                                      \
  } while (0)
#endif
