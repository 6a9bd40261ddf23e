// The MoE align step as a device function for one CTA of any size (device code only): used by
// moe_align_kernel and, for few tokens, at the end of the router kernel.
#pragma once

#include <cstdint>

namespace ernie::cuda {

// ids [pairs] (expert of each pair). Writes sorted_pairs [num_blocks * block_m] (-1 for
// padding), block_expert [num_blocks] (-1 past the last used block) and pair_pos [pairs].
// counts [experts] and offsets [experts + 1] are shared-memory scratch. Every thread of the CTA
// calls it.
__device__ inline void align_pairs(int32_t* sorted_pairs, int32_t* block_expert, int32_t* pair_pos,
                                   const int32_t* ids, int pairs, int experts, int block_m,
                                   int num_blocks, int* counts, int* offsets) {
  const int tid = threadIdx.x, step = blockDim.x;
  for (int e = tid; e < experts; e += step) counts[e] = 0;
  __syncthreads();
  for (int i = tid; i < pairs; i += step) atomicAdd(&counts[ids[i]], 1);
  __syncthreads();
  if (tid == 0) {
    int off = 0;
    for (int e = 0; e < experts; ++e) {
      offsets[e] = off;
      off += (counts[e] + block_m - 1) / block_m * block_m;
    }
    offsets[experts] = off;
  }
  __syncthreads();
  const int used = offsets[experts];
  for (int b = tid; b < num_blocks; b += step) {
    const int row = b * block_m;
    int e = -1;
    if (row < used) {  // the expert whose segment holds this row (binary search)
      int lo = 0, hi = experts - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= row)
          lo = mid;
        else
          hi = mid - 1;
      }
      e = lo;
    }
    block_expert[b] = e;
  }
  for (int r = tid; r < num_blocks * block_m; r += step) sorted_pairs[r] = -1;
  __syncthreads();
  for (int e = tid; e < experts; e += step) counts[e] = 0;
  __syncthreads();
  // The order inside an expert's segment does not matter: every row is computed on its own.
  for (int i = tid; i < pairs; i += step) {
    const int e = ids[i];
    const int pos = offsets[e] + atomicAdd(&counts[e], 1);
    sorted_pairs[pos] = i;
    pair_pos[i] = pos;
  }
}

}  // namespace ernie::cuda
