#include <algorithm>

#include "backend/cuda/align.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/expert_layout.h"
#include "backend/cuda/hopper.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/moe.cuh"
#include "backend/cuda/norm_parts.cuh"
#include "backend/cuda/switches.h"

namespace ernie::cuda {
namespace {

constexpr int kAlignThreads = 1024;

// block_ready (null: none): the M-blocks' readiness counters of the GEMMs after it
// (BlockReady), set to 0.
__device__ __forceinline__ void clear_block_ready(int32_t* block_ready, int num_blocks) {
  if (block_ready == nullptr) return;
  for (int b = threadIdx.x; b < num_blocks; b += blockDim.x) block_ready[b] = 0;
}

__global__ void moe_align_kernel(int32_t* sorted_pairs, int32_t* block_expert, int32_t* pair_pos,
                                 int32_t* block_ready, const int32_t* ids, int pairs, int experts,
                                 int block_m, int num_blocks) {
  pdl_begin();
  __shared__ int counts[1024];
  __shared__ int offsets[1025];
  clear_block_ready(block_ready, num_blocks);
  align_pairs(sorted_pairs, block_expert, pair_pos, ids, pairs, experts, block_m, num_blocks,
              counts, offsets);
}

// Many pairs (a prefill chunk): the align over many CTAs in three launches, chunks of
// kAlignChunk pairs per CTA. One CTA on shared atomics took 83 us for the 49152 pairs of an
// 8192-token step. Device scratch: the per-chunk counts [chunks][experts], then the segment
// starts [experts + 1].
constexpr int kAlignChunk = 2048, kAlignSpreadThreads = 256;

int align_chunks(int pairs) {
  return (pairs + kAlignChunk - 1) / kAlignChunk;
}

// Chunk b's pairs counted per expert into counts[b][e]; the CTAs also fill sorted_pairs with -1.
__global__ void moe_align_count_kernel(int32_t* counts, int32_t* sorted_pairs, int64_t capacity,
                                       const int32_t* ids, int pairs, int experts) {
  pdl_begin();
  __shared__ int hist[1024];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int lo = blockIdx.x * kAlignChunk, hi = min(pairs, lo + kAlignChunk);
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) atomicAdd(&hist[ids[i]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    counts[static_cast<size_t>(blockIdx.x) * experts + e] = hist[e];
  }
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < capacity;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sorted_pairs[r] = -1;
  }
}

// One CTA: counts[b][e] becomes chunk b's first row inside expert e's segment, segments [experts
// + 1] the padded segment starts, and block_expert is written.
__global__ void moe_align_offsets_kernel(int32_t* counts, int32_t* segments, int32_t* block_expert,
                                         int32_t* block_ready, int chunks, int experts, int block_m,
                                         int num_blocks) {
  pdl_begin();
  clear_block_ready(block_ready, num_blocks);
  __shared__ int totals[1024];
  __shared__ int offsets[1025];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    int run = 0;
    for (int b = 0; b < chunks; ++b) {
      const int n = counts[static_cast<size_t>(b) * experts + e];
      counts[static_cast<size_t>(b) * experts + e] = run;
      run += n;
    }
    totals[e] = run;
  }
  __syncthreads();
  if (threadIdx.x < 32) pad_segments(offsets, totals, experts, block_m);
  __syncthreads();
  for (int e = threadIdx.x; e <= experts; e += blockDim.x) segments[e] = offsets[e];
  expert_of_blocks(block_expert, offsets, experts, block_m, num_blocks);
}

// Chunk b's pairs placed after the rows of the chunks before it in each expert's segment.
__global__ void moe_align_place_kernel(int32_t* sorted_pairs, int32_t* pair_pos,
                                       const int32_t* starts, const int32_t* segments,
                                       const int32_t* ids, int pairs, int experts) {
  pdl_begin();
  __shared__ int next[1024];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    next[e] = segments[e] + starts[static_cast<size_t>(blockIdx.x) * experts + e];
  }
  __syncthreads();
  const int lo = blockIdx.x * kAlignChunk, hi = min(pairs, lo + kAlignChunk);
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const int pos = atomicAdd(&next[ids[i]], 1);
    sorted_pairs[pos] = i;
    pair_pos[i] = pos;
  }
}

// Tiles of the decode GEMM: BM (16 or 32) rows x BN weight rows per CTA, a warp per BM x 16,
// 128 of the reduction per stage. A decode step streams weights and nothing else, and its rate
// is set by the bytes in flight, by how evenly they spread over the SMs, and by how long a
// contiguous run one copy reads: 256 bytes of each weight row per stage took 1.5-2% less than
// 128 (H100, cp.async); 2-D TMA boxes of those runs took 2-8% less than cp.async, and one 4 KB
// bulk copy per 16-row group of the tiled layout another 2-3% less at 16-64 sequences (H200;
// the 32-row tiles of a 256-sequence step did not move):
// - 16-row blocks (up to 8 pairs per expert): 32 weight rows per CTA (two warps), 5 stages
//   (65 KB: three CTAs per SM), twice the CTAs of 64-row tiles (a one-token step touches only 6
//   experts: 576 CTAs instead of 288 for 132 SMs). Measured against 64-row tiles: the routed
//   GEMMs of one token 0.066 -> 0.063 ms, the layer at 16 and 64 tokens ~1% faster.
// - 32-row blocks (8-32 pairs per expert): 64 weight rows (four warps), 4 stages (104 KB: two
//   CTAs per SM). Each M-block reads its expert's weights again (from L2 when they are still
//   there), so 32-row blocks take over once experts get more than 8 rows on average.
// (64-row mma.sync tiles for mid-sized batches measured slower than the wgmma kernel at 512
// tokens: 1.01 vs 0.67 ms for the 21B layer.)
// - kWide (16-row blocks): 64 weight rows per CTA, 3 stages (65 KB, three CTAs per SM), for
//   grids that then fit in one wave: a one-token step's 6 experts are 288 CTAs of gate/up
//   rather than 576 (1.45 waves of 32-row tiles, where the second wave streams slower). Step
//   1 x 1000 3.563 -> 3.52 ms, the one-token MoE layer 0.094 -> 0.091 ms.
// - kLean (the default; ERNIE_MOE_LEAN=0 turns it off): one stage fewer (16-row: 4, 51 KB,
//   four CTAs per SM; 32-row: 3, 75 KB, three CTAs per SM), the same bytes in flight per SM
//   spread over more CTAs, so that one CTA's start and end (its first copies issued only after
//   its expert id is read, no copies in flight while it stores) leave a smaller share of the SM
//   idle. H200: the 256-token MoE layer 0.461 -> 0.444 ms (step 256 x 1000 -1 to -3%), 16 and
//   64 tokens -0.4 to -0.6%. (A persistent form, its CTAs walking tiles with the stage ring
//   running on from one tile into the next, was slower either way: tiles dealt round-robin,
//   the 256-token layer 0.493 -> 0.524 ms; taken from a global counter, 0.460 -> 0.572.)
template <int BM, bool kWide = false, bool kLean = false>
struct Tile {
  static_assert(BM == kMoeBlockSmall || BM == kMoeBlockMid);
  static_assert(!kWide || BM == kMoeBlockSmall);
  static_assert(!kWide || !kLean);
  static constexpr int kBN = BM == kMoeBlockSmall && !kWide ? 32 : 64;
  static constexpr int kBK = 128;
  static constexpr int kStages = (kWide ? 3 : BM == kMoeBlockSmall ? 5 : 4) - (kLean ? 1 : 0);
  static constexpr int kLd = kBK + 8;  // padded activation rows: conflict-free fragment reads
  static constexpr int kWarpsM = 1, kWarpsN = kBN / 16;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kMt = BM / (16 * kWarpsM);  // m16 tiles per warp
  static constexpr int kNt = kBN / (8 * kWarpsN);  // n8 tiles per warp (a gate and an up one)
  static constexpr int kChunks = kBK / 8;          // 16-byte chunks per row and stage
  static constexpr int kALoads = BM * kChunks / kThreads;
  // A stage's weights: kBN / 16 groups of the tiled layout, each two 64-column chunks of 16 rows
  // x 128 bytes (4 KB, one bulk copy), swizzled as stored.
  static constexpr int kGroups = kBN / kTiledGroupRows;
  static constexpr int kGroupStage = kTiledGroupRows * kBK * 2;
  static constexpr int kBStage = kBN * kBK * 2;
  static constexpr int kAStage = BM * kLd * 2;
  static constexpr size_t kSmem = static_cast<size_t>(kStages) * (kBStage + kAStage) + 1024;
};

// The folded shared experts (SharedFold) as the decode GEMM kernel sees them: P experts of the
// routed experts' size, blocks_per_expert M-blocks each (rows of both GEMMs' outputs numbered
// over the grid: expert s's row of token t is s * blocks_per_expert * BM + t), their weights
// read through `map` (this GEMM's tensor map of the shared experts' row-major tensor); down
// writes them unrounded (f32) to down_out, for moe_combine to add up and round as the unfolded
// shared experts' GEMM would. A kernel parameter (__grid_constant__: TMA reads the map where
// the parameter lives).
struct FoldArgs {
  CUtensorMap map{};
  int experts = 0;  // P
  int blocks = 0;   // their M-blocks, first in the grid
  int blocks_per_expert = 1;
  int tokens = 0;
  bool early = false;         // their gate/up blocks do not wait for the kernel before
  float* down_out = nullptr;  // [blocks * BM, N]
};

FoldArgs fold_args(const SharedFold& f, int block_m, bool gate_up) {
  FoldArgs a;
  if (f.experts == 0) return a;
  require(f.maps != nullptr, "MoE GEMM: folded shared experts need their tensor maps");
  a.map = gate_up ? f.maps->gate_up : f.maps->down;
  a.experts = f.experts;
  a.blocks_per_expert = (f.tokens + block_m - 1) / block_m;
  a.blocks = f.experts * a.blocks_per_expert;
  a.tokens = f.tokens;
  a.early = f.early;
  a.down_out = f.down_out;
  return a;
}

// Readiness of the M-blocks between the 32-row gate/up and down GEMMs (null counters: none).
// Each gate/up CTA adds 1 to its M-block's counter once its SwiGLU rows are stored; a down CTA
// waits (thread 0 polls with acquire loads) until its M-block's counter reaches `target` (the
// gate/up grid's column tiles) instead of waiting for the whole gate/up grid, so down CTAs that
// take multiprocessors during gate/up's last wave start at once. Both grids then run M-block
// major (blockIdx.x the column tile), so the M-blocks complete in order. The align kernel sets
// the counters to 0; down launches only after every gate/up CTA has started (launch.cuh's
// ordered launch), so no down CTA can hold a multiprocessor that a gate/up CTA it waits for
// still needs.
struct BlockReady {
  int32_t* counters = nullptr;  // [M-blocks]
  int target = 0;
};

// Down's wait for its activation rows before its first load of them (every thread calls it,
// tid its index in the CTA; block_major: ready has counters):
// with readiness counters thread 0 waits until M-block mb's reaches the target and the CTA
// passes a barrier after it; otherwise the wait for the kernel before (gate/up) to finish.
__device__ __forceinline__ void wait_for_rows(BlockReady ready, bool block_major, int mb, int tid) {
  if (block_major) {
    if (tid == 0) {
      while (ld_acquire_gpu(ready.counters + mb) < ready.target) __nanosleep(64);
    }
    __syncthreads();
  } else {
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
}

// A stage of a tile's weight groups (gate/up: the gate rows' groups, then the up rows'), 16
// rows each in the tiled layout, by one bulk copy per group completing on `bar`; groups past
// the expert's N rows stay unread (their output columns are not stored). One thread issues
// the copies (computing the addresses there keeps the other threads' registers free).
template <typename T, bool kGateUp>
__device__ __forceinline__ void load_weight_stage(unsigned char* dst, uint64_t* bar,
                                                  const __nv_bfloat16* w, int e, int n0, int kt,
                                                  int K, int N) {
  constexpr int kGroups = T::kGroups;
  constexpr int kPart = kGateUp ? kGroups / 2 : kGroups;  // groups per gate or up part
  const int64_t kp = tiled_cols(K);
  const __nv_bfloat16* src = w + (static_cast<int64_t>(e) * (kGateUp ? 2 * N : N) + n0) * kp +
                             kt * kTiledGroupRows * T::kBK;
  const int part_groups = min(kPart, (N - n0) / kTiledGroupRows);  // N % 16 == 0
  mbar_arrive_expect_tx(bar, (kGroups / kPart) * part_groups * T::kGroupStage);
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    if (j % kPart < part_groups) {
      const int64_t row = (j >= kPart ? N : 0) + (j % kPart) * kTiledGroupRows;
      bulk_load(dst + j * T::kGroupStage, src + row * kp, T::kGroupStage, bar);
    }
  }
}

