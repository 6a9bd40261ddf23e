#include <algorithm>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/rope.cuh"

namespace ernie::cuda {
namespace {

constexpr int kRopeThreads = 256;
constexpr int kMaxHalf = 256;  // head_dim up to 512

// Work items, per token: one per rotated (head, pair) of q and k, then one per pair of v's
// elements. Each thread takes one item of the flattened [tokens, items] range, so a decode step
// spreads over several CTAs instead of looping inside one. The inverse frequencies come from a
// shared table that the block's first head_dim / 2 threads compute.
__global__ void __launch_bounds__(kRopeThreads)
    rope_store_kv_kernel(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                         const int32_t* positions, const int64_t* slots, int64_t total, int heads,
                         int kv_heads, int head_dim, double theta) {
  pdl_begin();
  __shared__ float inv_freq[kMaxHalf];
  const int half = head_dim / 2;
  if (threadIdx.x < half) {
    // Same recipe as the CPU reference: inv_freq in double rounded to f32, angle in f32.
    inv_freq[threadIdx.x] =
        static_cast<float>(1.0 / pow(theta, static_cast<double>(2 * threadIdx.x) / head_dim));
  }
  __syncthreads();
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kRopeThreads + threadIdx.x;
  if (item >= total) return;
  const int rotated = (heads + kv_heads) * half, kv = kv_heads * head_dim;
  const int per_token = rotated + kv / 2;
  const int64_t t = item / per_token;
  const int i = static_cast<int>(item % per_token);
  const size_t row = static_cast<size_t>(heads + 2 * kv_heads) * head_dim;
  __nv_bfloat162* q = reinterpret_cast<__nv_bfloat162*>(qkv + t * row);
  __nv_bfloat162* k = q + heads * half;
  const int64_t slot = slots[t];
  __nv_bfloat162* kc = reinterpret_cast<__nv_bfloat162*>(k_cache + slot * kv);
  if (i >= rotated) {  // v: copied as is
    const int j = i - rotated;
    reinterpret_cast<__nv_bfloat162*>(v_cache + slot * kv)[j] = k[kv_heads * half + j];
    return;
  }
  const int h = i / half, j = i % half;
  float s, c;
  sincosf(static_cast<float>(positions[t]) * inv_freq[j], &s, &c);
  __nv_bfloat162* p = q + i;  // q then k, head-major: pair i of the rotated range
  const float2 ab = __bfloat1622float2(*p);
  const __nv_bfloat162 r = __floats2bfloat162_rn(ab.x * c - ab.y * s, ab.y * c + ab.x * s);
  *p = r;
  if (h >= heads) kc[i - heads * half] = r;
}

// rope_store_kv_vec: 16-byte pieces (four pairs) per thread; grid.y = token, grid.x over the
// token's pieces (q and k rotated, then v's copied). The inverse frequencies come from the
// table (no per-CTA pow in double), the token's position and slot are read once per CTA, and
// the index arithmetic is 32-bit (rope_store_kv divides a 64-bit item index by the pieces per
// token in every thread). The same f32 angle and rotation per pair as rope_store_kv.
// Rotates the four pairs of a 16-byte piece of q or k at `position`, with the inverse
// frequencies of the piece's place in its head (group `quad` of four in the table).
__device__ __forceinline__ void rotate_piece(uint4& v, int32_t position, const float* inv_freq,
                                             int quad) {
  const float pos = static_cast<float>(position);
  const float4 f = reinterpret_cast<const float4*>(inv_freq)[quad];
  const float freq[4] = {f.x, f.y, f.z, f.w};
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float sn, cs;
    sincosf(pos * freq[j], &sn, &cs);
    const float2 ab = __bfloat1622float2(p[j]);
    p[j] = __floats2bfloat162_rn(ab.x * cs - ab.y * sn, ab.y * cs + ab.x * sn);
  }
}

constexpr int kRopeVecThreads = 64;

__global__ void __launch_bounds__(kRopeVecThreads)
    rope_store_kv_vec_kernel(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                             const int32_t* positions, const int64_t* slots, const float* inv_freq,
                             int heads, int kv_heads, int head_dim) {
  pdl_begin();
  const int t = blockIdx.y;
  const int i = blockIdx.x * kRopeVecThreads + threadIdx.x;  // piece of 8 elements
  const int per_head = head_dim / 8, rotated = (heads + kv_heads) * per_head;
  if (i >= rotated + kv_heads * per_head) return;
  const size_t row = static_cast<size_t>(heads + 2 * kv_heads) * head_dim;
  const size_t kv = static_cast<size_t>(kv_heads) * head_dim;
  uint4* src = reinterpret_cast<uint4*>(qkv + t * row) + i;
  const int64_t slot = slots[t];
  if (i >= rotated) {  // v: copied as is
    reinterpret_cast<uint4*>(v_cache + slot * kv)[i - rotated] = *src;
    return;
  }
  uint4 v = *src;
  rotate_piece(v, positions[t], inv_freq, i % per_head);
  *src = v;
  if (i >= heads * per_head)
    reinterpret_cast<uint4*>(k_cache + slot * kv)[i - heads * per_head] = v;
}

// rope_store_kv_wide: the same pieces and the same arithmetic as rope_store_kv_vec, for many
// tokens: 256-thread CTAs over the (token, piece) items of the whole step, each thread taking
// kRopeWideItems items 256 apart and issuing all their loads (the piece, its token's position
// and slot) before the first rotation. rope_store_kv_vec's 64-thread CTA per seven pieces of a
// token makes 57,344 CTAs of one 16-byte load a thread at 8,192 tokens (70 us on an H200 for
// 118 MB: x2.6 of the bytes' time).
constexpr int kRopeWideThreads = 256, kRopeWideItems = 4;

__global__ void __launch_bounds__(kRopeWideThreads)
    rope_store_kv_wide_kernel(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                              const int32_t* positions, const int64_t* slots, const float* inv_freq,
                              int tokens, int heads, int kv_heads, int head_dim) {
  pdl_begin();
  const int per_head = head_dim / 8, rotated = (heads + kv_heads) * per_head;
  const int pieces = rotated + kv_heads * per_head;
  const int64_t items = static_cast<int64_t>(tokens) * pieces;
  const size_t row = static_cast<size_t>(heads + 2 * kv_heads) * head_dim;
  const size_t kv = static_cast<size_t>(kv_heads) * head_dim;
  constexpr int64_t kSpan = static_cast<int64_t>(kRopeWideThreads) * kRopeWideItems;
  for (int64_t base = blockIdx.x * kSpan + threadIdx.x; base < items;
       base += static_cast<int64_t>(gridDim.x) * kSpan) {
    uint4 v[kRopeWideItems];
    int t[kRopeWideItems], piece[kRopeWideItems], pos[kRopeWideItems];
    int64_t slot[kRopeWideItems];
#pragma unroll
    for (int u = 0; u < kRopeWideItems; ++u) {
      const int64_t idx = base + u * kRopeWideThreads;
      t[u] = -1;
      if (idx < items) {
        t[u] = static_cast<int>(idx / pieces);
        piece[u] = static_cast<int>(idx - static_cast<int64_t>(t[u]) * pieces);
        v[u] = reinterpret_cast<const uint4*>(qkv + t[u] * row)[piece[u]];
        slot[u] = slots[t[u]];
        pos[u] = positions[t[u]];
      }
    }
#pragma unroll
    for (int u = 0; u < kRopeWideItems; ++u) {
      if (t[u] < 0) continue;
      const int i = piece[u];
      if (i >= rotated) {  // v: copied as is
        reinterpret_cast<uint4*>(v_cache + slot[u] * kv)[i - rotated] = v[u];
        continue;
      }
      rotate_piece(v[u], pos[u], inv_freq, i % per_head);
      reinterpret_cast<uint4*>(qkv + t[u] * row)[i] = v[u];
      if (i >= heads * per_head) {
        reinterpret_cast<uint4*>(k_cache + slot[u] * kv)[i - heads * per_head] = v[u];
      }
    }
  }
}

}  // namespace

