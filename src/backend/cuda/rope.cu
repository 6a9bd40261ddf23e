#include "backend/cuda/cuda_check.h"
#include "backend/cuda/rope.cuh"

namespace ernie::cuda {
namespace {

// One block per token; threads stride over (head, pair) for q and k, then over v's elements.
__global__ void rope_store_kv_kernel(__nv_bfloat16* qkv, __nv_bfloat16* k_cache,
                                     __nv_bfloat16* v_cache, const int32_t* positions,
                                     const int64_t* slots, int heads, int kv_heads, int head_dim,
                                     double theta) {
  const int t = blockIdx.x;
  const int half = head_dim / 2;
  const size_t row = static_cast<size_t>(heads + 2 * kv_heads) * head_dim;
  __nv_bfloat16* q = qkv + t * row;
  __nv_bfloat16* k = q + static_cast<size_t>(heads) * head_dim;
  const __nv_bfloat16* v = k + static_cast<size_t>(kv_heads) * head_dim;
  const float pos = static_cast<float>(positions[t]);
  const int64_t slot = slots[t];
  const size_t kv = static_cast<size_t>(kv_heads) * head_dim;
  for (int idx = threadIdx.x; idx < (heads + kv_heads) * half; idx += blockDim.x) {
    const int h = idx / half, j = idx % half;
    // Same recipe as the CPU reference: inv_freq in double rounded to f32, angle in f32.
    const float inv_freq =
        static_cast<float>(1.0 / pow(theta, static_cast<double>(2 * j) / head_dim));
    float s, c;
    sincosf(pos * inv_freq, &s, &c);
    __nv_bfloat16* p = (h < heads ? q + static_cast<size_t>(h) * head_dim
                                  : k + static_cast<size_t>(h - heads) * head_dim) +
                       2 * j;
    const float a = __bfloat162float(p[0]), b = __bfloat162float(p[1]);
    const __nv_bfloat16 ra = __float2bfloat16(a * c - b * s), rb = __float2bfloat16(b * c + a * s);
    p[0] = ra;
    p[1] = rb;
    if (h >= heads) {
      __nv_bfloat16* dst = k_cache + slot * kv + static_cast<size_t>(h - heads) * head_dim + 2 * j;
      dst[0] = ra;
      dst[1] = rb;
    }
  }
  for (int i = threadIdx.x; i < static_cast<int>(kv); i += blockDim.x)
    v_cache[slot * kv + i] = v[i];
}

}  // namespace

void rope_store_kv(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                   const int32_t* positions, const int64_t* slots, int tokens, int heads,
                   int kv_heads, int head_dim, double theta, cudaStream_t stream) {
  if (tokens == 0) return;
  require(tokens > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && head_dim % 2 == 0,
          "rope_store_kv: bad shape");
  rope_store_kv_kernel<<<tokens, 128, 0, stream>>>(qkv, k_cache, v_cache, positions, slots, heads,
                                                   kv_heads, head_dim, theta);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
