// Every CUDA runtime call is checked; a failure becomes an ernie::Error naming the call site.
#pragma once

#include <cuda_runtime.h>

#include "common/check.h"

namespace ernie::cuda {

inline void check_cuda(cudaError_t err, const char* what, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  if (err != cudaSuccess) {
    throw Error(
        cat("CUDA error in ", what, ": ", cudaGetErrorString(err), " (", file, ":", line, ")"));
  }
}

}  // namespace ernie::cuda

#define ERNIE_CUDA_CHECK(call) ::ernie::cuda::check_cuda((call), #call)
