#include "backend/cuda/activation.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/launch.cuh"

namespace ernie::cuda {
namespace {

__device__ __forceinline__ float silu_times(float g, float u) {
  return g / (1.0f + __expf(-g)) * u;
}

// One row per blockIdx.y. kVec: 8 elements per thread through 16-byte loads and stores (inter
// a multiple of 8), else one.
template <bool kVec>
__global__ void silu_mul_kernel(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int inter) {
  pdl_begin();
  const size_t row = blockIdx.y;
  const __nv_bfloat16* g = gate_up + row * 2 * inter;
  const __nv_bfloat16* u = g + inter;
  const int stride = gridDim.x * blockDim.x;
  if constexpr (kVec) {
    for (int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8; i < inter; i += stride * 8) {
      const uint4 gv = *reinterpret_cast<const uint4*>(g + i);
      const uint4 uv = *reinterpret_cast<const uint4*>(u + i);
      const auto* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
      const auto* u2 = reinterpret_cast<const __nv_bfloat162*>(&uv);
      uint4 r;
      auto* r2 = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 a = __bfloat1622float2(g2[j]), b = __bfloat1622float2(u2[j]);
        r2[j] = __floats2bfloat162_rn(silu_times(a.x, b.x), silu_times(a.y, b.y));
      }
      *reinterpret_cast<uint4*>(out + row * inter + i) = r;
    }
  } else {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < inter; i += stride) {
      out[row * inter + i] =
          __float2bfloat16(silu_times(__bfloat162float(g[i]), __bfloat162float(u[i])));
    }
  }
}

}  // namespace

void silu_mul(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int rows, int inter,
              cudaStream_t stream) {
  if (rows == 0 || inter == 0) return;
  require(rows > 0 && inter > 0 && rows < 65536, "silu_mul: bad shape");
  const int threads = 256;
  if (inter % 8 == 0) {
    const dim3 grid((inter / 8 + threads - 1) / threads, rows);
    launch_pdl(silu_mul_kernel<true>, grid, threads, 0, stream, out, gate_up, inter);
  } else {
    const dim3 grid((inter + threads - 1) / threads, rows);
    launch_pdl(silu_mul_kernel<false>, grid, threads, 0, stream, out, gate_up, inter);
  }
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