// The same stage for folded shared expert s, from the shared experts' row-major tensor by two
// 2-D TMA boxes (64 columns x 16 rows, 128-byte swizzle) per group, which land as the tiled
// layout's two chunks of the group: gate/up rows s N + n (gate) and P N + s N + n (up) of
// [2 P N, K]; down rows n of [N, P K] from column s K. Columns past the tensor's end read as
// zeros; past expert s's K columns of down (K % 128 != 0) they are expert s + 1's, multiplied
// by the zero-filled activations.
template <typename T, bool kGateUp>
__device__ __forceinline__ void load_folded_stage(unsigned char* dst, uint64_t* bar,
                                                  const CUtensorMap* map, int s, int experts,
                                                  int n0, int kt, int K, int N) {
  constexpr int kGroups = T::kGroups;
  constexpr int kPart = kGateUp ? kGroups / 2 : kGroups;
  const int part_groups = min(kPart, (N - n0) / kTiledGroupRows);
  mbar_arrive_expect_tx(bar, (kGroups / kPart) * part_groups * T::kGroupStage);
  const int col = (kGateUp ? 0 : s * K) + kt * T::kBK;
  const int row0 = (kGateUp ? s * N : 0) + n0;
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    if (j % kPart < part_groups) {
      const int row = row0 + (j >= kPart ? experts * N : 0) + (j % kPart) * kTiledGroupRows;
      unsigned char* group = dst + j * T::kGroupStage;
      tma_load_2d(group, map, bar, col, row);
      tma_load_2d(group + kTiledGroupRows * kTiledChunkCols * 2, map, bar, col + kTiledChunkCols,
                  row);
    }
  }
}

// One stage of a tile's MMAs: acc += the stage's BM activation rows (A, rows kLd apart) times
// its weight groups (B, as the tiled layout stores them).
template <typename T, bool kGateUp>
__device__ __forceinline__ void mma_stage(float (&acc)[T::kMt][T::kNt][4], const __nv_bfloat16* A,
                                          const unsigned char* B, int wm, int wn, int g, int c) {
  constexpr int kBK = T::kBK, kLd = T::kLd, kMt = T::kMt, kNt = T::kNt, kHalf = kNt / 2;
  constexpr int kGateRows = T::kBN / 2;
#pragma unroll
  for (int ks = 0; ks < kBK / 16; ++ks) {
    uint32_t af[kMt][4];
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
      const __nv_bfloat16* p = A + (wm * kMt * 16 + mt * 16 + g) * kLd + ks * 16 + 2 * c;
      af[mt][0] = load_u32(p);
      af[mt][1] = load_u32(p + 8 * kLd);
      af[mt][2] = load_u32(p + 8);
      af[mt][3] = load_u32(p + 8 * kLd + 8);
    }
    // Columns ks * 16 .. + 15 are 16-byte pieces 2 (ks % 4) and + 1 of the 64-column chunk
    // ks / 4; row r's piece j sits at j ^ (r % 8) (r % 8 == g: tiles start at multiples of 8).
    const unsigned char* chunk_base = B + (ks / 4) * (kTiledGroupRows * 128) + 4 * c;
    const int piece = 2 * (ks % 4);
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
      const int brow = kGateUp ? (nt < kHalf ? wn * kHalf * 8 + nt * 8
                                             : kGateRows + wn * kHalf * 8 + (nt - kHalf) * 8)
                               : wn * kNt * 8 + nt * 8;
      const unsigned char* row = chunk_base + (brow / kTiledGroupRows) * T::kGroupStage +
                                 (brow % kTiledGroupRows + g) * 128;
      const uint32_t b0 = *reinterpret_cast<const uint32_t*>(row + ((piece ^ g) << 4));
      const uint32_t b1 = *reinterpret_cast<const uint32_t*>(row + (((piece + 1) ^ g) << 4));
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) mma_16816(acc[mt][nt], af[mt], b0, b1);
    }
  }
}

// A tile's output rows (this thread's: r = wm * kMt * 16 + mt * 16 + g + 8 * half): gate/up's
// SwiGLU, down's rows scaled by their routing weights, or (a folded shared expert's down) its
// unrounded f32 sums. pair_at(mt, half): the row's pair (-1: padding, not stored);
// weight_at(mt, half, pair): down's routing weight of that pair.
template <typename T, bool kGateUp, typename PairAt, typename WeightAt>
__device__ __forceinline__ void store_rows(const float (&acc)[T::kMt][T::kNt][4],
                                           __nv_bfloat16* out, const FoldArgs& fold, bool folded,
                                           int m0, int n0, int N, PairAt pair_at,
                                           WeightAt weight_at, int wm, int wn, int g, int c) {
  constexpr int kMt = T::kMt, kNt = T::kNt, kHalf = kNt / 2;
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * kMt * 16 + mt * 16 + g + 8 * half;
      const int pair = pair_at(mt, half);
      if (pair < 0) continue;
      __nv_bfloat16* orow = out + static_cast<size_t>(m0 + r) * N;
      if (kGateUp) {
#pragma unroll
        for (int nt = 0; nt < kHalf; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int col = n0 + wn * kHalf * 8 + nt * 8 + 2 * c + j;
            if (col >= N) continue;
            float gv = acc[mt][nt][2 * half + j], uv = acc[mt][nt + kHalf][2 * half + j];
            if (folded) {  // rounded as an unfolded gate/up GEMM's output would be
              gv = __bfloat162float(__float2bfloat16(gv));
              uv = __bfloat162float(__float2bfloat16(uv));
            }
            orow[col] = __float2bfloat16(gv / (1.0f + __expf(-gv)) * uv);
          }
        }
      } else if (folded) {  // unrounded, unweighted
        float* frow = fold.down_out + static_cast<size_t>(m0 + r) * N;
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int col = n0 + wn * kNt * 8 + nt * 8 + 2 * c + j;
            if (col < N) frow[col] = acc[mt][nt][2 * half + j];
          }
        }
      } else {
        const float rw = weight_at(mt, half, pair);
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int col = n0 + wn * kNt * 8 + nt * 8 + 2 * c + j;
            if (col < N) orow[col] = __float2bfloat16(acc[mt][nt][2 * half + j] * rw);
          }
        }
      }
    }
  }
}

// One CTA computes a BM x BN tile of one M-block against its expert's weights. kGateUp: the
// BN weight rows are BN/2 gate rows and the matching BN/2 up rows (each warp holds the gate and
// up columns of the same outputs), output = SwiGLU, BN/2 columns. Otherwise: BN output columns
// scaled by the pair's routing weight. The weights come by bulk copies (thread 0 issues a
// stage's groups, which complete on the stage's barrier); the activation rows, gathered by pair,
// by cp.async. K % 8 == 0; a partial last stage is zero-filled (the activations) or zero-padded
// (the weights). w: the weights in the tiled layout ([E * 2N, K] or [E * N, K], N % 16 == 0).
template <int BM, bool kWide, bool kGateUp, bool kLean = false>
__global__ void __launch_bounds__(Tile<BM, kWide, kLean>::kThreads, 1)
    moe_gemm_kernel(__nv_bfloat16* out, const __nv_bfloat16* a_src, const __nv_bfloat16* w,
                    const float* route_w, const int32_t* sorted_pairs, const int32_t* block_expert,
                    int k_choices, int K, int N, const __grid_constant__ FoldArgs fold,
                    bool early_rows, const BlockReady ready) {
  // M-blocks below fold.blocks are the folded shared experts' (FoldArgs), laid out by position;
  // the routed blocks follow, block b of the routed layout at M-block fold.blocks + b. Rows of
  // `out` (and of down's activations) are numbered over the whole grid. The M-block is
  // blockIdx.x, the column tile blockIdx.y; with readiness counters the other way round.
  const bool block_major = ready.counters != nullptr;
  const int mb = block_major ? blockIdx.y : blockIdx.x;
  const int nb = block_major ? blockIdx.x : blockIdx.y;
  const bool folded = mb < fold.blocks;
  const int rb = mb - fold.blocks;  // routed block
  // gate/up's routed blocks let down launch only once they have waited for the routing (an
  // ordered launch, launch.cuh), so down can read the layout and start streaming its weights while
  // gate/up is still running; down waits for gate/up's output before its first activation
  // load. gate/up's folded blocks read only x and write rows nobody reads before this kernel
  // ends: with fold.early (x complete before the kernels before this one let it launch) they
  // do not wait for the router.
  if constexpr (kGateUp) {
    if (!folded || !fold.early) asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  using T = Tile<BM, kWide, kLean>;
  constexpr int kBN = T::kBN, kBK = T::kBK, kStages = T::kStages, kLd = T::kLd;
  constexpr int kMt = T::kMt, kNt = T::kNt;
  // The routed expert, or the folded expert's index s.
  const int e = folded ? mb / fold.blocks_per_expert : __ldcg(block_expert + rb);
  if (e < 0) return;
  // The pair of row r of this block (-1: padding); a folded block's row is a token, its weight 1.
  auto pair_of = [&](int r) {
    if (folded) {
      const int t = (mb % fold.blocks_per_expert) * BM + r;
      return t < fold.tokens ? t : -1;
    }
    return __ldcg(sorted_pairs + rb * BM + r);
  };
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint64_t full[kStages];  // a stage's weights have landed
  // [stages][BN / 16 groups][2 chunks][16 rows][128 bytes] (1024-byte aligned for the
  // swizzle), then the activations [stages][BM][LD].
  unsigned char* sb = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  __nv_bfloat16* sa = reinterpret_cast<__nv_bfloat16*>(sb + kStages * T::kBStage);
  const int m0 = mb * BM;                         // first row of out (and of down's activations)
  const int n0 = nb * (kGateUp ? kBN / 2 : kBN);  // first output column
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int wm = warp / T::kWarpsN, wn = warp % T::kWarpsN;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1);
    mbar_init_fence();
  }
  __syncthreads();

  auto load_b = [&](int stage, int kt) {
    if (tid == 0) {
      if (folded) {
        load_folded_stage<T, kGateUp>(sb + stage * T::kBStage, &full[stage], &fold.map, e,
                                      fold.experts, n0, kt, K, N);
      } else {
        load_weight_stage<T, kGateUp>(sb + stage * T::kBStage, &full[stage], w, e, n0, kt, K, N);
      }
    }
  };

  const int kTiles = (K + kBK - 1) / kBK;
  // early_rows: the first stages' weights are on their way before anything else is read, and
  // the pairs of the rows this thread loads and stores come in one batch of loads (one L2
  // trip), down's routing weights in a second, all before the main loop. Otherwise each
  // activation row's pair is a trip of its own before the first weight copy (four for 32-row
  // blocks), and the epilogue reads its rows' pairs and weights again: two trips at the end of
  // every CTA (a 256-token step's down GEMM runs 12 stages per CTA; Nsight Compute put ~20% of
  // its warps' samples on these loads).
  if (early_rows) {
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < kTiles) load_b(s, s);
    }
  }
  // Per-thread source rows of the activation loads (fixed over K).
  const __nv_bfloat16* a_row[T::kALoads];
  int a_r[T::kALoads], a_ch[T::kALoads], a_pair[T::kALoads];
#pragma unroll
  for (int i = 0; i < T::kALoads; ++i) {
    const int idx = tid + i * T::kThreads;
    a_r[i] = idx / T::kChunks;
    a_ch[i] = idx % T::kChunks;
  }
  // The pairs of the rows this thread stores: r = wm * kMt * 16 + mt * 16 + g + 8 * half.
  int ep_pair[kMt][2];
  float ep_w[kMt][2] = {};
  auto ep_row = [&](int mt, int half) { return wm * kMt * 16 + mt * 16 + g + 8 * half; };
  if (!early_rows) {
#pragma unroll
    for (int i = 0; i < T::kALoads; ++i) a_pair[i] = pair_of(a_r[i]);
  } else if (folded) {
#pragma unroll
    for (int i = 0; i < T::kALoads; ++i) a_pair[i] = pair_of(a_r[i]);
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
      ep_pair[mt][0] = pair_of(ep_row(mt, 0));
      ep_pair[mt][1] = pair_of(ep_row(mt, 1));
    }
  } else {
    const int32_t* block_pairs = sorted_pairs + rb * BM;
#pragma unroll
    for (int i = 0; i < T::kALoads; ++i) a_pair[i] = __ldcg(block_pairs + a_r[i]);
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
      ep_pair[mt][0] = __ldcg(block_pairs + ep_row(mt, 0));
      ep_pair[mt][1] = __ldcg(block_pairs + ep_row(mt, 1));
    }
    if constexpr (!kGateUp) {
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int pair = ep_pair[mt][half];
          ep_w[mt][half] = pair >= 0 ? route_w[pair] : 0.0f;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < T::kALoads; ++i) {
    const int pair = a_pair[i];
    const int64_t src_row = kGateUp ? (folded ? pair : pair / k_choices) : m0 + a_r[i];
    a_row[i] = pair >= 0 ? a_src + src_row * K : nullptr;
  }
  auto load_a = [&](int stage, int kt) {
    const int k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < T::kALoads; ++i) {
      const int kk = k0 + a_ch[i] * 8;
      const bool ok = a_row[i] != nullptr && kk < K;
      cp_async_16(sa + (stage * BM + a_r[i]) * kLd + a_ch[i] * 8, ok ? a_row[i] + kk : a_src, ok);
    }
  };
  float acc[kMt][kNt][4];
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
      acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;

  // The first stages' weights (early_rows: issued above), then (down: once gate/up's output is
  // complete) their activations, a commit group per stage.
  if (!early_rows) {
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < kTiles) load_b(s, s);
    }
  }
  if constexpr (!kGateUp) wait_for_rows(ready, block_major, mb, tid);
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < kTiles) load_a(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < kTiles; ++kt) {
    cp_async_wait<kStages - 2>();
    mbar_wait(&full[kt % kStages], (kt / kStages) & 1);
    // Everyone's activation copies have landed, and everyone is done with the stage the loads
    // below refill (read in the previous iteration).
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < kTiles) {
      load_a(next % kStages, next);
      load_b(next % kStages, next);
    }
    cp_async_commit();
    mma_stage<T, kGateUp>(acc, sa + (kt % kStages) * BM * kLd, sb + (kt % kStages) * T::kBStage, wm,
                          wn, g, c);
  }
  cp_async_wait<0>();

  store_rows<T, kGateUp>(
      acc, out, fold, folded, m0, n0, N,
      [&](int mt, int half) { return early_rows ? ep_pair[mt][half] : pair_of(ep_row(mt, half)); },
      [&](int mt, int half, int pair) { return early_rows ? ep_w[mt][half] : route_w[pair]; }, wm,
      wn, g, c);
  if constexpr (kGateUp) {
    if (block_major) {
      __syncthreads();  // every thread's rows stored
      if (tid == 0) red_add_release_gpu(ready.counters + mb, 1);
    }
  }
}

