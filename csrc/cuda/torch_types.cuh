// Map ATen scalar types to the CUDA types the kernel headers are written in.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace chunkinfer::cuda {

template <typename scalar_t> struct CudaType { using type = scalar_t; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t>
using cuda_t = typename CudaType<scalar_t>::type;

template <typename scalar_t>
inline cuda_t<scalar_t>* cuda_ptr(scalar_t* p) { return reinterpret_cast<cuda_t<scalar_t>*>(p); }
template <typename scalar_t>
inline const cuda_t<scalar_t>* cuda_ptr(const scalar_t* p) { return reinterpret_cast<const cuda_t<scalar_t>*>(p); }

}  // namespace chunkinfer::cuda
