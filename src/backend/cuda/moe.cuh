// The routed experts of an MoE block on the device, without a host round trip:
//   1. moe_align: count (token, choice) pairs per expert, pad each expert's list to a multiple
//      of the M-block rows, and write the pairs sorted by expert plus one expert id per M-block;
//   2. moe_gate_up: grouped GEMM over the M-blocks, rows gathered from x by pair, gate and up
//      columns of one tile side by side so SwiGLU happens in registers;
//   3. moe_down: grouped GEMM of the activations with each expert's down projection, the
//      routing weight applied in the epilogue;
//   4. moe_combine: each token's k rows summed in f32 (plus the shared experts' output).
// The launch grids are sized for the worst case, so nothing depends on the counts on the host.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "backend/cuda/expert_layout.h"

namespace ernie::cuda {

// 64-row blocks for 33-64 pairs an expert on average (the swapped kernel with 64 rows as N):
// on unless ERNIE_MOE_WIDE_SWAP=0 or ERNIE_MOE_SWAP_AB=0 (H100: steps 384, 448 and 512 x 1000
// -2.9%, -2.0% and -0.6 to -2.1%, docs/performance.md thirty-first round).
bool moe_wide_swap_enabled();

// 256-row blocks for the wgmma GEMMs instead of 128-row ones (256 x 192 tiles: a sixth fewer
// operand bytes into the multiprocessors at 8192 tokens): on only when ERNIE_WG_TALL=1 (not
// yet measured on a GPU).
bool moe_tall_enabled();

// Rows per M-block of the sorted layout: 16 while the average expert gets up to 8 rows, 32 up
// to 32 rows (decode: tiles that stream weights), 64 up to 64 (moe_wide_swap_enabled), else
// 128 (wgmma tiles fed by TMA, sm_90a), or 256 with moe_tall_enabled.
constexpr int kMoeBlockSmall = 16, kMoeBlockMid = 32, kMoeBlockWide = 64, kMoeBlockWgmma = 128;
constexpr int kMoeBlockTall = 256;
inline int moe_block_m(int64_t pairs, int experts) {
  if (pairs <= 8LL * experts) return kMoeBlockSmall;
  if (pairs <= 32LL * experts) return kMoeBlockMid;
  if (pairs <= 64LL * experts && moe_wide_swap_enabled()) return kMoeBlockWide;
  return moe_tall_enabled() ? kMoeBlockTall : kMoeBlockWgmma;
}

// Whether blocks of block_m rows run on the persistent wgmma GEMMs (prefill-sized batches).
inline bool moe_wgmma_block(int block_m) {
  return block_m == kMoeBlockWgmma || block_m == kMoeBlockTall;
}

// Rows of the sorted/padded layout for `pairs` = tokens * k pairs over `experts` experts: each
// expert that gets pairs pads at most block_m - 1 rows, and at most min(experts, pairs) do (a
// one-token step of the 21B model: 6 blocks of 16, not 61, so its GEMM grids hold no idle
// CTAs).
inline int64_t moe_capacity(int64_t pairs, int experts, int block_m) {
  const int64_t padded = std::min<int64_t>(experts, pairs);
  const int64_t rows = pairs + padded * (block_m - 1);
  return (rows + block_m - 1) / block_m * block_m;
}

// ids [pairs] (expert of each pair, pair = token * k + choice). Writes sorted_pairs [capacity]
// (-1 for padding), block_expert [capacity / block_m] (-1 past the last used block) and
// pair_pos [pairs] (row of each pair in the sorted layout). experts <= 1024. scratch: device
// memory of moe_align_scratch_bytes (null when that is 0: few pairs take one CTA).
// block_ready (capacity / block_m counters, or null): set to 0 for moe_gate_up and moe_down.
constexpr int kMoeAlignOneCta = 8192;
size_t moe_align_scratch_bytes(int pairs, int experts);
void moe_align(int32_t* sorted_pairs, int32_t* block_expert, int32_t* pair_pos, const int32_t* ids,
               int pairs, int experts, int block_m, void* scratch, cudaStream_t stream,
               int32_t* block_ready = nullptr);

// dst = src [rows, K] (row-major, ld elements from one row to the next; 0: K) in the tiled
// expert layout of expert_layout.h, rows x tiled_cols(K) elements (the padding columns zero).
// rows % 16 == 0, K % 8 == 0, ld % 8 == 0.
void tile_expert_weights(__nv_bfloat16* dst, const __nv_bfloat16* src, int64_t rows, int64_t K,
                         cudaStream_t stream, int64_t ld = 0);

// The tensor maps a fold reads the shared experts' weights through: gate_up over [2 I_s,
// hidden], down over [hidden, I_s] (row-major bf16), 16-row x 64-column boxes, 128-byte swizzle.
struct SharedFoldMaps {
  CUtensorMap gate_up, down;
};
SharedFoldMaps shared_fold_maps(const __nv_bfloat16* gate_up, const __nv_bfloat16* down,
                                int64_t hidden, int64_t shared_inter);

// Shared experts folded into the decode GEMMs (16- and 32-row blocks; not the wgmma path): a
// shared expert of intermediate size I_s = P * I_e is P extra experts of the routed experts'
// size that every token takes, read from the shared experts' own row-major tensors (the ones
// the unfolded path's cuBLAS GEMMs read; no second copy) by 2-D TMA boxes that land in shared
// memory as the tiled layout's groups do (`maps`: shared_fold_maps, host memory, copied into
// the kernels' parameters at launch); folded expert s is gate rows s I_e ..,
// up rows I_s + s I_e .. and down columns s I_e ... Their M-blocks come first in the grids,
// laid out by position (token t is row t of each one's blocks), so they need nothing from the
// router: with `early`, the gate/up kernel's folded CTAs start without waiting for the kernel
// before (the router's), which is right only if the kernels before gate/up let it launch once
// x is complete (route_topk's launch order). The values are those of the unfolded GEMMs up to
// summation order: gate and up are rounded to bf16 before SwiGLU, down writes its P partial
// sums in f32 (down_out, moe_shared_rows(...) x hidden floats), and moe_combine adds them up
// and rounds once. act and y hold moe_shared_rows(...) rows before the routed layout's (y's
// unused).
struct SharedFold {
  int experts = 0;  // P (0: nothing folded)
  int tokens = 0;
  bool early = false;
  float* down_out = nullptr;
  const SharedFoldMaps* maps = nullptr;
};
inline int64_t moe_shared_rows(const SharedFold& f, int block_m) {
  return static_cast<int64_t>(f.experts) * ((f.tokens + block_m - 1) / block_m) * block_m;
}

// Paired 32-row blocks: an expert of exactly two 32-row blocks (33-64 pairs) is taken by one
// CTA a column tile of the swapped kernel, its 64 rows as wgmma's N, so its weights stream
// once; every other block is computed as 32 rows and 32 empty ones. It pays where such experts
// are common: from kMoePairMinAverage pairs an expert on average (H100, steps: 224 x 1000
// -0.3%, 256 -0.8%, 320 -1.4%; 160 and 192 +0.1-0.2%, 128 +0.3%; docs/performance.md
// thirty-first round). moe_pair_blocks: whether a step of `pairs` pairs takes them (32-row
// blocks on the swapped kernel; ERNIE_MOE_PAIR_BLOCKS=0 turns them off); moe_gate_up and
// moe_down must be told the same.
constexpr int kMoePairMinAverage = 20;
bool moe_pair_blocks(int64_t pairs, int experts, int block_m);

// The forms of the swapped kernel (32- and 64-row blocks) a call takes; other kernels take no
// form. pair_blocks: the 32-row blocks paired (moe_pair_blocks; refused for other blocks and
// with a fold).
struct MoeSwapForm {
  bool pair_blocks = false;
};

// Paired blocks: what the CTAs of layout block b do, from the experts of blocks b - 2 .. b + 2
// (block_expert; -1 past either end and for padding blocks). An expert of exactly two blocks
// is a pair: its first block leads (computes both), its second follows (computes nothing).
// Blocks of experts of one block or of three and more are alone (compute themselves).
enum PairRole : int { kPairAlone, kPairLead, kPairFollower };
ERNIE_HOST_DEVICE PairRole pair_role(int prev2, int prev, int e, int next, int next2) {
  if (e < 0) return kPairAlone;
  if (prev != e && next == e && next2 != e) return kPairLead;
  if (prev == e && prev2 != e && next != e) return kPairFollower;
  return kPairAlone;
}

// act [capacity, inter] = silu(x_g W_gate^T) * (x_g W_up^T) per sorted row, x_g = x[pair / k]
// (gathered by the GEMM's loads); w_gate_up [E * 2 * inter, hidden] in the tiled layout (each
// expert's gate rows then its up rows). hidden % 8 == 0, inter % 16 == 0. With a fold (decode
// block sizes only), act has moe_shared_rows(fold, block_m) rows of the folded experts first,
// then the capacity rows of the routed layout. form: MoeSwapForm (moe_gate_up and moe_down of
// one layer take the same).
void moe_gate_up(__nv_bfloat16* act, const __nv_bfloat16* x, const __nv_bfloat16* w_gate_up,
                 const int32_t* sorted_pairs, const int32_t* block_expert, int64_t capacity,
                 int block_m, int k, int hidden, int inter, int experts, cudaStream_t stream,
                 const SharedFold& fold = {}, int32_t* block_ready = nullptr,
                 const MoeSwapForm& form = {});

// y [capacity, hidden] = weight[pair] * act W_down^T per sorted row; w_down [E * hidden, inter]
// in the tiled layout. inter % 8 == 0, hidden % 16 == 0. With a fold, act as moe_gate_up wrote
// it, y with moe_shared_rows(fold, block_m) rows first (unused), and fold.down_out written.
void moe_down(__nv_bfloat16* y, const __nv_bfloat16* act, const __nv_bfloat16* w_down,
              const float* weights, const int32_t* sorted_pairs, const int32_t* block_expert,
              int64_t capacity, int block_m, int hidden, int inter, int experts,
              cudaStream_t stream, const SharedFold& fold = {}, int32_t* block_ready = nullptr,
              const MoeSwapForm& form = {});

// block_ready for moe_gate_up and moe_down (32- and 64-row blocks, no fold; moe_align cleared
// it, and the same counters go to both, gate/up launched right before down on one stream):
// each down CTA waits for its own M-block's gate/up tiles rather than for the whole gate/up
// grid.
inline bool moe_block_ready_fits(int block_m, const SharedFold& fold) {
  return (block_m == kMoeBlockMid || block_m == kMoeBlockWide) && fold.experts == 0;
}

// The next layer's residual add and input norm, done by moe_combine when `normed` is set:
// residual += out; normed = rms_norm(residual) * weight, bit for bit as fused_add_rms_norm.
// normed may be the MoE's input x (every reader of x is done by then).
struct CombineNorm {
  __nv_bfloat16* normed = nullptr;
  __nv_bfloat16* residual = nullptr;
  const __nv_bfloat16* weight = nullptr;
  float eps = 0.0f;
};
inline bool moe_combine_norm_fits(int hidden) {
  return hidden > 0 && hidden % 8 == 0 && hidden / 8 <= 1024;
}

// out [tokens, hidden] = sum over the token's k rows of y (+ shared [tokens, hidden] if given).
// With a fold, the routed rows are at y + moe_shared_rows(fold, block_m) rows, and the shared
// experts' output (fold.down_out summed, rounded to bf16) is added after them. With
// norm.normed (moe_combine_norm_fits), then the norm of CombineNorm.
void moe_combine(__nv_bfloat16* out, const __nv_bfloat16* y, const int32_t* pair_pos,
                 const __nv_bfloat16* shared, int tokens, int k, int hidden, cudaStream_t stream,
                 const SharedFold& fold = {}, int block_m = 0, const CombineNorm& norm = {});

}  // namespace ernie::cuda