template <int BM, bool kWide, bool kGateUp, bool kLean = false>
void launch_gemm_tile(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* w,
                      const float* route_w, const int32_t* sorted_pairs,
                      const int32_t* block_expert, int64_t capacity, int k, int K, int N,
                      const FoldArgs& fold, const BlockReady& ready, cudaStream_t stream) {
  using T = Tile<BM, kWide, kLean>;
  static bool configured = false;
  if (!configured) {
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(moe_gemm_kernel<BM, kWide, kGateUp, kLean>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(T::kSmem)));
    configured = true;
  }
  constexpr int cols = kGateUp ? T::kBN / 2 : T::kBN;
  const unsigned m_blocks = static_cast<unsigned>(fold.blocks + capacity / BM);
  const unsigned n_tiles = (N + cols - 1) / cols;
  const dim3 grid = ready.counters != nullptr ? dim3(n_tiles, m_blocks) : dim3(m_blocks, n_tiles);
  // ERNIE_MOE_EARLY_ROWS=0: the rows' pairs and weights read where they are used (see
  // moe_gemm_kernel).
  static const bool early_rows = path_enabled("ERNIE_MOE_EARLY_ROWS");
  launch_pdl(moe_gemm_kernel<BM, kWide, kGateUp, kLean>, grid, T::kThreads, T::kSmem, stream, out,
             a, w, route_w, sorted_pairs, block_expert, k, K, N, fold, early_rows, ready);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

// The current device's multiprocessors.
int device_sms() {
  int device = 0, sms = 0;
  ERNIE_CUDA_CHECK(cudaGetDevice(&device));
  ERNIE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Whether the wide 16-row tiles cover this GEMM (`blocks` M-blocks) in one wave (CTAs resident
// at once).
template <bool kGateUp>
bool wide_tiles_fit(int64_t blocks, int N) {
  static const int slots = [] {
    const int sms = device_sms();
    int per_sm = 0;
    using T = Tile<kMoeBlockSmall, true>;
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(moe_gemm_kernel<kMoeBlockSmall, true, kGateUp>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(T::kSmem)));
    ERNIE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, moe_gemm_kernel<kMoeBlockSmall, true, kGateUp>, T::kThreads, T::kSmem));
    return sms * per_sm;
  }();
  constexpr int cols =
      kGateUp ? Tile<kMoeBlockSmall, true>::kBN / 2 : Tile<kMoeBlockSmall, true>::kBN;
  return blocks * ((N + cols - 1) / cols) <= slots;
}

// The shapes the decode GEMMs take (a K multiple of 8, whole 16-row weight groups, whole blocks).
void require_gemm_shape(int K, int N, int64_t capacity, int block_m) {
  require_parts(K % 8 == 0, "MoE GEMM: the reduction size ", K, " must be a multiple of 8");
  require_parts(N % kTiledGroupRows == 0, "MoE GEMM: the output size ", N,
                " must be a multiple of ", kTiledGroupRows);
  require_parts(capacity % block_m == 0, "MoE GEMM: capacity ", capacity,
                " is not a multiple of the block size ", block_m);
}

template <bool kGateUp>
void launch_gemm(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* w,
                 const float* route_w, const int32_t* sorted_pairs, const int32_t* block_expert,
                 int64_t capacity, int block_m, int k, int K, int N, const FoldArgs& fold,
                 int32_t* block_ready, cudaStream_t stream) {
  require_gemm_shape(K, N, capacity, block_m);
  require_parts(block_m == kMoeBlockSmall || block_m == kMoeBlockMid,
                "MoE GEMM: unknown block size ", block_m);
  // ERNIE_MOE_LEAN: bit 1 the 16-row tiles' lean form, bit 2 the 32-row ones' (Tile); both by
  // default, 0 turns both off.
  static const int lean = switch_bits("ERNIE_MOE_LEAN", 3);
  BlockReady ready;
  if (block_ready != nullptr) {
    require(block_m == kMoeBlockMid && fold.blocks == 0,
            "MoE GEMM: readiness counters need 32-row blocks and no folded experts");
    // down waits for every gate/up column tile of its M-block (gate/up's K is down's N).
    constexpr int gate_up_cols = Tile<kMoeBlockMid>::kBN / 2;
    static_assert(Tile<kMoeBlockMid>::kBN == Tile<kMoeBlockMid, false, true>::kBN);
    ready = BlockReady{block_ready, kGateUp ? 0 : (K + gate_up_cols - 1) / gate_up_cols};
  }
  const bool wide = block_m == kMoeBlockSmall &&
                    wide_tiles_fit<kGateUp>(fold.blocks + capacity / kMoeBlockSmall, N);
  if (block_m == kMoeBlockSmall) {
    if (wide) {
      launch_gemm_tile<kMoeBlockSmall, true, kGateUp>(
          out, a, w, route_w, sorted_pairs, block_expert, capacity, k, K, N, fold, ready, stream);
    } else if (lean & 1) {
      launch_gemm_tile<kMoeBlockSmall, false, kGateUp, true>(
          out, a, w, route_w, sorted_pairs, block_expert, capacity, k, K, N, fold, ready, stream);
    } else {
      launch_gemm_tile<kMoeBlockSmall, false, kGateUp>(
          out, a, w, route_w, sorted_pairs, block_expert, capacity, k, K, N, fold, ready, stream);
    }
  } else {
    if (lean & 2) {
      launch_gemm_tile<kMoeBlockMid, false, kGateUp, true>(
          out, a, w, route_w, sorted_pairs, block_expert, capacity, k, K, N, fold, ready, stream);
    } else {
      launch_gemm_tile<kMoeBlockMid, false, kGateUp>(out, a, w, route_w, sorted_pairs, block_expert,
                                                     capacity, k, K, N, fold, ready, stream);
    }
  }
}

// ---- Prefill: wgmma grouped GEMM (128-row M-blocks) ----
//
// Persistent CTAs (one per SM) walk the 128 x 256 output tiles (N tile fastest, so the CTAs
// running together share A rows and an expert's weights in L2). A producer warpgroup streams
// 64-wide K slices of A (two 64-row boxes) and of the expert's weights (four 64-row boxes) into
// a kWgStages-deep ring, running ahead into the next tile while the consumers store the last
// one; two consumer warpgroups each multiply their 64 A rows by the 256 weight rows with wgmma
// m64n256k16, keeping one K slice of wgmma in flight, and release each slot once its wgmma has
// completed. (256-wide tiles read a quarter fewer operand bytes from L2 per FLOP than 128-wide
// ones.) The weights come by TMA (one producer thread); A by TMA too for down (the
// activations are in sorted order already), and for gate/up gathered from x by the whole
// producer warpgroup (gather_producer), where a separate gather kernel used to write x in
// sorted order first (151 us for an 8192-token step).
//
// The CTAs run as clusters of two over pairs of M-blocks (2p, 2p + 1) in the same N tile:
// where both blocks are one expert's, each CTA's producer brings half of every weight slice by
// TMA multicast into both CTAs, so L2 sends the weights once per two M-blocks (the operand
// bytes -1/3; mixed 8192-token steps -0.8%, performance.md twenty-sixth round;
// ERNIE_WG_MULTICAST=0 runs single CTAs). Each consumer warp then frees a slot in both CTAs,
// and both CTAs walk the same slots in the same order (a CTA whose block is padding runs empty
// slices beside its partner).
constexpr int kWgBM = kMoeBlockWgmma, kWgBK = 64, kWgStages = 4;
constexpr int kWgBN = 256;                 // weight rows per tile
constexpr int kWgBox = 64 * kWgBK * 2;     // bytes of one 64-row box
constexpr int kWgStageBytes = 6 * kWgBox;  // A: 2 boxes, B: 4 boxes
constexpr size_t kWgSmem = static_cast<size_t>(kWgStages) * kWgStageBytes + 1024 + 256;

// The tall form (moe_tall_enabled): 256-row M-blocks, 192 weight rows a tile (gate/up: 96
// outputs), each consumer warpgroup 128 rows as two m64n192 accumulators (192 registers: the
// producer warpgroup gives registers back with setmaxnreg, 56 a thread, so that the consumers
// can hold 224; ptxas spilled the gathering producer's registers at 40, the consumers' at
// 216). A slice is 56 KB (A 32, B 24) for 1.5 times the multiplies of the
// 48 KB slice above; the ring is four slices (224 KB). Single CTAs, no clusters.
constexpr int kTallBM = kMoeBlockTall, kTallBN = 192;
constexpr int kTallGroups = 96 / kTiledGroupRows;  // gate/up: one box of gate rows, one of up
constexpr int kTallABytes = kTallBM / 64 * kWgBox, kTallStageBytes = kTallABytes + kTallBN * 128;
constexpr size_t kTallSmem = static_cast<size_t>(kWgStages) * kTallStageBytes + 1024 + 256;
constexpr int kTallProducerRegs = 56, kTallConsumerRegs = 224;
static_assert(128 * kTallProducerRegs + 256 * kTallConsumerRegs <= 65536);
static_assert(kTallSmem <= 227 * 1024);

// A stage's A boxes are laid out as stage_piece_offset (expert_layout.h) places them.
static_assert(kWgBox == 64 * 128);

// A gate/up tile's weights in the wgmma GEMMs: gate rows n0..n0+127 and up rows N + n0.. of
// expert e's [2N, K] block, as four 64-row boxes of the tiled layout (each starts at a group,
// as N % 16 == 0).
struct GateUpBoxes {
  static constexpr int kCols = kWgBN / 2;  // outputs of a tile
  int rows[4];
  __device__ __forceinline__ GateUpBoxes(int e, int n0, int N) {
    const int r0 = e * 2 * N + n0;
    rows[0] = r0;
    rows[1] = r0 + 64;
    rows[2] = r0 + N;
    rows[3] = r0 + N + 64;
  }
  // K slice kt's four boxes, one after another from dst, completing on bar (one thread).
  __device__ __forceinline__ void load(unsigned char* dst, const CUtensorMap* map, uint64_t* bar,
                                       int kt) const {
    for (int b = 0; b < 4; ++b) {
      tma_load_4d(dst + b * kWgBox, map, bar, 0, 0, kt, rows[b] / kTiledGroupRows);
    }
  }
  // Cluster CTA `rank`'s half of them (boxes 2 rank, 2 rank + 1) into both CTAs of its pair.
  __device__ __forceinline__ void load_half(unsigned char* dst, const CUtensorMap* map,
                                            uint64_t* bar, int kt, uint32_t rank) const {
    const int first = rank == 0 ? rows[0] : rows[2], second = rank == 0 ? rows[1] : rows[3];
    unsigned char* half = dst + 2 * rank * kWgBox;
    tma_load_4d_multicast(half, map, bar, 0, 0, kt, first / kTiledGroupRows, 3);
    tma_load_4d_multicast(half + kWgBox, map, bar, 0, 0, kt, second / kTiledGroupRows, 3);
  }
};

// The same for the tall GEMMs' 192 weight rows: gate rows n0..n0+95 and up rows N + n0.., one
// 96-row box each (a tensor map with boxes of kTallGroups groups).
struct TallGateUpBoxes {
  static constexpr int kCols = kTallBN / 2;
  int gate, up;
  __device__ __forceinline__ TallGateUpBoxes(int e, int n0, int N)
      : gate(e * 2 * N + n0), up(e * 2 * N + N + n0) {}
  __device__ __forceinline__ void load(unsigned char* dst, const CUtensorMap* map, uint64_t* bar,
                                       int kt) const {
    tma_load_4d(dst, map, bar, 0, 0, kt, gate / kTiledGroupRows);
    tma_load_4d(dst + kTallBN / 2 * 128, map, bar, 0, 0, kt, up / kTiledGroupRows);
  }
  __device__ __forceinline__ void load_half(unsigned char*, const CUtensorMap*, uint64_t*, int,
                                            uint32_t) const {}  // tall tiles run single CTAs
};