void rope_store_kv(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                   const int32_t* positions, const int64_t* slots, int tokens, int heads,
                   int kv_heads, int head_dim, double theta, cudaStream_t stream) {
  if (tokens == 0) return;
  require(tokens > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && head_dim % 2 == 0 &&
              head_dim / 2 <= kMaxHalf,
          "rope_store_kv: bad shape");
  const int64_t total =
      static_cast<int64_t>(tokens) * ((heads + kv_heads) * head_dim / 2 + kv_heads * head_dim / 2);
  const auto blocks = static_cast<unsigned>((total + kRopeThreads - 1) / kRopeThreads);
  launch_pdl(rope_store_kv_kernel, blocks, kRopeThreads, 0, stream, qkv, k_cache, v_cache,
             positions, slots, total, heads, kv_heads, head_dim, theta);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

void rope_store_kv_vec(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                       const int32_t* positions, const int64_t* slots, const float* inv_freq,
                       int tokens, int heads, int kv_heads, int head_dim, cudaStream_t stream) {
  if (tokens == 0) return;
  require(tokens > 0 && tokens <= 65535 && heads > 0 && kv_heads > 0 && head_dim % 8 == 0 &&
              inv_freq != nullptr,
          "rope_store_kv_vec: bad shape");
  const int pieces = (heads + 2 * kv_heads) * head_dim / 8;
  const dim3 grid((pieces + kRopeVecThreads - 1) / kRopeVecThreads, tokens);
  launch_pdl(rope_store_kv_vec_kernel, grid, kRopeVecThreads, 0, stream, qkv, k_cache, v_cache,
             positions, slots, inv_freq, heads, kv_heads, head_dim);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

void rope_store_kv_wide(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                        const int32_t* positions, const int64_t* slots, const float* inv_freq,
                        int tokens, int heads, int kv_heads, int head_dim, cudaStream_t stream) {
  if (tokens == 0) return;
  require(tokens > 0 && heads > 0 && kv_heads > 0 && head_dim % 8 == 0 && inv_freq != nullptr,
          "rope_store_kv_wide: bad shape");
  const int64_t items = static_cast<int64_t>(tokens) * (heads + 2 * kv_heads) * head_dim / 8;
  constexpr int64_t span = static_cast<int64_t>(kRopeWideThreads) * kRopeWideItems;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((items + span - 1) / span, 1 << 20));
  launch_pdl(rope_store_kv_wide_kernel, blocks, kRopeWideThreads, 0, stream, qkv, k_cache, v_cache,
             positions, slots, inv_freq, tokens, heads, kv_heads, head_dim);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
