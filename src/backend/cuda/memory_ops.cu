#include <algorithm>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/memory_ops.cuh"

namespace ernie::cuda {
namespace {

__global__ void gather_rows_kernel(uint32_t* out, const uint32_t* src, const int32_t* indices,
                                   int64_t words) {
  pdl_begin();
  const int64_t r = blockIdx.x;
  const uint32_t* s = src + indices[r] * words;
  uint32_t* o = out + r * words;
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) o[i] = s[i];
}

__global__ void feed_tokens_kernel(int32_t* tokens, const int32_t* feed, int n,
                                   const int32_t* ids) {
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
    tokens[feed[2 * j]] = ids[feed[2 * j + 1]];
  }
}

__device__ __forceinline__ uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ float random_value(int64_t i, bool uniform, float a, float b,
                                              uint64_t seed) {
  const uint64_t h = mix(seed ^ mix(static_cast<uint64_t>(i)));
  if (uniform) return a + (b - a) * static_cast<float>(h >> 40) * 0x1.0p-24f;
  // Irwin-Hall of four 16-bit uniforms, rescaled to unit variance.
  float s = 0.0f;
  for (int k = 0; k < 4; ++k) s += static_cast<float>((h >> (16 * k)) & 0xffff) * 0x1.0p-16f;
  return a + b * (s - 2.0f) * 1.7320508f;
}

template <typename T>
__global__ void fill_random_kernel(T* out, int64_t n, bool uniform, float a, float b,
                                   uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = random_value(i, uniform, a, b, seed);
    if constexpr (sizeof(T) == 2) {
      out[i] = __float2bfloat16(v);
    } else {
      out[i] = v;
    }
  }
}

template <typename T>
void fill(T* out, int64_t n, bool uniform, double a, double b, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 132 * 16);
  fill_random_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      out, n, uniform, static_cast<float>(a), static_cast<float>(b), seed);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void gather_rows(void* out, const void* src, const int32_t* indices, int n, int64_t row_bytes,
                 cudaStream_t stream) {
  if (n == 0) return;
  require(row_bytes % 4 == 0, "gather_rows: rows must be a multiple of 4 bytes");
  launch_pdl(gather_rows_kernel, n, 256, 0, stream, static_cast<uint32_t*>(out),
             static_cast<const uint32_t*>(src), indices, row_bytes / 4);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

void feed_tokens(int32_t* tokens, const int32_t* feed, int n, const int32_t* ids,
                 cudaStream_t stream) {
  if (n == 0) return;
  feed_tokens_kernel<<<(n + 255) / 256, 256, 0, stream>>>(tokens, feed, n, ids);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

void fill_random_bf16(__nv_bfloat16* out, int64_t n, bool uniform, double a, double b,
                      uint64_t seed, cudaStream_t stream) {
  fill(out, n, uniform, a, b, seed, stream);
}
void fill_random_f32(float* out, int64_t n, bool uniform, double a, double b, uint64_t seed,
                     cudaStream_t stream) {
  fill(out, n, uniform, a, b, seed, stream);
}

}  // namespace ernie::cuda