// The wgmma GEMMs' work units, N tile fastest: (M-block, N tile), or with kPair (clusters of
// two CTAs) (pair of M-blocks 2p and 2p + 1, N tile), cluster CTA r taking block 2p + r. A CTA
// (a cluster) takes units first, first + stride, ...
template <bool kPair>
struct WgWork {
  int m_blocks, n_tiles, units, first, stride;
  uint32_t rank = 0;
  __device__ __forceinline__ WgWork(int m_blocks_, int n_tiles_)
      : m_blocks(m_blocks_), n_tiles(n_tiles_) {
    if constexpr (kPair) {
      rank = cluster_rank();
      units = (m_blocks + 1) / 2 * n_tiles;
      first = blockIdx.x / 2;
      stride = gridDim.x / 2;
    } else {
      units = m_blocks * n_tiles;
      first = blockIdx.x;
      stride = gridDim.x;
    }
  }
};

// One unit as this CTA sees it: its M-block and expert (-1: padding), whether the unit is
// passed over (no expert in either block of the pair), and whether both blocks of the pair are
// the same expert's (the weights are multicast).
struct WgTile {
  int mb, nt, e;
  bool skip, shared;
};

template <bool kPair>
__device__ __forceinline__ WgTile wg_tile(const WgWork<kPair>& w, int u,
                                          const int32_t* block_expert) {
  WgTile t;
  const int row = u / w.n_tiles;
  t.nt = u % w.n_tiles;
  if constexpr (kPair) {
    const int e0 = block_expert[2 * row];
    const int e1 = 2 * row + 1 < w.m_blocks ? block_expert[2 * row + 1] : -1;
    t.mb = 2 * row + static_cast<int>(w.rank);
    t.e = w.rank == 0 ? e0 : e1;
    t.skip = e0 < 0 && e1 < 0;
    t.shared = e0 >= 0 && e0 == e1;
  } else {
    t.mb = row;
    t.e = block_expert[row];
    t.skip = t.e < 0;
    t.shared = false;
  }
  return t;
}

// The gate/up producer warpgroup: A rows come straight from x (row sorted_pairs[r] / k) by
// cp.async into the 128-byte swizzled layout TMA would give, no gathered copy of x in memory;
// thread 0 also brings the weight boxes by TMA. Each warp copies 4 rows x 128 bytes per
// instruction, 8 rows per thread and stage. Each thread's copies of a stage arrive on its full
// barrier when they land (cp.async.mbarrier.arrive), so the producer never waits for its own
// copies and keeps every free stage in flight; the consumers fence for the tensor cores' proxy
// after the barrier.
// BM: the tile's rows (kWgBM, or kTallBM with TallGateUpBoxes for the tall form).
template <bool kPair, int BM = kWgBM, typename Boxes = GateUpBoxes>
__device__ __forceinline__ void gather_producer(unsigned char* smem, uint64_t* full,
                                                uint64_t* empty, const CUtensorMap& b_map,
                                                const __nv_bfloat16* x, const int32_t* sorted_pairs,
                                                const int32_t* block_expert,
                                                const WgWork<kPair>& work, int k_choices, int K,
                                                int N) {
  constexpr bool kTall = BM == kTallBM;
  // A thread copies kRows rows of each slice, kChunks adjacent 16-byte chunks of each (the tall
  // form: two, so that eight rows' pointers fit the producer's registers), as
  // stage_gather_row and stage_first_piece deal them.
  constexpr int kChunks = kTall ? 2 : 1, kRows = BM / 16 / kChunks;
  constexpr int kStageBytes = kTall ? kTallStageBytes : kWgStageBytes;
  constexpr int kABytes = BM / 64 * kWgBox, kBBytes = kTall ? kTallBN * 128 : 4 * kWgBox;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int ch = stage_first_piece(kChunks, lane);  // the first of the thread's chunks of a row
  const int k_tiles = (K + kWgBK - 1) / kWgBK;
  int it = 0;  // K slices issued so far, over all tiles: slot it % stages, round it / stages
  for (int u = work.first; u < work.units; u += work.stride) {
    const WgTile t = wg_tile(work, u, block_expert);
    if (t.skip) continue;
    const int n0 = t.nt * Boxes::kCols;
    const int m0 = t.mb * BM;
    const __nv_bfloat16* src[kRows];  // this thread's rows of the tile (null: padding, zero-filled)
    int dst[kRows];  // their byte offsets in a stage (swizzle of 16-byte chunk ch; ch + 1 is at
                     // dst ^ 16, ch being even)
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = stage_gather_row(BM, kChunks, warp, lane, i);
      const int pair = t.e >= 0 ? sorted_pairs[m0 + r] : -1;
      src[i] = pair >= 0 ? x + static_cast<size_t>(pair / k_choices) * K : nullptr;
      dst[i] = stage_piece_offset(r, ch);
    }
    const Boxes boxes(max(t.e, 0), n0, N);
    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
      const int s = it % kWgStages;
      if (it >= kWgStages) mbar_wait(&empty[s], ((it / kWgStages) - 1) & 1);
      unsigned char* st = smem + s * kStageBytes;
      const int k0 = kt * kWgBK;
      if (tid == 0) {
        if (t.e < 0) {
          mbar_arrive(&full[s]);  // a padding block beside its partner's: nothing to bring
        } else {
          mbar_arrive_expect_tx(&full[s], kBBytes);
          if (t.shared) {
            boxes.load_half(st + kABytes, &b_map, &full[s], kt, work.rank);
          } else {
            boxes.load(st + kABytes, &b_map, &full[s], kt);
          }
        }
      }
      const int kk = k0 + ch * 8;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
#pragma unroll
        for (int j = 0; j < kChunks; ++j) {
          const bool ok = src[i] != nullptr && kk + 8 * j < K;
          cp_async_16(st + (dst[i] ^ (j << 4)), ok ? src[i] + kk + 8 * j : x, ok);
        }
      }
      cp_async_mbar_arrive(&full[s]);
    }
  }
  cp_async_wait<0>();  // nothing of this thread's still in flight when the CTA ends
}

// The quad transpose of the wide epilogue: lane c of a quad (lanes 4 g .. 4 g + 3, mask `quad`)
// holds x[j], two adjacent bf16 outputs of its row in columns 8 (4 q + j) + 2 c, + 1 (j = 0..3);
// returns the row's eight columns 8 (4 q + c) .. + 7, one pair from each lane of the quad, in
// three exchanges (in exchange r lane c sends x[c ^ r] to lane c ^ r and gets its x[c]).
__device__ __forceinline__ uint4 quad_transpose(const uint32_t (&x)[4], int c, unsigned quad) {
  const auto pick = [](const uint32_t(&v)[4], int i) {
    return (i & 2) ? ((i & 1) ? v[3] : v[2]) : ((i & 1) ? v[1] : v[0]);
  };
  uint32_t got[4];  // got[r]: lane c ^ r's pair of columns 8 (4 q + c) + 2 (c ^ r)
  got[0] = pick(x, c);
#pragma unroll
  for (int r = 1; r < 4; ++r) got[r] = __shfl_xor_sync(quad, pick(x, c ^ r), r);
  return make_uint4(pick(got, c), pick(got, c ^ 1), pick(got, c ^ 2), pick(got, c ^ 3));
}

// Two floats as the bits of a bf16 pair (round to nearest).
__device__ __forceinline__ uint32_t bf16_pair_bits(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &h, sizeof bits);
  return bits;
}

// Consumer warpgroup cw's 64 x 256 accumulators (wgmma m64n256 layout; the thread is lane
// 4 g + c of the group's warp `warp`) into its rows of the M-block at row m0 of the sorted
// layout: gate/up (the first 128 columns gate, the last 128 up) as
// silu(gate) * up in output columns n0.. n0 + 127; down times each row's routing weight in
// columns n0.. n0 + 255. Padding rows (no pair) are left alone, columns past N skipped.
// kWideStores: the quad's four lanes trade values (quad_transpose) so that each stores 16
// bytes, eight adjacent columns, instead of four stores of 4 bytes (the same values).
// kCols: the tile's weight rows (256, or kTallBN for the tall form's m64n192 accumulators).
template <bool kGateUp, bool kWideStores, int kCols = kWgBN>
__device__ __forceinline__ void wgmma_store_tile(const float (&acc)[kCols / 2], __nv_bfloat16* out,
                                                 const float* route_w, const int32_t* sorted_pairs,
                                                 int m0, int cw, int n0, int N, int warp, int g,
                                                 int c) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = m0 + cw * 64 + warp * 16 + g + 8 * half;
    const int pair = sorted_pairs[r];
    if (pair < 0) continue;
    __nv_bfloat16* orow = out + static_cast<size_t>(r) * N;
    const float rw = kGateUp ? 1.0f : route_w[pair];
    // Output columns n0 + 8 i + 2 c, + 1 (i < 16 for gate/up, 32 for down) as a bf16 pair.
    const auto value = [&](int i) {
      float v[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (kGateUp) {
          const float gv = acc[4 * i + 2 * half + j];
          const float uv = acc[4 * (i + kCols / 16) + 2 * half + j];
          v[j] = gv / (1.0f + __expf(-gv)) * uv;
        } else {
          v[j] = acc[4 * i + 2 * half + j] * rw;
        }
      }
      return bf16_pair_bits(v[0], v[1]);
    };
    constexpr int kPairs = kGateUp ? kCols / 16 : kCols / 8;
    if constexpr (kWideStores) {
      // N % 16 == 0: a chunk of eight columns is wholly inside N or wholly past it.
      const unsigned quad = 0xFu << (4 * g);
#pragma unroll
      for (int q = 0; q < kPairs / 4; ++q) {
        uint32_t x[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) x[j] = value(4 * q + j);
        const uint4 chunk = quad_transpose(x, c, quad);
        const int col = n0 + 8 * (4 * q + c);
        if (col < N) *reinterpret_cast<uint4*>(orow + col) = chunk;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const int col = n0 + 8 * i + 2 * c;
        if (col < N) *reinterpret_cast<uint32_t*>(orow + col) = value(i);
      }
    }
  }
}

// A consumer warpgroup's K loop over one tile of the wgmma GEMMs: waits for each slice of the
// ring (stages of kStageBytes), and where `run` multiplies it (mma(stage): the slice's wgmmas,
// between the fence and the commit); frees each slot with release(slot), one slice late or,
// with kEarlyRelease, as soon as the slice's group completes. Every group is complete on
// return. `it` counts the slices taken over all tiles.
template <bool kGateUp, bool kEarlyRelease, int kStageBytes, typename Mma, typename Release>
__device__ __forceinline__ void consume_tile(const unsigned char* smem, uint64_t* full, int& it,
                                             int k_tiles, bool run, const Mma& mma,
                                             const Release& release) {
  for (int kt = 0; kt < k_tiles; ++kt, ++it) {
    const int s = it % kWgStages;
    mbar_wait(&full[s], (it / kWgStages) & 1);
    if (run) {
      // gate/up: the gathered A rows were written by cp.async (the generic proxy).
      if constexpr (kGateUp) fence_proxy_async();
      wgmma_fence();
      mma(smem + s * kStageBytes);
      wgmma_commit();
      if constexpr (kEarlyRelease) {
        wgmma_wait<0>();  // this slice's group is complete: its slot is free
      } else {
        // The previous slice's group is complete once at most this one is pending.
        wgmma_wait<1>();
      }
    }
    if constexpr (kEarlyRelease) {
      release(s);
    } else if (kt > 0) {
      release((it - 1) % kWgStages);
    }
  }
  if constexpr (!kEarlyRelease) {
    wgmma_wait<0>();
    release((it - 1) % kWgStages);
  }
}

