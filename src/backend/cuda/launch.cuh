// Programmatic dependent launch (sm_90): a kernel launched with launch_pdl may start while the
// kernel before it on the stream is still finishing; it calls pdl_begin() first, which lets the
// kernel after it launch early in turn and then waits until the previous kernel has finished
// and its writes are visible. Across a decode step's few hundred small kernels this hides most
// of each launch's latency (the graph records the programmatic edges).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "backend/cuda/cuda_check.h"

namespace ernie::cuda {

// First statement of every kernel launched with launch_pdl: nothing before it may read what
// an earlier kernel wrote.
__device__ __forceinline__ void pdl_begin() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

// Ordered launch: a kernel whose dependents read, before their own wait, what the kernels
// before it wrote waits first and lets its dependents launch after (griddepcontrol.wait, then
// launch_dependents): they launch only once every kernel before it has finished, read such data
// through L2 (__ldcg), and wait as usual for what it writes itself. The MoE gate/up GEMM and the
// router's kernels for few tokens do this (moe.cu, router.cuh).

template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  ERNIE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// A plain launch (no early start) as clusters of `cluster` CTAs along x (grid % cluster == 0).
template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), unsigned grid, unsigned cluster, dim3 block,
                    size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  ERNIE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace ernie::cuda
