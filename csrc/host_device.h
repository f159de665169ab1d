// Marks the pure C++ helpers that the CUDA kernels call too; plain inline functions elsewhere.
#pragma once

#if defined(__CUDACC__)
#define CHUNKINFER_HOST_DEVICE __host__ __device__
#else
#define CHUNKINFER_HOST_DEVICE
#endif