// kWideStores: the epilogue's stores of 16 bytes (wgmma_store_tile). kPair: clusters of two CTAs
// sharing the weights of M-block pairs (WgWork; launched by launch_wgmma as such).
// kEarlyRelease: each consumer waits for its slice's wgmma group to complete and frees the slot
// at once, instead of keeping one group in flight and freeing the slice before: while the
// consumers wait for the next slice the producer has all kWgStages slots to fill, not one fewer
// (four slices of operands in flight instead of three, if the feed's latency is the bound).
template <bool kGateUp, bool kWideStores, bool kPair, bool kEarlyRelease = false>
__global__ void __launch_bounds__(384, 1)
    moe_gemm_wgmma_kernel(const __grid_constant__ CUtensorMap a_map,
                          const __grid_constant__ CUtensorMap b_map, __nv_bfloat16* out,
                          const float* route_w, const int32_t* sorted_pairs,
                          const int32_t* block_expert, int m_blocks, int n_tiles, int K, int N,
                          const __nv_bfloat16* x, int k_choices) {
  extern __shared__ unsigned char smem_raw[];
  // 128B-swizzled tiles need 1024-byte alignment.
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kWgStages * kWgStageBytes);
  uint64_t* empty = full + kWgStages;
  const int tid = threadIdx.x, wg = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < kWgStages; ++s) {
      // gate/up: thread 0's TMA arrival plus one per producer thread for its gathered A rows.
      mbar_init(&full[s], kGateUp ? 1 + 128 : 1);
      // One arrival per consumer warp, of both CTAs with kPair.
      mbar_init(&empty[s], kPair ? 16 : 8);
    }
    mbar_init_fence();
  }
  // kPair: the partner's barriers are initialised before anything may arrive on them.
  if constexpr (kPair) {
    cluster_sync();
  } else {
    __syncthreads();
  }
  const WgWork<kPair> work(m_blocks, n_tiles);
  const int k_tiles = (K + kWgBK - 1) / kWgBK;

  if (wg == 0) {              // producer
    if constexpr (kGateUp) {  // A gathered from x by every thread of the warpgroup
      gather_producer(smem, full, empty, b_map, x, sorted_pairs, block_expert, work, k_choices, K,
                      N);
    } else if (tid == 0) {
      int it = 0;  // K slices issued so far, over all tiles: slot it % stages, round it / stages
      for (int u = work.first; u < work.units; u += work.stride) {
        const WgTile t = wg_tile(work, u, block_expert);
        if (t.skip) continue;
        const int m0 = t.mb * kWgBM;
        // weight rows n0..n0+255 of the expert's [N, K] down block
        const int r0 = max(t.e, 0) * N + t.nt * kWgBN;
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
          const int s = it % kWgStages;
          if (it >= kWgStages) mbar_wait(&empty[s], ((it / kWgStages) - 1) & 1);
          if (t.e < 0) {
            mbar_arrive(&full[s]);  // a padding block beside its partner's: nothing to bring
            continue;
          }
          unsigned char* st = smem + s * kWgStageBytes;
          mbar_arrive_expect_tx(&full[s], kWgStageBytes);
          const int k0 = kt * kWgBK;
          tma_load_2d(st, &a_map, &full[s], k0, m0);
          tma_load_2d(st + kWgBox, &a_map, &full[s], k0, m0 + 64);
          if (t.shared) {
            for (int b = 2 * work.rank; b < 2 * work.rank + 2; ++b) {
              tma_load_4d_multicast(st + (2 + b) * kWgBox, &b_map, &full[s], 0, 0, kt,
                                    (r0 + 64 * b) / kTiledGroupRows, 3);
            }
          } else {
            for (int b = 0; b < 4; ++b) {
              tma_load_4d(st + (2 + b) * kWgBox, &b_map, &full[s], 0, 0, kt,
                          (r0 + 64 * b) / kTiledGroupRows);
            }
          }
        }
      }
    }
  } else {
    const int cw = wg - 1;  // this consumer's 64 rows of the M-block
    const int warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
    // Frees slot s: in this CTA, and with kPair in the partner too (its producer may multicast
    // into this CTA's slot once both are free).
    const auto release = [&](int s) {
      if (lane != 0) return;
      mbar_arrive(&empty[s]);
      if constexpr (kPair) mbar_arrive_cluster(&empty[s], work.rank ^ 1);
    };
    int it = 0;
    for (int u = work.first; u < work.units; u += work.stride) {
      const WgTile t = wg_tile(work, u, block_expert);
      if (t.skip) continue;
      const int n0 = t.nt * (kGateUp ? kWgBN / 2 : kWgBN);
      const int m0 = t.mb * kWgBM;
      const bool run = t.e >= 0;  // else empty slices beside the partner's
      float acc[128];
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
      consume_tile<kGateUp, kEarlyRelease, kWgStageBytes>(
          smem, full, it, k_tiles, run,
          [&](const unsigned char* st) {
#pragma unroll
            for (int ks = 0; ks < kWgBK / 16; ++ks) {
              wgmma_m64n256k16(acc, wgmma_desc_sw128(st + cw * kWgBox + ks * 32),
                               wgmma_desc_sw128(st + 2 * kWgBox + ks * 32));
            }
          },
          release);
      if (run) {
        wgmma_store_tile<kGateUp, kWideStores>(acc, out, route_w, sorted_pairs, m0, cw, n0, N, warp,
                                               g, c);
      }
    }
  }
  // kPair: neither CTA leaves while its partner may still write its slots or arrive on its
  // barriers.
  if constexpr (kPair) cluster_sync();
}

// gate/up (kGateUp): A gathered from x by the kernel (a_map unused); down: A by a_map.
template <bool kGateUp>
void launch_wgmma(__nv_bfloat16* out, const CUtensorMap& a_map, const CUtensorMap& b_map,
                  const float* route_w, const int32_t* sorted_pairs, const int32_t* block_expert,
                  int64_t capacity, int K, int N, const __nv_bfloat16* x, int k_choices,
                  cudaStream_t stream) {
  // The epilogue stores 16 bytes a lane (wgmma_store_tile): H200, mixed 8192-token steps -1.8%
  // (two A/B pairs). ERNIE_WG_WIDE_STORES=0 turns it off. ERNIE_WG_MULTICAST=0 (the clusters of
  // two sharing the weights of M-block pairs need the wide stores) runs single CTAs.
  // ERNIE_WG_EARLY_RELEASE=1 (not yet measured; with the wide stores): each K slice's slot
  // freed as soon as its wgmma group completes (moe_gemm_wgmma_kernel's kEarlyRelease).
  static const bool wide_stores = path_enabled("ERNIE_WG_WIDE_STORES");
  static const bool pair = wide_stores && path_enabled("ERNIE_WG_MULTICAST");
  static const bool early = wide_stores && new_path_enabled("ERNIE_WG_EARLY_RELEASE");
  const auto kernel = pair && early ? moe_gemm_wgmma_kernel<kGateUp, true, true, true>
                      : pair        ? moe_gemm_wgmma_kernel<kGateUp, true, true>
                      : early       ? moe_gemm_wgmma_kernel<kGateUp, true, false, true>
                      : wide_stores ? moe_gemm_wgmma_kernel<kGateUp, true, false>
                                    : moe_gemm_wgmma_kernel<kGateUp, false, false>;
  // CTAs (clusters with `pair`) resident at once: the persistent grid's size.
  static const int slots = [&] {
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kWgSmem)));
    const int count = device_sms();
    if (!pair) return count;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(2 * (count / 2));
    cfg.blockDim = dim3(384);
    cfg.dynamicSmemBytes = kWgSmem;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim = {2, 1, 1};
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    ERNIE_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
    require_parts(clusters > 0, "MoE wgmma GEMM: no cluster of two CTAs fits on this device");
    return clusters;
  }();
  const int cols = kGateUp ? kWgBN / 2 : kWgBN;
  const int m_blocks = static_cast<int>(capacity / kWgBM), n_tiles = (N + cols - 1) / cols;
  if (pair) {
    const int clusters = std::min((m_blocks + 1) / 2 * n_tiles, slots);
    launch_cluster(kernel, 2 * clusters, 2, 384, kWgSmem, stream, a_map, b_map, out, route_w,
                   sorted_pairs, block_expert, m_blocks, n_tiles, K, N, x, k_choices);
  } else {
    const int grid = std::min(m_blocks * n_tiles, slots);
    kernel<<<grid, 384, kWgSmem, stream>>>(a_map, b_map, out, route_w, sorted_pairs, block_expert,
                                           m_blocks, n_tiles, K, N, x, k_choices);
  }
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

// The tall form of moe_gemm_wgmma_kernel (moe_tall_enabled; see kTallBM): 256-row M-blocks
// against 192 weight rows a tile, single CTAs, the same producer (gathered rows for gate/up, TMA
// for down), ring and epilogue. Each consumer warpgroup takes 128 rows of the block as two
// 64-row parts, each its own m64n192 accumulator. A part whose first row is padding holds no
// pair (a segment's pairs come first): a consumer whose first part is such multiplies nothing,
// and a second part that is such is multiplied beside the first (a wgmma under a condition of
// its own is serialised) but not stored.
template <bool kGateUp, bool kEarlyRelease>
__global__ void __launch_bounds__(384, 1)
    moe_gemm_tall_kernel(const __grid_constant__ CUtensorMap a_map,
                         const __grid_constant__ CUtensorMap b_map, __nv_bfloat16* out,
                         const float* route_w, const int32_t* sorted_pairs,
                         const int32_t* block_expert, int m_blocks, int n_tiles, int K, int N,
                         const __nv_bfloat16* x, int k_choices) {
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kWgStages * kTallStageBytes);
  uint64_t* empty = full + kWgStages;
  const int tid = threadIdx.x, wg = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < kWgStages; ++s) {
      mbar_init(&full[s], kGateUp ? 1 + 128 : 1);
      mbar_init(&empty[s], 8);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();
  const WgWork<false> work(m_blocks, n_tiles);
  const int k_tiles = (K + kWgBK - 1) / kWgBK;

  if (wg == 0) {  // producer
    setmaxnreg_dec<kTallProducerRegs>();
    if constexpr (kGateUp) {
      gather_producer<false, kTallBM, TallGateUpBoxes>(smem, full, empty, b_map, x, sorted_pairs,
                                                       block_expert, work, k_choices, K, N);
    } else if (tid == 0) {
      int it = 0;
      for (int u = work.first; u < work.units; u += work.stride) {
        const WgTile t = wg_tile(work, u, block_expert);
        if (t.skip) continue;
        const int m0 = t.mb * kTallBM;
        const int r0 = t.e * N + t.nt * kTallBN;  // weight rows r0.. of the [E * N, K] matrix
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
          const int s = it % kWgStages;
          if (it >= kWgStages) mbar_wait(&empty[s], ((it / kWgStages) - 1) & 1);
          unsigned char* st = smem + s * kTallStageBytes;
          mbar_arrive_expect_tx(&full[s], kTallStageBytes);
          const int k0 = kt * kWgBK;
#pragma unroll
          for (int b = 0; b < kTallBM / 64; ++b) {
            tma_load_2d(st + b * kWgBox, &a_map, &full[s], k0, m0 + 64 * b);
          }
          tma_load_4d(st + kTallABytes, &b_map, &full[s], 0, 0, kt, r0 / kTiledGroupRows);
        }
      }
    }
  } else {
    setmaxnreg_inc<kTallConsumerRegs>();
    const int cw = wg - 1;
    const int warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
    const auto release = [&](int s) {
      if (lane == 0) mbar_arrive(&empty[s]);
    };
    int it = 0;
    for (int u = work.first; u < work.units; u += work.stride) {
      const WgTile t = wg_tile(work, u, block_expert);
      if (t.skip) continue;
      const int n0 = t.nt * (kGateUp ? kTallBN / 2 : kTallBN);
      const int m1 = t.mb * kTallBM + cw * 128;  // this consumer's first row
      const bool live0 = sorted_pairs[m1] >= 0, live1 = sorted_pairs[m1 + 64] >= 0;
      float acc0[kTallBN / 2], acc1[kTallBN / 2];
#pragma unroll
      for (int i = 0; i < kTallBN / 2; ++i) acc0[i] = acc1[i] = 0.0f;
      // Both parts where the first holds pairs (a wgmma under a condition of its own is
      // serialised).
      consume_tile<kGateUp, kEarlyRelease, kTallStageBytes>(
          smem, full, it, k_tiles, live0,
          [&](const unsigned char* st) {
#pragma unroll
            for (int ks = 0; ks < kWgBK / 16; ++ks) {
              const uint64_t b = wgmma_desc_sw128(st + kTallABytes + ks * 32);
              wgmma_m64n192k16(acc0, wgmma_desc_sw128(st + 2 * cw * kWgBox + ks * 32), b);
              wgmma_m64n192k16(acc1, wgmma_desc_sw128(st + (2 * cw + 1) * kWgBox + ks * 32), b);
            }
          },
          release);
      if (live0) {
        wgmma_store_tile<kGateUp, true, kTallBN>(acc0, out, route_w, sorted_pairs, m1, 0, n0, N,
                                                 warp, g, c);
      }
      if (live1) {
        wgmma_store_tile<kGateUp, true, kTallBN>(acc1, out, route_w, sorted_pairs, m1 + 64, 0, n0,
                                                 N, warp, g, c);
      }
    }
  }
}

// The tall GEMMs' launch: one persistent CTA an SM over the (256-row block, 192-row tile) units.
template <bool kGateUp>
void launch_tall(__nv_bfloat16* out, const CUtensorMap& a_map, const CUtensorMap& b_map,
                 const float* route_w, const int32_t* sorted_pairs, const int32_t* block_expert,
                 int64_t capacity, int K, int N, const __nv_bfloat16* x, int k_choices,
                 cudaStream_t stream) {
  static const bool early = new_path_enabled("ERNIE_WG_EARLY_RELEASE");
  const auto kernel =
      early ? moe_gemm_tall_kernel<kGateUp, true> : moe_gemm_tall_kernel<kGateUp, false>;
  static const int slots = [&] {
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kTallSmem)));
    return device_sms();
  }();
  const int cols = kGateUp ? kTallBN / 2 : kTallBN;
  const int m_blocks = static_cast<int>(capacity / kTallBM), n_tiles = (N + cols - 1) / cols;
  const int grid = std::min(m_blocks * n_tiles, slots);
  kernel<<<grid, 384, kTallSmem, stream>>>(a_map, b_map, out, route_w, sorted_pairs, block_expert,
                                           m_blocks, n_tiles, K, N, x, k_choices);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

