// Pieces of the fused residual add + RMSNorm: the norm kernels (rms_norm.cu) and the MoE
// combine that ends with the next layer's norm (moe.cu) both use them, so they compute the same
// bits (CudaBackendTest.MoeNormFusedMatchesSeparate). Device code only.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace ernie::cuda {

// Sum over the block (any multiple of 32 threads up to 1024). Every thread gets it.
__device__ inline float norm_block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < warps ? warp_sums[lane] : 0.0f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) warp_sums[0] = v;
  }
  __syncthreads();
  return warp_sums[0];
}

// Eight residual values += eight of x, each sum rounded to bf16 (it is stored).
__device__ inline void add_vec8(uint4& residual, const uint4& x) {
  __nv_bfloat162* s = reinterpret_cast<__nv_bfloat162*>(&residual);
  const __nv_bfloat162* d = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 a = __bfloat1622float2(s[q]), b = __bfloat1622float2(d[q]);
    s[q] = __floats2bfloat162_rn(a.x + b.x, a.y + b.y);
  }
}

// The sum of squares of eight bf16 values, in a fixed order.
__device__ inline float squares_vec8(const uint4& v, float ss) {
  const __nv_bfloat162* s = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = __bfloat1622float2(s[q]);
    ss += f.x * f.x + f.y * f.y;
  }
  return ss;
}

// bf16(bf16(v * inv) * weight) for eight values.
__device__ inline uint4 norm_vec8(const uint4& v, float inv, const uint4& weight) {
  const __nv_bfloat162* s = reinterpret_cast<const __nv_bfloat162*>(&v);
  const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&weight);
  uint4 res;
  __nv_bfloat162* rh = reinterpret_cast<__nv_bfloat162*>(&res);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = __bfloat1622float2(s[q]), g = __bfloat1622float2(wh[q]);
    const float2 n = __bfloat1622float2(__floats2bfloat162_rn(f.x * inv, f.y * inv));
    rh[q] = __floats2bfloat162_rn(n.x * g.x, n.y * g.y);
  }
  return res;
}

}  // namespace ernie::cuda
