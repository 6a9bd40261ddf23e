#include "backend/cuda/cuda_check.h"
#include "backend/cuda/router.cuh"

namespace ernie::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float block_reduce(float v, bool is_max, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? scratch[lane] : (is_max ? -INFINITY : 0.0f);
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  return v;  // every lane of every warp holds the result
}

// One CTA per token: each warp computes the logits of experts warp, warp + 8, ...; then a
// block-wide softmax; then k rounds of a block-wide argmax over the biased scores.
__global__ void route_topk_kernel(int32_t* ids, float* weights, const __nv_bfloat16* x,
                                  const float* router, const float* bias, int hidden, int experts,
                                  int k, float norm_min) {
  extern __shared__ float smem[];
  float* p = smem;                 // [experts]
  float* scores = smem + experts;  // [experts]
  __shared__ float scratch[kThreads / 32];
  const size_t t = blockIdx.x;
  const __nv_bfloat16* xr = x + t * hidden;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int e = warp; e < experts; e += kThreads / 32) {
    const float* w = router + static_cast<size_t>(e) * hidden;
    float acc = 0.0f;
    for (int i = lane; i < hidden; i += 32) acc += __bfloat162float(xr[i]) * w[i];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) p[e] = acc;
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int e = threadIdx.x; e < experts; e += kThreads) mx = fmaxf(mx, p[e]);
  mx = block_reduce(mx, true, scratch);
  float sum = 0.0f;
  for (int e = threadIdx.x; e < experts; e += kThreads) {
    p[e] = expf(p[e] - mx);
    sum += p[e];
  }
  sum = block_reduce(sum, false, scratch);
  for (int e = threadIdx.x; e < experts; e += kThreads) {
    p[e] /= sum;
    scores[e] = p[e] + bias[e];
  }
  __syncthreads();
  float total = 0.0f;
  for (int r = 0; r < k; ++r) {
    // Argmax with the lower id winning ties: pack (score, -id) into a comparable pair.
    float best = -INFINITY;
    int best_id = experts;
    for (int e = threadIdx.x; e < experts; e += kThreads) {
      if (scores[e] > best || (scores[e] == best && e < best_id)) {
        best = scores[e];
        best_id = e;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (ob > best || (ob == best && oi < best_id)) {
        best = ob;
        best_id = oi;
      }
    }
    __shared__ float wb[kThreads / 32];
    __shared__ int wi[kThreads / 32];
    if (lane == 0) {
      wb[warp] = best;
      wi[warp] = best_id;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int id = wi[0];
      float b = wb[0];
      for (int w = 1; w < kThreads / 32; ++w) {
        if (wb[w] > b || (wb[w] == b && wi[w] < id)) {
          b = wb[w];
          id = wi[w];
        }
      }
      ids[t * k + r] = id;
      weights[t * k + r] = p[id];
      total += p[id];
      scores[id] = -INFINITY;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float denom = fmaxf(total, norm_min);
    for (int r = 0; r < k; ++r) weights[t * k + r] /= denom;
  }
}

}  // namespace

void route_topk(int32_t* ids, float* weights, const __nv_bfloat16* x, const float* router,
                const float* bias, int tokens, int hidden, int experts, int k, float norm_min,
                cudaStream_t stream) {
  if (tokens == 0) return;
  require(tokens > 0 && hidden > 0 && experts > 0 && experts <= 1024 && k > 0 && k <= experts,
          "route_topk: bad shape");
  const size_t smem = 2 * static_cast<size_t>(experts) * sizeof(float);
  route_topk_kernel<<<tokens, kThreads, smem, stream>>>(ids, weights, x, router, bias, hidden,
                                                        experts, k, norm_min);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