// ---- Mid batches, swapped: the weights as wgmma's M side (ERNIE_MOE_SWAP_AB=0: off) ----
//
// The 32-row blocks (9-32 pairs per expert) on wgmma with the roles swapped: a CTA's 128
// weight rows (gate/up: 64 gate rows and the 64 up rows of the same outputs; down: 128 output
// columns) are the M side, two m64 halves, and the block's 32 pair rows the N side
// (m64n32k16), so a 24-pair block multiplies 32 rows, as the mma.sync tiles do, but on the
// asynchronous tensor cores and with no fragment loads: the kernel has nothing to do but keep
// the weights streaming. One warpgroup: thread 0 brings each K slice's two 64-row weight boxes
// by TMA (the prefill kernel's 4-D map over the tiled layout), every thread two 16-byte pieces
// of the slice's activation rows by cp.async into the same 128-byte swizzle (gathered from x
// for gate/up), kSwStages slices in flight. Each thread then holds, for 8 of the block's rows,
// gate and up (or down's two halves) of the same output columns: SwiGLU and the routing weight
// stay in registers. Grid, launch order and readiness counters as moe_gemm_kernel's.
// The same kernel with BN = 64 pair rows (m64n64k16) takes the 64-row blocks of 33-64 pairs an
// expert on average (moe_wide_swap_enabled): one block an expert where two 32-row ones would
// each stream its weights (the nineteenth round measured that: +25% on the 512-token layer).
// kPairs (BN = 64 over the 32-row layout, moe_pair_blocks): the same per expert inside a batch
// of 32-row blocks. An expert of exactly two blocks (33-64 pairs; at 256 tokens of the 21B
// model a few of the 64 experts, at 320 a third) has both taken by the first block's CTAs, 64
// rows as N, and the second block's CTAs leave at once; every other block is computed as 32
// rows with 32 empty ones. The rule (pair_role, moe.cuh) reads only block_expert, so gate/up
// and down agree on it, and a lead gate/up CTA counts each stored tile for both blocks.
constexpr int kSwRows = 128;  // weight rows per CTA
// K slices in flight (two CTAs an SM for BN 32 and 64; H100, 256 x 1000: 3 stages and three CTAs
// an SM +0.5%, 5 stages no gain, docs/performance.md thirty-first round).
constexpr int kSwStages = 4;
// A K slice of the block's BN rows; a stage: the two weight boxes, then that slice (20 KB for
// BN 32, 24 KB for 64; 1024-byte aligned parts).
constexpr int sw_a_bytes(int bn) {
  return bn * 128;
}
constexpr int sw_stage_bytes(int bn) {
  return 2 * kWgBox + sw_a_bytes(bn);
}
constexpr size_t sw_smem(int bn) {
  return static_cast<size_t>(kSwStages) * sw_stage_bytes(bn) + 1024;
}
static_assert(sw_a_bytes(kMoeBlockMid) % 1024 == 0 && sw_a_bytes(kMoeBlockWide) % 1024 == 0);

// The swapped kernel's parts.
//
// Thread 0: a K slice's two weight boxes (rows row0 and row1 of the stacked weights) into
// stage `st`, completing on `bar`.
__device__ __forceinline__ void swap_load_weights(unsigned char* st, uint64_t* bar,
                                                  const CUtensorMap* map, int kt, int row0,
                                                  int row1) {
  mbar_arrive_expect_tx(bar, 2 * kWgBox);
  tma_load_4d(st, map, bar, 0, 0, kt, row0 / kTiledGroupRows);
  tma_load_4d(st + kWgBox, map, bar, 0, 0, kt, row1 / kTiledGroupRows);
}

// This thread's activation rows of a block whose first layout row is m0 (tid / 8 + 16 i; null
// for padding, and past `rows` for kPairs): gathered from x by pair for gate/up, the block's
// own rows of act for down.
template <bool kGateUp, int BN, bool kPairs>
__device__ __forceinline__ void swap_act_rows(const __nv_bfloat16* (&a_row)[BN / 16],
                                              const __nv_bfloat16* a_src,
                                              const int32_t* sorted_pairs, int m0, int rows,
                                              int k_choices, int K, int tid) {
#pragma unroll
  for (int i = 0; i < BN / 16; ++i) {
    const int r = tid / 8 + 16 * i;
    const int pair = !kPairs || r < rows ? __ldcg(sorted_pairs + m0 + r) : -1;
    const int64_t src = kGateUp ? pair / k_choices : m0 + r;
    a_row[i] = pair >= 0 ? a_src + src * K : nullptr;
  }
}

// This thread's 16-byte pieces of K slice kt's activation rows into a stage's activation part.
template <int BN>
__device__ __forceinline__ void swap_load_act(unsigned char* st_a,
                                              const __nv_bfloat16* const (&a_row)[BN / 16],
                                              const int (&a_off)[BN / 16],
                                              const __nv_bfloat16* a_src, int kt, int K, int ch) {
  const int kk = kt * kWgBK + ch * 8;
#pragma unroll
  for (int i = 0; i < BN / 16; ++i) {
    const bool ok = a_row[i] != nullptr && kk < K;
    cp_async_16(st_a + a_off[i], ok ? a_row[i] + kk : a_src, ok);
  }
}

// The pairs of the rows this thread's accumulators hold (8 i + 2 c + j; -1 for padding and,
// for kPairs, past `rows`) and, for down, their routing weights.
template <bool kGateUp, int BN, bool kPairs>
__device__ __forceinline__ void swap_epilogue_rows(int (&ep_pair)[BN / 4], float (&ep_w)[BN / 4],
                                                   const int32_t* sorted_pairs,
                                                   const float* route_w, int m0, int rows, int c) {
#pragma unroll
  for (int q = 0; q < BN / 4; ++q) {
    const int32_t* at = sorted_pairs + m0 + 8 * (q / 2) + 2 * c + q % 2;
    ep_pair[q] = !kPairs || at < sorted_pairs + m0 + rows ? __ldcg(at) : -1;
    ep_w[q] = !kGateUp && ep_pair[q] >= 0 ? route_w[ep_pair[q]] : 0.0f;
  }
}

// One K slice's multiplies from stage `st` (its weight boxes landed, its activations fenced).
template <int BN>
__device__ __forceinline__ void swap_mma_slice(float (&acc0)[BN / 2], float (&acc1)[BN / 2],
                                               const unsigned char* st) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kWgBK / 16; ++ks) {
    const uint64_t b = wgmma_desc_sw128(st + 2 * kWgBox + ks * 32);
    if constexpr (BN == 32) {
      wgmma_m64n32k16(acc0, wgmma_desc_sw128(st + ks * 32), b);
      wgmma_m64n32k16(acc1, wgmma_desc_sw128(st + kWgBox + ks * 32), b);
    } else {
      static_assert(BN == 64);
      wgmma_m64n64k16(acc0, wgmma_desc_sw128(st + ks * 32), b, 1);
      wgmma_m64n64k16(acc1, wgmma_desc_sw128(st + kWgBox + ks * 32), b, 1);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(acc0);
  fence_regs(acc1);
}

// The outputs from the accumulators; acc[4 i + 2 h + j]: weight row 16 warp + g + 8 h of its
// box, block row 8 i + 2 c + j. Gate/up: SwiGLU of gate (box 0) and up (box 1); down: box 0
// columns n0.., box 1 n0 + 64.., times the routing weight.
template <bool kGateUp, int BN>
__device__ __forceinline__ void swap_store(const float (&acc0)[BN / 2], const float (&acc1)[BN / 2],
                                           const int (&ep_pair)[BN / 4],
                                           const float (&ep_w)[BN / 4], __nv_bfloat16* out, int m0,
                                           int n0, int N, int warp, int g, int c) {
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int q = 2 * i + j;
      if (ep_pair[q] < 0) continue;
      __nv_bfloat16* orow = out + static_cast<size_t>(m0 + 8 * i + 2 * c + j) * N;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = n0 + 16 * warp + g + 8 * h;
        const float v0 = acc0[4 * i + 2 * h + j], v1 = acc1[4 * i + 2 * h + j];
        if (kGateUp) {
          if (col < N) orow[col] = __float2bfloat16(v0 / (1.0f + __expf(-v0)) * v1);
        } else {
          if (col < N) orow[col] = __float2bfloat16(v0 * ep_w[q]);
          if (col + 64 < N) orow[col + 64] = __float2bfloat16(v1 * ep_w[q]);
        }
      }
    }
  }
}

template <bool kGateUp, int BN, bool kPairs = false>
__global__ void __launch_bounds__(128)
    moe_gemm_swap_kernel(const __grid_constant__ CUtensorMap w_map, __nv_bfloat16* out,
                         const __nv_bfloat16* a_src, const float* route_w,
                         const int32_t* sorted_pairs, const int32_t* block_expert, int k_choices,
                         int K, int N, const BlockReady ready) {
  static_assert(!kPairs || BN == 64);
  const bool block_major = ready.counters != nullptr;
  const int mb = block_major ? blockIdx.y : blockIdx.x;
  const int nb = block_major ? blockIdx.x : blockIdx.y;
  // As moe_gemm_kernel: gate/up waits (its routing), then lets down launch; down reads the
  // layout before its wait and waits for gate/up's rows before its first activation load.
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  __shared__ uint64_t full[kSwStages];  // a slice's weight boxes have landed
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  constexpr int kBlockRows = kPairs ? BN / 2 : BN;
  const int m0 = mb * kBlockRows;
  const int n0 = nb * (kGateUp ? kSwRows / 2 : kSwRows);  // the tile's first output column
  const int k_tiles = (K + kWgBK - 1) / kWgBK;
  if constexpr (kGateUp) asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int e = __ldcg(block_expert + mb);
  // Rows of the layout a block holds, and of them the rows this CTA computes (kPairs: 64 for a
  // pair's lead, else 32; rows past them are padding).
  int rows = BN;
  bool lead = false;
  if constexpr (kPairs) {
    const int blocks = block_major ? gridDim.y : gridDim.x;
    const auto expert_at = [&](int b) {
      return b >= 0 && b < blocks ? __ldcg(block_expert + b) : -1;
    };
    const PairRole role =
        pair_role(expert_at(mb - 2), expert_at(mb - 1), e, expert_at(mb + 1), expert_at(mb + 2));
    if (role == kPairFollower) return;
    lead = role == kPairLead;
    rows = lead ? BN : kBlockRows;
  }
  if (e < 0) return;
  // The two boxes' first weight rows in the stacked [E * 2N, K] or [E * N, K] weights (rows of
  // a last partial tile past the expert's are read, or zero-filled past the tensor, and unused),
  // and the first slices' weights, issued before anything else is read (thread 0 alone uses the
  // barriers until the CTA barrier below).
  const int row0 = kGateUp ? e * 2 * N + n0 : e * N + n0;
  const int row1 = kGateUp ? row0 + N : row0 + 64;
  auto load_w = [&](int kt) {
    if (tid == 0) {
      swap_load_weights(smem + (kt % kSwStages) * sw_stage_bytes(BN), &full[kt % kSwStages], &w_map,
                        kt, row0, row1);
    }
  };
  if (tid == 0) {
    for (int s = 0; s < kSwStages; ++s) mbar_init(&full[s], 1);
    mbar_init_fence();
  }
  for (int kt = 0; kt < kSwStages - 1; ++kt) {
    if (kt < k_tiles) load_w(kt);
  }
  // This thread's activation pieces of each slice: rows tid / 8 + 16 i, piece tid % 8; and the
  // pairs of the rows its accumulators hold.
  constexpr int kRowsPerThread = BN / 16;
  const int ch = tid % 8;
  const __nv_bfloat16* a_row[kRowsPerThread];
  int a_off[kRowsPerThread];
  swap_act_rows<kGateUp, BN, kPairs>(a_row, a_src, sorted_pairs, m0, rows, k_choices, K, tid);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) a_off[i] = stage_piece_offset(tid / 8 + 16 * i, ch);
  int ep_pair[BN / 4];
  float ep_w[BN / 4];
  swap_epilogue_rows<kGateUp, BN, kPairs>(ep_pair, ep_w, sorted_pairs, route_w, m0, rows, c);
  __syncthreads();  // the barriers' init
  auto load_a = [&](int kt) {
    swap_load_act<BN>(smem + (kt % kSwStages) * sw_stage_bytes(BN) + 2 * kWgBox, a_row, a_off,
                      a_src, kt, K, ch);
  };
  if constexpr (!kGateUp) wait_for_rows(ready, block_major, mb, tid);
  for (int kt = 0; kt < kSwStages - 1; ++kt) {
    if (kt < k_tiles) load_a(kt);
    cp_async_commit();
  }
  // Box 0 (gate / columns n0..) and box 1 (up / columns n0 + 64..).
  float acc0[BN / 2], acc1[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc0[i] = acc1[i] = 0.0f;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kSwStages - 2>();  // this thread's pieces of slice kt have landed
    fence_proxy_async();             // for the tensor cores
    // Everyone's pieces of slice kt are in, and everyone's wgmma of slice kt - 1 is complete
    // (waited for below), so its stage may be refilled.
    __syncthreads();
    const int next = kt + kSwStages - 1;
    if (next < k_tiles) {
      load_w(next);
      load_a(next);
    }
    cp_async_commit();
    mbar_wait(&full[kt % kSwStages], (kt / kSwStages) & 1);
    swap_mma_slice<BN>(acc0, acc1, smem + (kt % kSwStages) * sw_stage_bytes(BN));
  }
  cp_async_wait<0>();
  swap_store<kGateUp, BN>(acc0, acc1, ep_pair, ep_w, out, m0, n0, N, warp, g, c);
  // gate/up counts each stored tile for down's wait (the target: gate/up's column tiles).
  if constexpr (kGateUp) {
    if (block_major) {
      __syncthreads();  // every thread's rows stored
      if (tid == 0) {
        red_add_release_gpu(ready.counters + mb, 1);
        if (lead) red_add_release_gpu(ready.counters + mb + 1, 1);  // kPairs: both blocks
      }
    }
  }
}

