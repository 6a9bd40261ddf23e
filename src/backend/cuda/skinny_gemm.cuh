// Linear layers of a few tokens (a small decode step): out[m, n] = x[m, k] w[n, k]^T, bf16
// inputs and weights, f32 sums, bf16 or f32 output. One warp per weight row, four rows per CTA.
// The weights do not depend on the kernels before this one, so each CTA's rows come into shared
// memory by one bulk copy issued before it waits for them (programmatic dependent launch): the
// weight stream overlaps the previous kernel, and only the dot products with x remain once x is
// ready. (cuBLAS's kernels are outside that chain.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ernie::cuda {

constexpr int kSkinnyMaxRows = 4;

// Whether skinny_gemm takes an m x k input (m <= kSkinnyMaxRows, k % 8 == 0, k > 0, and its
// four weight rows and the input fit in 200 KB of shared memory).
bool skinny_gemm_fits(int m, int k);

// out [m, n] (f32 when out_f32, else bf16) = x w^T; x [m, k], w [n, k] row-major, 16-byte
// aligned.
void skinny_gemm(void* out, bool out_f32, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                 int n, int k, cudaStream_t stream);

}  // namespace ernie::cuda
