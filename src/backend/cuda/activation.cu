#include "backend/cuda/activation.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/launch.cuh"

namespace ernie::cuda {
namespace {

__global__ void silu_mul_kernel(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int inter) {
  pdl_begin();
  const size_t row = blockIdx.y;
  const __nv_bfloat16* g = gate_up + row * 2 * inter;
  const __nv_bfloat16* u = g + inter;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < inter; i += gridDim.x * blockDim.x) {
    const float gv = __bfloat162float(g[i]);
    out[row * inter + i] = __float2bfloat16(gv / (1.0f + __expf(-gv)) * __bfloat162float(u[i]));
  }
}

}  // namespace

void silu_mul(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int rows, int inter,
              cudaStream_t stream) {
  if (rows == 0 || inter == 0) return;
  require(rows > 0 && inter > 0 && rows < 65536, "silu_mul: bad shape");
  const int threads = 256;
  const dim3 grid((inter + threads - 1) / threads, rows);
  launch_pdl(silu_mul_kernel, grid, threads, 0, stream, out, gate_up, inter);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