// The 32-row blocks run on moe_gemm_swap_kernel (gate/up and down alike: down's readiness
// target counts gate/up's column tiles). H100, steps 128 and 256 x 1000 -0.4% and -0.6% against
// the mma.sync tiles, 256 prompts +0.5% (docs/performance.md, twenty-eighth round);
// ERNIE_MOE_SWAP_AB=0 runs the mma.sync tiles.
bool swap_ab_enabled() {
  static const bool on = path_enabled("ERNIE_MOE_SWAP_AB");
  return on;
}

// w_rows: the stacked weights' rows (experts * 2N for gate/up, experts * N for down). kPairs:
// BN = 64 over a layout of 32-row blocks.
template <bool kGateUp, int BN, bool kPairs = false>
void launch_swap_rows(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* w,
                      int64_t w_rows, const float* route_w, const int32_t* sorted_pairs,
                      const int32_t* block_expert, int64_t capacity, int k, int K, int N,
                      int32_t* block_ready, cudaStream_t stream) {
  constexpr int block_rows = kPairs ? BN / 2 : BN;
  require_gemm_shape(K, N, capacity, block_rows);
  constexpr size_t smem = sw_smem(BN);
  constexpr auto kernel = moe_gemm_swap_kernel<kGateUp, BN, kPairs>;
  static bool configured = false;
  if (!configured) {
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    configured = true;
  }
  constexpr int gate_up_cols = kSwRows / 2;
  constexpr int cols = kGateUp ? gate_up_cols : kSwRows;
  BlockReady ready;
  if (block_ready != nullptr) {
    ready = BlockReady{block_ready, kGateUp ? 0 : (K + gate_up_cols - 1) / gate_up_cols};
  }
  const CUtensorMap map = tensor_map_bf16_tiled(w, w_rows, tiled_cols(K), 64 / kTiledGroupRows);
  const unsigned m_blocks = static_cast<unsigned>(capacity / block_rows);
  const unsigned n_ctas = (N + cols - 1) / cols;
  const dim3 grid = ready.counters != nullptr ? dim3(n_ctas, m_blocks) : dim3(m_blocks, n_ctas);
  launch_pdl(kernel, grid, 128, smem, stream, map, out, a, route_w, sorted_pairs, block_expert, k,
             K, N, ready);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

// Whether the swapped kernel takes blocks of block_m rows: 32-row ones unless
// ERNIE_MOE_SWAP_AB=0 (never with folded experts), 64-row ones always (moe_block_m gives those
// only with it on).
bool takes_swap(int block_m, const SharedFold& fold) {
  if (block_m == kMoeBlockWide) {
    require(fold.experts == 0 && swap_ab_enabled(), "MoE: 64-row blocks need the swapped kernel");
    return true;
  }
  return block_m == kMoeBlockMid && fold.experts == 0 && swap_ab_enabled();
}

// launch_swap_rows for blocks of block_m rows (takes_swap) in the call's form: the 32-row ones
// paired or not.
template <bool kGateUp>
void launch_swap(int block_m, const MoeSwapForm& form, __nv_bfloat16* out, const __nv_bfloat16* a,
                 const __nv_bfloat16* w, int64_t w_rows, const float* route_w,
                 const int32_t* sorted_pairs, const int32_t* block_expert, int64_t capacity, int k,
                 int K, int N, int32_t* block_ready, cudaStream_t stream) {
  constexpr int kWide = kMoeBlockWide, kMid = kMoeBlockMid;
  auto* launch = block_m == kWide   ? launch_swap_rows<kGateUp, kWide>
                 : form.pair_blocks ? launch_swap_rows<kGateUp, kWide, true>
                                    : launch_swap_rows<kGateUp, kMid>;
  launch(out, a, w, w_rows, route_w, sorted_pairs, block_expert, capacity, k, K, N, block_ready,
         stream);
}

// Paired blocks only where moe_pair_blocks may give them (32-row blocks on the swapped kernel
// without a fold).
void require_form_fits(const MoeSwapForm& form, int block_m, const SharedFold& fold) {
  require_parts(
      !form.pair_blocks || (block_m == kMoeBlockMid && fold.experts == 0 && swap_ab_enabled()),
      "MoE: paired blocks need 32-row blocks on the swapped kernel without folded "
      "experts, not blocks of ",
      block_m, fold.experts > 0 ? " with a fold" : "",
      swap_ab_enabled() ? "" : " (ERNIE_MOE_SWAP_AB=0)");
}

// What the combine sums for a token: routed: y's routed rows (the routed layout's first row),
// the token's k rows of them by pair_pos; folded: the folded shared experts' count, expert s's
// f32 row of token t at s * fold_stride + t of fold_out (their sum, rounded to bf16, is the
// shared experts' output); shared: the unfolded shared experts' output, or null.
struct CombineSrc {
  const __nv_bfloat16* routed;
  const int32_t* pair_pos;
  const __nv_bfloat16* shared;
  const float* fold_out;
  int64_t fold_stride;
  int k, hidden, folded;
  bool loads_first = false;  // combine_vec8's up-front loads (ERNIE_LATENCY_LOADS=0: off)
};

// Adds the eight bf16 values of v to acc.
__device__ inline void add_bf16x8(float (&acc)[8], const uint4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = __bfloat1622float2(h[q]);
    acc[2 * q] += f.x;
    acc[2 * q + 1] += f.y;
  }
}

// sh += the eight floats of a and b.
__device__ inline void add_f32x8(float (&sh)[8], const float4& a, const float4& b) {
  const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int q = 0; q < 8; ++q) sh[q] += v[q];
}

// acc += sh, each rounded to bf16 first (the folded experts' sum as the unfolded GEMM's output).
__device__ inline void add_rounded(float (&acc)[8], const float (&sh)[8]) {
#pragma unroll
  for (int q = 0; q < 8; ++q) acc[q] += __bfloat162float(__float2bfloat16(sh[q]));
}

// Up to these many routed and folded experts combine_vec8 issues every load of its vector
// before the first sum, the routed rows at the token's pair positions read from shared memory
// (load_pair_pos): the kernel makes one trip to L2 for the positions, then one for the rows.
// Loops over them wait for each load in turn (the combine is latency-bound at a few tokens: at
// one token a loop made nine trips, 5.7 us of a 78 us layer; now 2.9 us, H200).
constexpr int kCombineMaxK = 8, kCombineMaxFolded = 4;

// Token t's pair positions into pos[kCombineMaxK] (shared memory), when combine_vec8 takes them
// from there; every thread of the CTA calls it, and a barrier follows before combine_vec8.
__device__ inline void load_pair_pos(int* pos, const CombineSrc& c, size_t t) {
  if (c.loads_first && c.k <= kCombineMaxK && static_cast<int>(threadIdx.x) < c.k) {
    pos[threadIdx.x] = c.pair_pos[t * c.k + threadIdx.x];
  }
}

// Columns i .. i + 7 of token t's sum (hidden % 8 == 0): f32, in a fixed order (the routed rows
// in choice order, the folded experts' sum rounded to bf16, the shared row), rounded once.
// pos: load_pair_pos's positions. kMaxFolded: the most folded experts the call may have (0:
// none; their loads then take no registers).
template <int kMaxFolded = kCombineMaxFolded>
__device__ inline uint4 combine_vec8(const CombineSrc& c, size_t t, int i, const int* pos) {
  float acc[8] = {};
  uint4 shared = make_uint4(0, 0, 0, 0);
  if (c.loads_first && c.k <= kCombineMaxK && c.folded <= kMaxFolded) {
    float4 fold[kMaxFolded > 0 ? kMaxFolded : 1][2];
#pragma unroll
    for (int s = 0; s < kMaxFolded; ++s) {
      if (s < c.folded) {
        const float4* src =
            reinterpret_cast<const float4*>(c.fold_out + (s * c.fold_stride + t) * c.hidden + i);
        fold[s][0] = src[0];
        fold[s][1] = src[1];
      }
    }
    if (c.shared) shared = *reinterpret_cast<const uint4*>(c.shared + t * c.hidden + i);
    uint4 routed[kCombineMaxK];
#pragma unroll
    for (int j = 0; j < kCombineMaxK; ++j) {
      if (j < c.k) {
        routed[j] =
            *reinterpret_cast<const uint4*>(c.routed + static_cast<size_t>(pos[j]) * c.hidden + i);
      }
    }
#pragma unroll
    for (int j = 0; j < kCombineMaxK; ++j) {
      if (j < c.k) add_bf16x8(acc, routed[j]);
    }
    if (kMaxFolded > 0 && c.folded > 0) {
      float sh[8] = {};
#pragma unroll
      for (int s = 0; s < kMaxFolded; ++s) {
        if (s < c.folded) add_f32x8(sh, fold[s][0], fold[s][1]);
      }
      add_rounded(acc, sh);
    }
  } else {
    for (int j = 0; j < c.k; ++j) {
      add_bf16x8(acc, *reinterpret_cast<const uint4*>(
                          c.routed + static_cast<size_t>(c.pair_pos[t * c.k + j]) * c.hidden + i));
    }
    if (kMaxFolded > 0 && c.folded > 0) {  // the folded experts' f32 partials, 2 loads each
      float sh[8] = {};
      for (int s = 0; s < c.folded; ++s) {
        const float4* src =
            reinterpret_cast<const float4*>(c.fold_out + (s * c.fold_stride + t) * c.hidden + i);
        add_f32x8(sh, src[0], src[1]);
      }
      add_rounded(acc, sh);
    }
    if (c.shared) shared = *reinterpret_cast<const uint4*>(c.shared + t * c.hidden + i);
  }
  if (c.shared) add_bf16x8(acc, shared);
  uint4 o;
  __nv_bfloat162* oh = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
  for (int q = 0; q < 4; ++q) oh[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
  return o;
}

// The most threads a CTA of moe_combine_norm_kernel: without folded experts 1024 (a row of up
// to 8192 columns, one 16-byte vector a thread; the bound keeps it at 64 registers, so that
// such a CTA launches at all and three 320-thread CTAs share a multiprocessor); with them 512
// (their loads take up to 128 registers; only decode steps of models with shared experts
// fold). moe_combine_kernel loops over the row: at most kCombineThreads.
constexpr int combine_max_threads(int max_folded) {
  return max_folded == 0 ? 1024 : 512;
}
constexpr int kCombineThreads = 512;

template <int kMaxFolded>
__global__ void __launch_bounds__(kCombineThreads)
    moe_combine_kernel(__nv_bfloat16* out, const CombineSrc c) {
  pdl_begin();
  const size_t t = blockIdx.x;
  const int hidden = c.hidden;
  if (hidden % 8 == 0) {  // 16-byte loads: eight columns per thread
    __shared__ int pos[kCombineMaxK];
    load_pair_pos(pos, c, t);
    __syncthreads();
    for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8) {
      *reinterpret_cast<uint4*>(out + t * hidden + i) = combine_vec8<kMaxFolded>(c, t, i, pos);
    }
    return;
  }
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < c.k; ++j) {
      acc += __bfloat162float(c.routed[static_cast<size_t>(c.pair_pos[t * c.k + j]) * hidden + i]);
    }
    if (kMaxFolded > 0 && c.folded > 0) {
      float v = 0.0f;
      for (int s = 0; s < c.folded; ++s) v += c.fold_out[(s * c.fold_stride + t) * hidden + i];
      acc += __bfloat162float(__float2bfloat16(v));
    }
    if (c.shared) acc += __bfloat162float(c.shared[t * hidden + i]);
    out[t * hidden + i] = __float2bfloat16(acc);
  }
}

