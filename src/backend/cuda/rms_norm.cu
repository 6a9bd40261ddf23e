#include "backend/cuda/cuda_check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/norm_parts.cuh"
#include "backend/cuda/rms_norm.cuh"

namespace ernie::cuda {
namespace {

constexpr int kThreads = 256;

// Mirrors the reference: the residual sum is rounded to bf16 (it is stored), the norm is
// computed in f32 from the stored values, cast to bf16, then multiplied by the weight.
__global__ void fused_add_rms_norm_kernel(__nv_bfloat16* out, __nv_bfloat16* residual,
                                          const __nv_bfloat16* x, const __nv_bfloat16* weight,
                                          int hidden, float eps) {
  pdl_begin();
  const size_t row = blockIdx.x;
  __nv_bfloat16* r = residual + row * hidden;
  const __nv_bfloat16* xr = x ? x + row * hidden : nullptr;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += kThreads) {
    __nv_bfloat16 s = r[i];
    if (xr) {
      s = __float2bfloat16(__bfloat162float(s) + __bfloat162float(xr[i]));
      r[i] = s;
    }
    const float f = __bfloat162float(s);
    ss += f * f;
  }
  const float inv = rsqrtf(norm_block_sum(ss) / hidden + eps);
  __nv_bfloat16* o = out + row * hidden;
  for (int i = threadIdx.x; i < hidden; i += kThreads) {
    const __nv_bfloat16 n = __float2bfloat16(__bfloat162float(r[i]) * inv);
    o[i] = __float2bfloat16(__bfloat162float(n) * __bfloat162float(weight[i]));
  }
}

// The same for hidden % 8 == 0 and hidden / 8 <= kVec * blockDim.x: each thread keeps up to kVec
// 16-byte vectors of the row in registers, so the row is read once and every load is 16 bytes.
constexpr int kVec = 4;
__global__ void fused_add_rms_norm_vec_kernel(__nv_bfloat16* out, __nv_bfloat16* residual,
                                              const __nv_bfloat16* x, const __nv_bfloat16* weight,
                                              int hidden, float eps) {
  pdl_begin();
  const size_t row = blockIdx.x;
  const int vecs = hidden / 8;
  uint4* r = reinterpret_cast<uint4*>(residual + row * hidden);
  const uint4* xr = x ? reinterpret_cast<const uint4*>(x + row * hidden) : nullptr;
  uint4 v[kVec];
  float ss = 0.0f;
#pragma unroll
  for (int u = 0; u < kVec; ++u) {
    const int i = threadIdx.x + u * blockDim.x;
    if (i >= vecs) break;
    v[u] = r[i];
    if (xr) {
      add_vec8(v[u], xr[i]);
      r[i] = v[u];
    }
    ss = squares_vec8(v[u], ss);
  }
  const float inv = rsqrtf(norm_block_sum(ss) / hidden + eps);
  uint4* o = reinterpret_cast<uint4*>(out + row * hidden);
  const uint4* wv = reinterpret_cast<const uint4*>(weight);
#pragma unroll
  for (int u = 0; u < kVec; ++u) {
    const int i = threadIdx.x + u * blockDim.x;
    if (i >= vecs) break;
    o[i] = norm_vec8(v[u], inv, wv[i]);
  }
}

}  // namespace

void fused_add_rms_norm(__nv_bfloat16* out, __nv_bfloat16* residual, const __nv_bfloat16* x,
                        const __nv_bfloat16* weight, int rows, int hidden, float eps,
                        cudaStream_t stream) {
  if (rows == 0) return;
  require(rows > 0 && hidden > 0, "fused_add_rms_norm: bad shape");
  const int vecs = hidden / 8;
  if (hidden % 8 == 0 && vecs <= kVec * 1024) {
    // Enough threads that each holds at most kVec vectors; whole warps.
    const int per_thread = (vecs + 1023) / 1024;
    const int threads = ((vecs + per_thread - 1) / per_thread + 31) / 32 * 32;
    launch_pdl(fused_add_rms_norm_vec_kernel, rows, threads, 0, stream, out, residual, x, weight,
               hidden, eps);
  } else {
    launch_pdl(fused_add_rms_norm_kernel, rows, kThreads, 0, stream, out, residual, x, weight,
               hidden, eps);
  }
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
