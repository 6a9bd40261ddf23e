// The ERNIE-4.5 MoE router on the device, in f32: logits = x W^T, p = softmax(logits), experts =
// top-k of p + correction bias (selection only), weights = the unbiased p of the chosen experts
// divided by max(sum, norm_min).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ernie::cuda {

// x [tokens, hidden] bf16; router [experts, hidden] f32; bias [experts] f32.
// Writes ids [tokens, k] (descending biased score, lower id first on ties) and weights [tokens, k].
// experts <= 1024, k <= experts.
void route_topk(int32_t* ids, float* weights, const __nv_bfloat16* x, const float* router,
                const float* bias, int tokens, int hidden, int experts, int k, float norm_min,
                cudaStream_t stream);

}  // namespace ernie::cuda
