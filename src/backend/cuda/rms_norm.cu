#include "backend/cuda/cuda_check.h"
#include "backend/cuda/rms_norm.cuh"

namespace ernie::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) warp_sums[0] = v;
  }
  __syncthreads();
  return warp_sums[0];
}

// Mirrors the reference: the residual sum is rounded to bf16 (it is stored), the norm is
// computed in f32 from the stored values, cast to bf16, then multiplied by the weight.
__global__ void fused_add_rms_norm_kernel(__nv_bfloat16* out, __nv_bfloat16* residual,
                                          const __nv_bfloat16* x, const __nv_bfloat16* weight,
                                          int hidden, float eps) {
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
  const float inv = rsqrtf(block_sum(ss) / hidden + eps);
  __nv_bfloat16* o = out + row * hidden;
  for (int i = threadIdx.x; i < hidden; i += kThreads) {
    const __nv_bfloat16 n = __float2bfloat16(__bfloat162float(r[i]) * inv);
    o[i] = __float2bfloat16(__bfloat162float(n) * __bfloat162float(weight[i]));
  }
}

}  // namespace

void fused_add_rms_norm(__nv_bfloat16* out, __nv_bfloat16* residual, const __nv_bfloat16* x,
                        const __nv_bfloat16* weight, int rows, int hidden, float eps,
                        cudaStream_t stream) {
  if (rows == 0) return;
  require(rows > 0 && hidden > 0, "fused_add_rms_norm: bad shape");
  fused_add_rms_norm_kernel<<<rows, kThreads, 0, stream>>>(out, residual, x, weight, hidden, eps);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
