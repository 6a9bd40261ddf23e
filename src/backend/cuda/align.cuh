// The MoE align step as a device function for one CTA of any size (device code only): used by
// moe_align_kernel and, for few tokens, at the end of the router kernel.
#pragma once

#include <cstdint>

namespace ernie::cuda {

// offsets[e] = start of expert e's segment, each segment `totals[e]` rounded up to whole
// blocks; offsets[experts] = rows used. Every lane of one warp calls it (a prefix sum over 32
// experts at a time, carried across the rounds).
__device__ inline void pad_segments(int* offsets, const int* totals, int experts, int block_m) {
  const int lane = threadIdx.x % 32;
  int carry = 0;
  for (int base = 0; base < experts; base += 32) {
    const int e = base + lane;
    const int padded = e < experts ? (totals[e] + block_m - 1) / block_m * block_m : 0;
    int incl = padded;  // inclusive prefix sum over the warp
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (e < experts) offsets[e] = carry + incl - padded;
    carry += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) offsets[experts] = carry;
}

// block_expert[b] = the expert whose segment holds block b (-1 past the used rows), by binary
// search over offsets [experts + 1]. Every thread of the CTA calls it.
__device__ inline void expert_of_blocks(int32_t* block_expert, const int* offsets, int experts,
                                        int block_m, int num_blocks) {
  const int used = offsets[experts];
  for (int b = threadIdx.x; b < num_blocks; b += blockDim.x) {
    const int row = b * block_m;
    int e = -1;
    if (row < used) {
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
}

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
  if (tid < 32) pad_segments(offsets, counts, experts, block_m);
  __syncthreads();
  expert_of_blocks(block_expert, offsets, experts, block_m, num_blocks);
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
