// The CUDA backend: bf16 weights and activations, bf16 paged KV cache, every op of a step on
// the device (cuBLAS for dense projections, our kernels for the rest). No CUDA headers here.
#pragma once

#include <memory>

#include "backend/backend.h"

namespace ernie::backend {

// Throws ernie::Error when the device cannot be used.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

}  // namespace ernie::backend
