// One token's top-k by one warp, as the router computes it (router.cu).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace ernie::cuda {
namespace {

// Where a token's logits are: the sum, in split order, of `splits` partial sums, token t's
// partial s of expert e at data[t * token_stride + s * split_stride + e].
struct Partials {
  const float* data;
  size_t token_stride, split_stride;
  int splits;
  // [splits][tokens][experts] (the tensor-core logits kernel's split reduction).
  static __host__ __device__ Partials split_major(const float* data, int tokens, int experts,
                                                  int splits) {
    return {data, static_cast<size_t>(experts), static_cast<size_t>(tokens) * experts, splits};
  }
  // [tokens][splits][experts] (one GEMM of x with the router's stacked bf16 terms).
  static __host__ __device__ Partials token_major(const float* data, int experts, int splits) {
    return {data, static_cast<size_t>(splits) * experts, static_cast<size_t>(experts), splits};
  }
};

// Token t's probabilities by one warp: logits = the partials summed in order, then softmax into
// p [experts] and the biased scores into p + experts (shared memory of this warp). Partials are
// read through L2 (another CTA may have written them).
__device__ __forceinline__ void token_softmax(int t, const Partials& part, const float* bias,
                                              int experts, float* p) {
  const int lane = threadIdx.x % 32;
  float* scores = p + experts;
  float mx = -INFINITY;
  const size_t split_stride = part.split_stride;
  const int splits = part.splits;
  for (int e = lane; e < experts; e += 32) {
    // The splits in order, their loads issued eight at a time (one L2 round trip per eight
    // rather than per split; the sum is the same).
    const float* src = part.data + static_cast<size_t>(t) * part.token_stride + e;
    float v = 0.0f;
    int s = 0;
    for (; s + 8 <= splits; s += 8) {
      float eight[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) eight[j] = __ldcg(src + (s + j) * split_stride);
#pragma unroll
      for (int j = 0; j < 8; ++j) v += eight[j];
    }
    for (; s < splits; ++s) v += __ldcg(src + s * split_stride);
    p[e] = v;
    mx = fmaxf(mx, v);
  }
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.0f;
  for (int e = lane; e < experts; e += 32) {
    p[e] = expf(p[e] - mx);
    sum += p[e];
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  for (int e = lane; e < experts; e += 32) {
    p[e] /= sum;
    scores[e] = p[e] + bias[e];
  }
  __syncwarp();
}

// A float's order as an int (finite values; -0 taken as +0, as float comparison does).
__device__ __forceinline__ int order_key(float f) {
  int b = __float_as_int(f);
  if (b == static_cast<int>(0x80000000u)) b = 0;
  return b ^ ((b >> 31) & 0x7fffffff);
}

// Token t by one warp: token_softmax, then k rounds of a warp-wide argmax over the biased scores
// (the lower id wins a tie). p: 2 * experts floats of shared memory for this warp. ids_copy
// (optional, e.g. shared memory): the ids written there too. lean (k <= 32): lane r keeps the
// r-th pick and its probability in registers and stores its id and weight once at the end,
// instead of lane 0 storing each pick and then every weight being read back from global memory
// to be divided (the same values). redux (when every score is finite): each round's argmax by
// two warp reductions in hardware (the largest score as an ordered int, then the lowest id
// holding it) instead of five rounds of paired shuffles: the same picks in far fewer
// instructions, which is what the fused tail's CTA pays for beside the GEMM CTAs sharing its
// multiprocessor.
__device__ void topk_token(int t, int32_t* ids, float* weights, const Partials& part,
                           const float* bias, int experts, int k, float norm_min, float* p,
                           int32_t* ids_copy = nullptr, bool lean = false, bool redux = false) {
  token_softmax(t, part, bias, experts, p);
  const int lane = threadIdx.x % 32;
  float* scores = p + experts;
  const bool once = lean && k <= 32;
  // Non-finite scores (NaN logits) keep the shuffles, whose rules they follow.
  bool finite = true;
  if (redux) {
    for (int e = lane; e < experts; e += 32) finite = finite && isfinite(scores[e]);
  }
  const bool use_redux = redux && __all_sync(0xffffffffu, finite);
  int my_id = 0;
  float my_p = 0.0f;
  float total = 0.0f;
  for (int r = 0; r < k; ++r) {
    int best_id = experts;
    if (use_redux) {
      // Picked experts hold -inf, below every finite score: with k <= experts a finite one is
      // left every round, so the maximum is always a score the shuffles would pick.
      int best_key = INT_MIN;
      for (int e = lane; e < experts; e += 32) {
        const int key = order_key(scores[e]);
        if (key > best_key) {  // ascending e: a later equal score never replaces
          best_key = key;
          best_id = e;
        }
      }
      const int top = __reduce_max_sync(0xffffffffu, best_key);
      best_id = static_cast<int>(__reduce_min_sync(
          0xffffffffu, best_key == top ? static_cast<unsigned>(best_id) : 0xffffffffu));
    } else {
      float best = -INFINITY;
      for (int e = lane; e < experts; e += 32) {
        if (scores[e] > best) {  // ascending e: a later equal score never replaces
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
      if (best_id >= experts) best_id = 0;  // only NaN logits leave nothing above -inf
    }
    total += p[best_id];
    if (once) {
      if (lane == r) {
        my_id = best_id;
        my_p = p[best_id];
      }
      if (lane == 0 && ids_copy != nullptr) ids_copy[static_cast<size_t>(t) * k + r] = best_id;
    } else if (lane == 0) {
      ids[static_cast<size_t>(t) * k + r] = best_id;
      if (ids_copy != nullptr) ids_copy[static_cast<size_t>(t) * k + r] = best_id;
      weights[static_cast<size_t>(t) * k + r] = p[best_id];
    }
    if (best_id % 32 == lane) scores[best_id] = -INFINITY;
    __syncwarp();
  }
  const float denom = fmaxf(total, norm_min);
  if (once) {
    if (lane < k) {
      ids[static_cast<size_t>(t) * k + lane] = my_id;
      weights[static_cast<size_t>(t) * k + lane] = my_p / denom;
    }
    __syncwarp();
    return;
  }
  __syncwarp();
  for (int r = lane; r < k; r += 32) weights[static_cast<size_t>(t) * k + r] /= denom;
  __syncwarp();
}

}  // namespace
}  // namespace ernie::cuda