// moe_combine_kernel with one 16-byte vector per thread (the host checks that one covers the
// row), then the next layer's residual add and RMSNorm of the row, computed as
// fused_add_rms_norm_vec_kernel computes them (norm_parts.cuh); ERNIE_FUSED_MOE_NORM=0
// (cuda_backend.cc) goes back to the two kernels. kEarlyPos (the default for decode tiles with
// loads_first and k <= kCombineMaxK; ERNIE_COMBINE_EARLY_POS=0 turns it off; step 1 x 1000
// -0.45%, never slower, in the twelfth round's A/B): the pair
// positions come by cp.async before the wait, so every load after it (routed rows, residual,
// weights) is one trip instead of two. The router's layout is complete by then: the routed
// gate/up blocks let down launch only after waiting for the router, and down lets this kernel
// launch only after that.
template <bool kEarlyPos, int kMaxFolded>
__global__ void __launch_bounds__(combine_max_threads(kMaxFolded))
    moe_combine_norm_kernel(__nv_bfloat16* out, const CombineSrc c, const CombineNorm norm) {
  __shared__ int pos[kCombineMaxK];
  if constexpr (kEarlyPos) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (static_cast<int>(threadIdx.x) < c.k) {
      cp_async_4(pos + threadIdx.x, c.pair_pos + blockIdx.x * c.k + threadIdx.x);
    }
    cp_async_commit();
    asm volatile("griddepcontrol.wait;" ::: "memory");
  } else {
    pdl_begin();
  }
  const size_t t = blockIdx.x;
  const int hidden = c.hidden;
  const bool active = static_cast<int>(threadIdx.x) * 8 < hidden;
  uint4 r{}, weight{};
  float ss = 0.0f;
  // The residual and the norm's weights load with the pair positions.
  uint4* res = reinterpret_cast<uint4*>(norm.residual + t * hidden);
  if (active) {
    r = res[threadIdx.x];
    weight = reinterpret_cast<const uint4*>(norm.weight)[threadIdx.x];
  }
  if constexpr (kEarlyPos) {
    cp_async_wait<0>();
  } else {
    load_pair_pos(pos, c, t);
  }
  __syncthreads();
  if (active) {
    const uint4 o = combine_vec8<kMaxFolded>(c, t, threadIdx.x * 8, pos);
    reinterpret_cast<uint4*>(out + t * hidden)[threadIdx.x] = o;
    add_vec8(r, o);
    res[threadIdx.x] = r;
    ss = squares_vec8(r, ss);
  }
  const float inv = rsqrtf(norm_block_sum(ss) / hidden + norm.eps);
  if (active) {
    reinterpret_cast<uint4*>(norm.normed + t * hidden)[threadIdx.x] = norm_vec8(r, inv, weight);
  }
}

// One thread per 16-byte piece of the tiled matrix: piece q of row r in chunk `chunk` of group
// `group` holds columns chunk * 64 + 8 (q ^ (r % 8)) .. + 7 of row 16 group + r (zeros past K).
__global__ void tile_expert_weights_kernel(__nv_bfloat16* dst, const __nv_bfloat16* src,
                                           int64_t rows, int64_t K, int64_t kp, int64_t ld) {
  const int64_t pieces = rows * kp / 8;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pieces;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = i % 8, r = (i / 8) % kTiledGroupRows;
    const int64_t chunk = (i / (8 * kTiledGroupRows)) % (kp / kTiledChunkCols);
    const int64_t group = i / (8 * kTiledGroupRows * (kp / kTiledChunkCols));
    const int64_t row = group * kTiledGroupRows + r;
    const int64_t col = chunk * kTiledChunkCols + 8 * (q ^ (r % 8));
    uint4 v = make_uint4(0, 0, 0, 0);
    if (col < K) v = *reinterpret_cast<const uint4*>(src + row * ld + col);
    *reinterpret_cast<uint4*>(dst + 8 * i) = v;
  }
}

}  // namespace

void tile_expert_weights(__nv_bfloat16* dst, const __nv_bfloat16* src, int64_t rows, int64_t K,
                         cudaStream_t stream, int64_t ld) {
  if (ld == 0) ld = K;
  require_parts(rows % kTiledGroupRows == 0 && K % 8 == 0 && K > 0 && ld >= K && ld % 8 == 0,
                "tile_expert_weights: a ", rows, " x ", K, " matrix of row stride ", ld,
                " (rows must be a multiple of ", kTiledGroupRows, ", columns and stride of 8)");
  const int64_t pieces = rows * tiled_cols(K) / 8;
  if (pieces == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((pieces + threads - 1) / threads, 1 << 20);
  tile_expert_weights_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      dst, src, rows, K, tiled_cols(K), ld);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

size_t moe_align_scratch_bytes(int pairs, int experts) {
  if (pairs <= kMoeAlignOneCta) return 0;
  return (static_cast<size_t>(align_chunks(pairs)) * experts + experts + 1) * sizeof(int32_t);
}

void moe_align(int32_t* sorted_pairs, int32_t* block_expert, int32_t* pair_pos, const int32_t* ids,
               int pairs, int experts, int block_m, void* scratch, cudaStream_t stream,
               int32_t* block_ready) {
  if (pairs == 0) return;
  require(experts > 0 && experts <= 1024, "moe_align: at most 1024 experts");
  const int64_t capacity = moe_capacity(pairs, experts, block_m);
  const int num_blocks = static_cast<int>(capacity / block_m);
  if (pairs <= kMoeAlignOneCta) {
    launch_pdl(moe_align_kernel, 1, kAlignThreads, 0, stream, sorted_pairs, block_expert, pair_pos,
               block_ready, ids, pairs, experts, block_m, num_blocks);
    ERNIE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  require(scratch != nullptr, "moe_align: many pairs need scratch (moe_align_scratch_bytes)");
  const int chunks = align_chunks(pairs);
  auto* counts = static_cast<int32_t*>(scratch);
  int32_t* segments = counts + static_cast<size_t>(chunks) * experts;
  launch_pdl(moe_align_count_kernel, chunks, kAlignSpreadThreads, 0, stream, counts, sorted_pairs,
             capacity, ids, pairs, experts);
  launch_pdl(moe_align_offsets_kernel, 1, kAlignThreads, 0, stream, counts, segments, block_expert,
             block_ready, chunks, experts, block_m, num_blocks);
  launch_pdl(moe_align_place_kernel, chunks, kAlignSpreadThreads, 0, stream, sorted_pairs, pair_pos,
             counts, segments, ids, pairs, experts);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

SharedFoldMaps shared_fold_maps(const __nv_bfloat16* gate_up, const __nv_bfloat16* down,
                                int64_t hidden, int64_t shared_inter) {
  return SharedFoldMaps{tensor_map_bf16_sw128(gate_up, 2 * shared_inter, hidden, kTiledGroupRows),
                        tensor_map_bf16_sw128(down, hidden, shared_inter, kTiledGroupRows)};
}

bool moe_pair_blocks(int64_t pairs, int experts, int block_m) {
  static const bool on = path_enabled("ERNIE_MOE_PAIR_BLOCKS") && swap_ab_enabled();
  return on && block_m == kMoeBlockMid && pairs >= int64_t{kMoePairMinAverage} * experts;
}

bool moe_wide_swap_enabled() {
  static const bool on = path_enabled("ERNIE_MOE_WIDE_SWAP") && swap_ab_enabled();
  return on;
}

bool moe_tall_enabled() {
  static const bool on = new_path_enabled("ERNIE_WG_TALL");
  return on;
}

void moe_gate_up(__nv_bfloat16* act, const __nv_bfloat16* x, const __nv_bfloat16* w_gate_up,
                 const int32_t* sorted_pairs, const int32_t* block_expert, int64_t capacity,
                 int block_m, int k, int hidden, int inter, int experts, cudaStream_t stream,
                 const SharedFold& fold, int32_t* block_ready, const MoeSwapForm& form) {
  require_form_fits(form, block_m, fold);
  if (capacity == 0) return;
  if (moe_wgmma_block(block_m)) {
    require(fold.experts == 0, "MoE wgmma GEMM: shared experts cannot be folded");
    require_parts(hidden % 8 == 0 && inter % 8 == 0, "MoE wgmma GEMM: hidden ", hidden,
                  " and intermediate ", inter, " must be multiples of 8");
    const bool tall = block_m == kMoeBlockTall;
    const CUtensorMap b =
        tensor_map_bf16_tiled(w_gate_up, static_cast<int64_t>(experts) * 2 * inter,
                              tiled_cols(hidden), tall ? kTallGroups : 64 / kTiledGroupRows);
    auto* launch = tall ? launch_tall<true> : launch_wgmma<true>;
    launch(act, CUtensorMap{}, b, nullptr, sorted_pairs, block_expert, capacity, hidden, inter, x,
           k, stream);
    return;
  }
  if (takes_swap(block_m, fold)) {
    launch_swap<true>(block_m, form, act, x, w_gate_up, static_cast<int64_t>(experts) * 2 * inter,
                      nullptr, sorted_pairs, block_expert, capacity, k, hidden, inter, block_ready,
                      stream);
    return;
  }
  launch_gemm<true>(act, x, w_gate_up, nullptr, sorted_pairs, block_expert, capacity, block_m, k,
                    hidden, inter, fold_args(fold, block_m, true), block_ready, stream);
}

void moe_down(__nv_bfloat16* y, const __nv_bfloat16* act, const __nv_bfloat16* w_down,
              const float* weights, const int32_t* sorted_pairs, const int32_t* block_expert,
              int64_t capacity, int block_m, int hidden, int inter, int experts,
              cudaStream_t stream, const SharedFold& fold, int32_t* block_ready,
              const MoeSwapForm& form) {
  require_form_fits(form, block_m, fold);
  if (capacity == 0) return;
  if (moe_wgmma_block(block_m)) {
    require(fold.experts == 0, "MoE wgmma GEMM: shared experts cannot be folded");
    const bool tall = block_m == kMoeBlockTall;
    const CUtensorMap a = tensor_map_bf16_sw128(act, capacity, inter, 64);
    const CUtensorMap b =
        tensor_map_bf16_tiled(w_down, static_cast<int64_t>(experts) * hidden, tiled_cols(inter),
                              (tall ? kTallBN : 64) / kTiledGroupRows);
    auto* launch = tall ? launch_tall<false> : launch_wgmma<false>;
    launch(y, a, b, weights, sorted_pairs, block_expert, capacity, inter, hidden, nullptr, 1,
           stream);
    return;
  }
  if (takes_swap(block_m, fold)) {
    launch_swap<false>(block_m, form, y, act, w_down, static_cast<int64_t>(experts) * hidden,
                       weights, sorted_pairs, block_expert, capacity, 1, inter, hidden, block_ready,
                       stream);
    return;
  }
  launch_gemm<false>(y, act, w_down, weights, sorted_pairs, block_expert, capacity, block_m, 1,
                     inter, hidden, fold_args(fold, block_m, false), block_ready, stream);
}

void moe_combine(__nv_bfloat16* out, const __nv_bfloat16* y, const int32_t* pair_pos,
                 const __nv_bfloat16* shared, int tokens, int k, int hidden, cudaStream_t stream,
                 const SharedFold& fold, int block_m, const CombineNorm& norm) {
  if (tokens == 0) return;
  require(fold.experts == 0 || (block_m > 0 && fold.tokens == tokens),
          "moe_combine: a fold needs its block size and the step's tokens");
  require(norm.normed == nullptr || moe_combine_norm_fits(hidden),
          "moe_combine: the norm needs hidden % 8 == 0 and hidden <= 8192");
  const int64_t routed_row0 = moe_shared_rows(fold, block_m);
  const int64_t fold_stride = fold.experts > 0 ? routed_row0 / fold.experts : 0;
  // One 16-byte vector per thread where the row allows (a decode step is one pass of loads).
  const int threads = hidden % 8 == 0 ? std::clamp((hidden / 8 + 31) / 32 * 32, 128, 1024) : 128;
  static const bool loads_first = path_enabled("ERNIE_LATENCY_LOADS");  // see route_topk
  const CombineSrc c{y + routed_row0 * hidden,
                     pair_pos,
                     shared,
                     fold.down_out,
                     fold_stride,
                     k,
                     hidden,
                     fold.experts,
                     loads_first};
  // Without folded experts the kernels that leave out the fold's loads: 110 -> 64 registers a
  // thread, three 320-thread CTAs a multiprocessor instead of one (Nsight Compute, 8192 tokens:
  // DRAM at 43%), and rows of 8192 columns launch at all. H200: the 8192-token combine + norm
  // 200 -> 121 us, mixed steps 8 x 1000 prefill + 192 decodes -1.0 to -1.4%, 8000 + 15 -0.3 to
  // -0.8%, decode 256 x 1000 -0.2 to -0.5%. ERNIE_COMBINE_NO_FOLD=0 turns it off (rows then up
  // to 4096 columns with the norm).
  static const bool no_fold = path_enabled("ERNIE_COMBINE_NO_FOLD");
  const bool lean = no_fold && fold.experts == 0;
  require_parts(norm.normed == nullptr || threads <= combine_max_threads(lean ? 0 : 1),
                "moe_combine: a hidden size of ", hidden, " is more than the norm takes",
                lean ? "" : " with folded experts or ERNIE_COMBINE_NO_FOLD=0");
  if (norm.normed != nullptr) {
    static const bool early_pos = path_enabled("ERNIE_COMBINE_EARLY_POS");
    const bool early =
        early_pos && loads_first && k <= kCombineMaxK && block_m > 0 && !moe_wgmma_block(block_m);
    auto* kernel = early ? (lean ? moe_combine_norm_kernel<true, 0>
                                 : moe_combine_norm_kernel<true, kCombineMaxFolded>)
                         : (lean ? moe_combine_norm_kernel<false, 0>
                                 : moe_combine_norm_kernel<false, kCombineMaxFolded>);
    launch_pdl(kernel, tokens, threads, 0, stream, out, c, norm);
  } else {
    launch_pdl(lean ? moe_combine_kernel<0> : moe_combine_kernel<kCombineMaxFolded>, tokens,
               std::min(threads, kCombineThreads), 0, stream, out, c);
  }
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
