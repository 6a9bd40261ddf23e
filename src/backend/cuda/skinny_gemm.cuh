// Linear layers of a few tokens (a small decode step): out[m, n] = x[m, k] w[n, k]^T, bf16
// inputs and weights, f32 sums, bf16 or f32 output. One warp per weight row, four rows per CTA.
// The weights do not depend on the kernels before this one, so each CTA's rows come into shared
// memory by one bulk copy issued before it waits for them (programmatic dependent launch): the
// weight stream overlaps the previous kernel, and only the dot products with x remain once x is
// ready. (cuBLAS's kernels are outside that chain.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ernie::cuda {

constexpr int kSkinnyMaxRows = 4;
constexpr int kSkinnyTcMaxRows = 32;

// Whether skinny_gemm takes an m x k input (m <= kSkinnyMaxRows, k % 8 == 0, k > 0, and its
// four weight rows and the input fit in 200 KB of shared memory).
bool skinny_gemm_fits(int m, int k);

// out [m, n] (f32 when out_f32, else bf16) = x w^T; x [m, k], w [n, k] row-major, 16-byte
// aligned.
void skinny_gemm(void* out, bool out_f32, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                 int n, int k, cudaStream_t stream);

// What skinny_gemm_rope needs to do rope_store_kv's work in its epilogue (rope.cuh has the
// meaning of each field; inv_freq [head_dim / 2]: 1 / theta^(2j / head_dim), computed in double
// and rounded to f32, as rope_store_kv computes them).
struct SkinnyRope {
  __nv_bfloat16* k_cache = nullptr;
  __nv_bfloat16* v_cache = nullptr;
  const int32_t* positions = nullptr;
  const int64_t* slots = nullptr;
  const float* inv_freq = nullptr;
  int heads = 0, kv_heads = 0, head_dim = 0;
};

bool skinny_rope_fits(int m, int k, const SkinnyRope& rope);

// qkv [m, (heads + 2 kv_heads) head_dim] = x w^T (bf16), then what rope_store_kv does to it,
// in one kernel: the same values as skinny_gemm followed by rope_store_kv.
void skinny_gemm_rope(__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                      int k, const SkinnyRope& rope, cudaStream_t stream);

// Up to 32 rows on the tensor cores (cuda_backend takes it for 5-16 rows, up to 32 under
// ERNIE_SKINNY_TC_MAX=32, for qkv with rope and o where the grid is one wave): a CTA owns
// rows_per_cta (16 or 32) whole weight rows, brought into shared memory before the wait for x.
// out [m, n] bf16 = x w^T, f32 sums. Fits when m <= kSkinnyTcMaxRows, n % rows_per_cta == 0,
// k % 256 == 0 and a CTA's rows fit its 200 KB of shared memory; x, w and out 16-byte aligned.
bool skinny_tc_fits(int m, int n, int k, int rows_per_cta);
// CTAs resident at once on this device for a reduction of k (0 when a CTA does not fit): a grid
// of n / rows_per_cta CTAs up to this runs in one wave.
int skinny_tc_ctas_per_wave(int k, int rows_per_cta);
void skinny_tc(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n,
               int k, int rows_per_cta, cudaStream_t stream);
// skinny_tc for a qkv projection followed by rope_store_kv's work, as skinny_gemm_rope.
bool skinny_tc_rope_fits(int m, int k, int rows_per_cta, const SkinnyRope& rope);
void skinny_tc_rope(__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                    int k, int rows_per_cta, const SkinnyRope& rope, cudaStream_t stream);

}  // namespace ernie::cuda
