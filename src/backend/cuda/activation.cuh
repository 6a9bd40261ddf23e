// SwiGLU on bf16 activations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ernie::cuda {

// out [rows, inter] = bf16(silu(g) * u) computed in f32, where gate_up rows are [g | u].
void silu_mul(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int rows, int inter,
              cudaStream_t stream);

}  // namespace ernie::cuda
