// Fused residual add + RMSNorm on bf16 activations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ernie::cuda {

// residual += x; out = bf16(rms_norm(residual) in f32) * weight. One CTA per row, f32
// accumulation. Shapes: out, residual, x [rows, hidden]; weight [hidden]. With x == nullptr:
// out = rms_norm(residual) * weight, residual untouched.
void fused_add_rms_norm(__nv_bfloat16* out, __nv_bfloat16* residual, const __nv_bfloat16* x,
                        const __nv_bfloat16* weight, int rows, int hidden, float eps,
                        cudaStream_t stream);

}  // namespace ernie::cuda
