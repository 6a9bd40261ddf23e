// Row gathers and random fills on the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ernie::cuda {

// out [n, row_bytes] = src[indices[i]] row by row (any element type; row_bytes % 4 == 0).
// The embedding lookup is this with the token ids as indices.
void gather_rows(void* out, const void* src, const int32_t* indices, int n, int64_t row_bytes,
                 cudaStream_t stream);

// tokens[feed[j].first] = ids[feed[j].second] for j < n (feed: int32 pairs): the ids a sample
// drew on the device, into the next step's tokens (asynchronous scheduling).
void feed_tokens(int32_t* tokens, const int32_t* feed, int n, const int32_t* ids,
                 cudaStream_t stream);

// Deterministic random values (a function of seed and index only): normal(a, b) through the
// sum of four uniforms, or uniform(a, b). bf16 or f32 destinations.
void fill_random_bf16(__nv_bfloat16* out, int64_t n, bool uniform, double a, double b,
                      uint64_t seed, cudaStream_t stream);
void fill_random_f32(float* out, int64_t n, bool uniform, double a, double b, uint64_t seed,
                     cudaStream_t stream);

}  // namespace ernie::cuda
