// ernie_stream_probe [iterations]: how fast a decode GEMM can stream its weights on this GPU.
// A decode step's expert GEMMs are weight streams: each CTA reads R weight rows of K = 2560
// bf16, 128 of the reduction per pipeline stage. This reads a [rows, K] matrix tile by tile
// the same way, with no math (each stage is only touched), through several copy mechanisms and
// grid shapes, and prints the bandwidth each reaches, beside plain 16-byte loads of as many
// bytes (cuda::measure_read_bandwidth):
//   cp.async   16-byte cp.async per thread, a commit group per stage (the decode GEMM once)
//   tma        two 2-D TMA boxes (64 columns x R rows, 128-byte swizzle) per stage
//   bulk       one contiguous 1-D bulk copy per stage (weights stored tiled, as they are now)
// each either one CTA per tile or persistent (one wave of CTAs, the stages of all of a CTA's
// tiles in one pipeline). Every CTA asks for the decode GEMM's 65 KB of shared memory so that
// as many are resident per SM. Tile counts: a one-token step's gate/up (6 experts x 3072 rows)
// and a 16-token step's (~51 experts). First, the 256-token step's gate/up as the swapped
// kernel streams it (pieces_kernel), alone and with that kernel's fixed costs a CTA, then decode
// attention's K/V stream at 256 x 1024 keys as its kernel's boxes come (attn_stream_kernel),
// over several placements of the caches, in the kernel's CTA order, with a sequence's KV heads
// in consecutive CTAs, and with one CTA a sequence reading whole cache slots
// (attn_slots_kernel).
// PROBE_CLUSTER_GEMM=1 instead times cuda::cluster_gemm on decode batches' dense projections
// beside cuBLAS's default algorithm, then prints where one launch's time goes: each CTA's
// milestones (cluster_gemm's stamps) from the first CTA's start, median and latest over CTAs,
// once right after a launch of the same kernel and once after L2 has been flushed (in a decode
// step the kernel runs once a layer, ~1.5 GB of weight streams apart).
#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <utility>
#include <vector>

#include "backend/cuda/cluster_gemm.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/hopper.cuh"
#include "backend/cuda/memory_ops.cuh"
#include "backend/cuda/mma.cuh"

namespace ernie::cuda {
namespace {

constexpr int kK = 2560, kBK = 128, kLd = kBK + 8;
constexpr int kStagesPerTile = kK / kBK;
constexpr size_t kSmem = 65 * 1024;

enum class Copy { kCpAsync, kTma, kBulk };

// The stages this CTA streams: its tiles blockIdx.x, + gridDim.x, ... each kStagesPerTile long.
__device__ __forceinline__ int ctas_stages(int tiles) {
  const int mine = (tiles - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x;
  return mine * kStagesPerTile;
}
__device__ __forceinline__ int64_t stage_tile(int j) {
  return blockIdx.x + static_cast<int64_t>(j / kStagesPerTile) * gridDim.x;
}

template <int R, int S, Copy kCopy>
__global__ void __launch_bounds__(2 * R)
    stream_kernel(const __nv_bfloat16* w, int64_t row0, int tiles,
                  const __grid_constant__ CUtensorMap map, unsigned* sink) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // 1024-byte aligned stages (the 128-byte swizzle of TMA boxes needs it); kSmem has the room.
  unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  __shared__ uint64_t full[S];
  const int tid = threadIdx.x;
  const int n = ctas_stages(tiles);
  constexpr int kStageBytes = kCopy == Copy::kCpAsync ? R * kLd * 2 : R * kBK * 2;
  auto stage_ptr = [&](int j) { return smem + (j % S) * kStageBytes; };
  if (kCopy != Copy::kCpAsync && tid == 0) {
    for (int s = 0; s < S; ++s) mbar_init(&full[s], 1);
    mbar_init_fence();
  }
  __syncthreads();
  auto issue = [&](int j) {
    const int64_t tile = stage_tile(j);
    const int kt = j % kStagesPerTile;
    if constexpr (kCopy == Copy::kCpAsync) {
      const __nv_bfloat16* base = w + (row0 + tile * R) * kK + kt * kBK;
      auto* dst = reinterpret_cast<__nv_bfloat16*>(stage_ptr(j));
      for (int i = tid; i < R * (kBK / 8); i += 2 * R) {
        const int r = i / (kBK / 8), ch = i % (kBK / 8);
        cp_async_16(dst + r * kLd + ch * 8, base + static_cast<int64_t>(r) * kK + ch * 8, true);
      }
    } else if (tid == 0) {
      uint64_t* bar = &full[j % S];
      mbar_arrive_expect_tx(bar, R * kBK * 2);
      if constexpr (kCopy == Copy::kTma) {
        const int row = static_cast<int>(row0 + tile * R);
        tma_load_2d(stage_ptr(j), &map, bar, kt * kBK, row);
        tma_load_2d(stage_ptr(j) + R * 128, &map, bar, kt * kBK + 64, row);
      } else {
        // Tiled layout: stage (tile, kt) is R x 128 contiguous elements.
        const __nv_bfloat16* src = w + row0 * kK + (tile * kStagesPerTile + kt) * (R * kBK);
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
            "[%3];\n" ::"r"(smem_u32(stage_ptr(j))),
            "l"(src), "r"(R * kBK * 2), "r"(smem_u32(bar))
            : "memory");
      }
    }
  };
  unsigned acc = 0;
  for (int s = 0; s < S - 1; ++s) {
    if (s < n) issue(s);
    if constexpr (kCopy == Copy::kCpAsync) cp_async_commit();
  }
  for (int j = 0; j < n; ++j) {
    if constexpr (kCopy == Copy::kCpAsync) {
      cp_async_wait<S - 2>();
      __syncthreads();
    }
    // The slot refilled now was last read in iteration j - 1 (a barrier since).
    if (j + S - 1 < n) issue(j + S - 1);
    if constexpr (kCopy == Copy::kCpAsync) {
      cp_async_commit();
    } else {
      mbar_wait(&full[j % S], (j / S) & 1);
    }
    const unsigned* p = reinterpret_cast<const unsigned*>(stage_ptr(j));
    acc ^= p[tid] + p[tid + 2 * R];
    if constexpr (kCopy != Copy::kCpAsync) __syncthreads();
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;  // keeps the reads
}

// The probe kernels' ring: n stages through kStages buffers of stage_bytes at `ring`, in order
// (issue(t) fills stage t and arms full[t % kStages]; the first kStages - 1 go out first), each
// stage only touched (two words a thread, `second` words apart, so the copies are not dead)
// before its buffer is refilled. Returns the fold of what was read.
template <int kStages, class Issue>
__device__ __forceinline__ unsigned consume_ring(const unsigned char* ring, uint64_t* full,
                                                 int stage_bytes, int n, int second,
                                                 Issue&& issue) {
  for (int t = 0; t < kStages - 1; ++t) issue(t);
  unsigned acc = 0;
  for (int t = 0; t < n; ++t) {
    if (t + kStages - 1 < n) issue(t + kStages - 1);
    mbar_wait(&full[t % kStages], (t / kStages) & 1);
    const unsigned* q = reinterpret_cast<const unsigned*>(ring + (t % kStages) * stage_bytes);
    acc ^= q[threadIdx.x] + q[threadIdx.x + second];
    __syncthreads();
  }
  return acc;
}

// The swapped expert GEMM's weight stream: a CTA reads a 640 KB tile (an expert's 128 weight
// rows of K = 2560) in 40 stages of 16 KB, each stage P bulk copies of 16 KB / P bytes, piece p
// of stage kt at p * (640 KB / P) + kt * (16 KB / P) of the tile: P = 8 is the tiled layout's
// 2 KB pieces 80 KB apart (four 16-row groups of each of the two 64-row boxes), P = 1 a
// contiguous stage. S stages, 128 threads, two CTAs an SM.
// kFixed adds the GEMM's fixed costs a CTA, one bit each: 1 its tile from a global index read
// first (the GEMM reads its block's expert before the first copy); 2 the gate/up epilogue of a
// 32-row block (16 two-byte stores a thread, 4 rows' 16-byte pieces a warp store, then a
// barrier and a release add on a counter, as the readiness counters); 4 that epilogue staged
// through shared memory (two 16-byte stores a thread of whole rows; the kernel's form of it was
// measured and dropped).
constexpr int kPieceStage = 16 * 1024, kPieceStages = 40;
constexpr int64_t kPieceTile = static_cast<int64_t>(kPieceStage) * kPieceStages;
constexpr int kOutRows = 32, kOutCols = 64;  // a gate/up tile's outputs (kFixed 2 and 4)
struct PieceFixed {
  const int32_t* order = nullptr;  // [tiles]: the tile a CTA reads (kFixed & 1)
  __nv_bfloat16* out = nullptr;    // [tiles][kOutRows][kOutCols] (kFixed & 6)
  int32_t* counters = nullptr;     // [tiles] (kFixed & 6)
};
template <int S, int P, int kFixed = 0>
__global__ void __launch_bounds__(128)
    pieces_kernel(const unsigned char* w, int64_t byte0, unsigned* sink, const PieceFixed f) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  __shared__ uint64_t full[S];
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) mbar_init(&full[s], 1);
    mbar_init_fence();
  }
  __syncthreads();
  int64_t t = blockIdx.x;
  if constexpr ((kFixed & 1) != 0) {
    if (tid == 0) t = __ldcg(f.order + blockIdx.x);
  }
  const unsigned char* tile = w + byte0 + t * kPieceTile;
  auto issue = [&](int kt) {
    if (tid != 0) return;
    uint64_t* bar = &full[kt % S];
    mbar_arrive_expect_tx(bar, kPieceStage);
    for (int p = 0; p < P; ++p) {
      const unsigned char* src = tile + p * (kPieceTile / P) + kt * (kPieceStage / P);
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
          "[%3];\n" ::"r"(smem_u32(smem + (kt % S) * kPieceStage + p * (kPieceStage / P))),
          "l"(src), "r"(kPieceStage / P), "r"(smem_u32(bar))
          : "memory");
    }
  };
  const unsigned acc = consume_ring<S>(smem, full, kPieceStage, kPieceStages, 2048, issue);
  if constexpr ((kFixed & 6) != 0) {
    // The swapped kernel's gate/up accumulator layout: thread (warp, g, c) holds rows
    // 8 i + 2 c + j and columns 16 warp + g + 8 h.
    const int warp = tid / 32, g = tid % 32 / 4, c = tid % 4;
    __nv_bfloat16* out = f.out + blockIdx.x * (kOutRows * kOutCols);
    constexpr int kStagedLd = kOutCols + 8;
    auto* staged = reinterpret_cast<__nv_bfloat16*>(smem);
#pragma unroll
    for (int i = 0; i < kOutRows / 8; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = 8 * i + 2 * c + j, col = 16 * warp + g + 8 * h;
          const __nv_bfloat16 v = __float2bfloat16(static_cast<float>((acc >> (i + j + h)) & 255));
          if constexpr ((kFixed & 4) != 0) {
            staged[r * kStagedLd + col] = v;
          } else {
            out[r * kOutCols + col] = v;
          }
        }
      }
    }
    if constexpr ((kFixed & 4) != 0) {
      __syncthreads();
#pragma unroll
      for (int it = 0; it < kOutRows * kOutCols / 8 / 128; ++it) {
        const int idx = tid + 128 * it, r = idx / (kOutCols / 8), piece = idx % (kOutCols / 8);
        *reinterpret_cast<uint4*>(out + r * kOutCols + 8 * piece) =
            *reinterpret_cast<const uint4*>(staged + r * kStagedLd + 8 * piece);
      }
    }
    __syncthreads();
    if (tid == 0) red_add_release_gpu(f.counters + blockIdx.x, 1);
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// Decode attention's stream at 256 sequences of 1024 keys (the 21B model: 4 KV heads of 128,
// 16-key cache blocks of [slot][head][128] bf16): a CTA per (sequence, KV head), as the decode
// kernel's grid, reads its keys and values as 64-key tiles of 16 TMA boxes (each cache block's
// 16 rows x 64 columns of its head, two halves, K and V: the kernel's boxes), three tiles in
// flight, each tile only touched, two CTAs an SM (the kernel's 104 KB of shared memory).
// kTable: each block's number from a block table, read by thread 0 a tile ahead (the spread
// issue's order), else computed. Block n's K rows start at row n * blk_rows of k_map, its V
// rows at n * blk_rows + v_first of v_map: K and V caches apart (blk_rows 16, v_first 0, two
// maps) or a block's K and V side by side (blk_rows 32, v_first 16, one map). heads_inner: a
// sequence's KV heads in consecutive CTAs (they read the same cache rows, 256 bytes of each
// 1 KB slot apiece), else the decode kernel's order (every sequence of head 0 first, then of
// head 1, ...: a slot's four pieces are read waves apart). Beside the
// kernel's time for the same bytes it tells how much of decode attention's gap to the streaming
// rate is its stream and how much its math, barriers and merge; over placements, whether where
// the caches lie moves the stream.
constexpr int kAttnSeqs = 256, kAttnKeys = 1024, kAttnHeads = 4, kAttnBlock = 16,
              kAttnTileKeys = 64, kAttnBuffers = 3;
constexpr int kAttnTileBytes = 2 * kAttnTileKeys * 128 * 2;  // K and V of a 64-key tile
constexpr int64_t kAttnSlots = int64_t{kAttnSeqs} * kAttnKeys;
constexpr size_t kAttnCacheBytes = static_cast<size_t>(kAttnSlots) * kAttnHeads * 128 * 2;
template <bool kTable>
__global__ void __launch_bounds__(128)
    attn_stream_kernel(const __grid_constant__ CUtensorMap k_map,
                       const __grid_constant__ CUtensorMap v_map, const int32_t* tables,
                       int blk_rows, int v_first, bool heads_inner, unsigned* sink) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  __shared__ uint64_t full[kAttnBuffers];
  const int tid = threadIdx.x;
  const int seq = heads_inner ? blockIdx.y : blockIdx.x,
            kvh = heads_inner ? blockIdx.x : blockIdx.y;
  constexpr int kTiles = kAttnKeys / kAttnTileKeys, kBlocks = kAttnTileKeys / kAttnBlock;
  constexpr int kBlocksPerSeq = kAttnKeys / kAttnBlock;
  if (tid == 0) {
    for (int b = 0; b < kAttnBuffers; ++b) mbar_init(&full[b], 1);
    mbar_init_fence();
  }
  __syncthreads();
  int ent[kBlocks];  // thread 0: the next tile's blocks
  auto fetch = [&](int t) {
#pragma unroll
    for (int j = 0; j < kBlocks; ++j) {
      const int b = t * kBlocks + j;
      ent[j] = kTable ? tables[seq * kBlocksPerSeq + min(b, kBlocksPerSeq - 1)]
                      : seq * kBlocksPerSeq + b;
    }
  };
  auto issue = [&](int t) {
    if (tid != 0) return;
    uint64_t* bar = &full[t % kAttnBuffers];
    unsigned char* dst = smem + (t % kAttnBuffers) * kAttnTileBytes;
    mbar_arrive_expect_tx(bar, kAttnTileBytes);
#pragma unroll
    for (int j = 0; j < kBlocks; ++j) {
      const int row = ent[j] * blk_rows;
      for (int half = 0; half < 2; ++half) {
        unsigned char* dst_row = dst + half * (kAttnTileKeys * 128) + j * kAttnBlock * 128;
        tma_load_3d(dst_row, &k_map, bar, half * 64, kvh, row);
        tma_load_3d(dst_row + kAttnTileBytes / 2, &v_map, bar, half * 64, kvh, row + v_first);
      }
    }
    if (t + 1 < kTiles) fetch(t + 1);
  };
  if (tid == 0) fetch(0);
  const unsigned acc = consume_ring<kAttnBuffers>(smem, full, kAttnTileBytes, kTiles, 4096, issue);
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// The same bytes with a CTA per sequence reading whole cache slots: each 16-key block's four KV
// heads as one box a half (64 columns x 4 heads x 16 slots, 8 KB), K and V, so a block's 16 KB
// of K (or V) is read by one CTA at once; 16-key tiles, three in flight (96 KB: two CTAs an
// SM, as the decode kernel). What a decode kernel with all of a tile's KV heads in one CTA
// would stream at.
template <bool kTable>
__global__ void __launch_bounds__(128)
    attn_slots_kernel(const __grid_constant__ CUtensorMap k_map,
                      const __grid_constant__ CUtensorMap v_map, const int32_t* tables,
                      int blk_rows, int v_first, unsigned* sink) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  __shared__ uint64_t full[kAttnBuffers];
  const int tid = threadIdx.x, seq = blockIdx.x;
  constexpr int kBlocksPerSeq = kAttnKeys / kAttnBlock;
  constexpr int kBox = 64 * kAttnHeads * kAttnBlock * 2;  // bytes of one half's box
  constexpr int kTileBytes = 4 * kBox;                    // K and V, two halves each
  if (tid == 0) {
    for (int b = 0; b < kAttnBuffers; ++b) mbar_init(&full[b], 1);
    mbar_init_fence();
  }
  __syncthreads();
  auto issue = [&](int t) {
    if (tid != 0) return;
    const int ent = kTable ? tables[seq * kBlocksPerSeq + t] : seq * kBlocksPerSeq + t;
    uint64_t* bar = &full[t % kAttnBuffers];
    unsigned char* dst = smem + (t % kAttnBuffers) * kTileBytes;
    mbar_arrive_expect_tx(bar, kTileBytes);
    const int row = ent * blk_rows;
    for (int half = 0; half < 2; ++half) {
      tma_load_3d(dst + half * kBox, &k_map, bar, half * 64, 0, row);
      tma_load_3d(dst + (2 + half) * kBox, &v_map, bar, half * 64, 0, row + v_first);
    }
  };
  const unsigned acc =
      consume_ring<kAttnBuffers>(smem, full, kTileBytes, kBlocksPerSeq, kTileBytes / 8, issue);
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// Where the K and V caches of the attention probe lie: kCopies copies (a fresh cache each run,
// no L2 reuse), each either K and V apart (k[c], v[c]) or a block's K and V side by side (k[c]
// alone, twice the rows).
constexpr int kAttnCopies = 4;
struct AttnPlacement {
  const char* name;
  unsigned char* k[kAttnCopies];
  unsigned char* v[kAttnCopies];
  bool side_by_side;
};

// Each sequence's blocks in a random order among its own (a cache that has been in use).
int32_t* shuffled_attn_tables() {
  std::vector<int32_t> table(static_cast<size_t>(kAttnSlots / kAttnBlock));
  const int per_seq = kAttnKeys / kAttnBlock;
  unsigned rnd = 12345;
  for (int s = 0; s < kAttnSeqs; ++s) {
    for (int b = 0; b < per_seq; ++b) table[s * per_seq + b] = s * per_seq + b;
    for (int b = per_seq - 1; b > 0; --b) {
      rnd = rnd * 1664525u + 1013904223u;
      std::swap(table[s * per_seq + b], table[s * per_seq + static_cast<int>(rnd % (b + 1))]);
    }
  }
  int32_t* tables = nullptr;
  ERNIE_CUDA_CHECK(cudaMalloc(&tables, table.size() * sizeof(int32_t)));
  ERNIE_CUDA_CHECK(
      cudaMemcpy(tables, table.data(), table.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  return tables;
}

// The attention probe's CTA orders: the decode kernel's (every sequence of head 0 first), a
// sequence's KV heads in consecutive CTAs, one CTA a sequence over whole slots.
enum class AttnOrder { kSeqsInner, kHeadsInner, kWholeSlots };

template <bool kTable>
void run_attn(const AttnPlacement& pl, const int32_t* tables, AttnOrder order, int iters,
              unsigned* sink, cudaEvent_t t0, cudaEvent_t t1) {
  CUtensorMap k_maps[kAttnCopies], v_maps[kAttnCopies];
  const bool slots = order == AttnOrder::kWholeSlots;
  const int box[3] = {64, slots ? kAttnHeads : 1, kAttnBlock};
  for (int c = 0; c < kAttnCopies; ++c) {
    const int64_t dims[3] = {128, kAttnHeads, pl.side_by_side ? 2 * kAttnSlots : kAttnSlots};
    k_maps[c] = tensor_map_bf16_sw128_3d(pl.k[c], dims, box);
    v_maps[c] = pl.side_by_side ? k_maps[c] : tensor_map_bf16_sw128_3d(pl.v[c], dims, box);
  }
  const int blk_rows = pl.side_by_side ? 2 * kAttnBlock : kAttnBlock;
  const int v_first = pl.side_by_side ? kAttnBlock : 0;
  const bool heads_inner = order == AttnOrder::kHeadsInner;
  const int smem = 104 * 1024;  // the decode kernel's: two CTAs an SM
  const void* kernel = slots ? reinterpret_cast<const void*>(attn_slots_kernel<kTable>)
                             : reinterpret_cast<const void*>(attn_stream_kernel<kTable>);
  ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid = slots         ? dim3(kAttnSeqs)
                    : heads_inner ? dim3(kAttnHeads, kAttnSeqs)
                                  : dim3(kAttnSeqs, kAttnHeads);
  auto launch = [&](int c) {
    if (slots) {
      attn_slots_kernel<kTable>
          <<<grid, 128, smem>>>(k_maps[c], v_maps[c], tables, blk_rows, v_first, sink);
    } else {
      attn_stream_kernel<kTable>
          <<<grid, 128, smem>>>(k_maps[c], v_maps[c], tables, blk_rows, v_first, heads_inner, sink);
    }
  };
  launch(0);
  ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
  ERNIE_CUDA_CHECK(cudaEventRecord(t0));
  for (int i = 0; i < iters; ++i) launch((i + 1) % kAttnCopies);
  ERNIE_CUDA_CHECK(cudaEventRecord(t1));
  ERNIE_CUDA_CHECK(cudaEventSynchronize(t1));
  ERNIE_CUDA_CHECK(cudaGetLastError());
  float ms = 0;
  ERNIE_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
  const double sec = ms * 1e-3 / iters;
  const double read = 2.0 * kAttnCacheBytes;
  std::printf("attn      %-34s %-14s %-12s %8.1f us  %5.2f TB/s\n", pl.name,
              kTable ? "block table" : "computed slots",
              slots         ? "whole slots"
              : heads_inner ? "heads inner"
                            : "seqs inner",
              sec * 1e6, read / sec * 1e-12);
}

// The placements, each with computed slots and the block table in the three CTA orders, twice
// (heads inner first, then the decode kernel's order first: each order meets a fresh allocation
// in one of the two): K and V caches in two allocations of their own (as before); one allocation
// of kCopies [K | V] pairs (the engine's cache: each layer's K then its V); the same allocation
// with each block's K and V side by side; then that allocation freed and made again, K and V
// apart once more (whether a second allocation of the same size streams as the first).
void run_attn_placements(int iters, unsigned* sink, cudaEvent_t t0, cudaEvent_t t1) {
  int32_t* tables = shuffled_attn_tables();
  const size_t copy_bytes = 2 * kAttnCacheBytes;
  auto cases = [&](const AttnPlacement& pl) {
    using enum AttnOrder;
    for (const auto& orders : {std::array{kHeadsInner, kWholeSlots, kSeqsInner},
                               std::array{kSeqsInner, kHeadsInner, kWholeSlots}}) {
      for (const AttnOrder order : orders) {
        run_attn<false>(pl, tables, order, iters, sink, t0, t1);
        run_attn<true>(pl, tables, order, iters, sink, t0, t1);
      }
    }
  };
  auto one_allocation = [&](const char* name) {
    unsigned char* all = nullptr;
    ERNIE_CUDA_CHECK(cudaMalloc(&all, kAttnCopies * copy_bytes));
    ERNIE_CUDA_CHECK(cudaMemset(all, 0x3c, kAttnCopies * copy_bytes));
    AttnPlacement pl{name, {}, {}, false};
    for (int c = 0; c < kAttnCopies; ++c) {
      pl.k[c] = all + c * copy_bytes;
      pl.v[c] = pl.k[c] + kAttnCacheBytes;
    }
    return std::pair{all, pl};
  };
  {
    AttnPlacement pl{"K and V apart, own allocations", {}, {}, false};
    for (int c = 0; c < kAttnCopies; ++c) {
      ERNIE_CUDA_CHECK(cudaMalloc(&pl.k[c], kAttnCacheBytes));
      ERNIE_CUDA_CHECK(cudaMalloc(&pl.v[c], kAttnCacheBytes));
      ERNIE_CUDA_CHECK(cudaMemset(pl.k[c], 0x3c, kAttnCacheBytes));
      ERNIE_CUDA_CHECK(cudaMemset(pl.v[c], 0x3c, kAttnCacheBytes));
    }
    cases(pl);
    for (int c = 0; c < kAttnCopies; ++c) {
      cudaFree(pl.k[c]);
      cudaFree(pl.v[c]);
    }
  }
  auto [all, apart] = one_allocation("one allocation, [K | V] a copy");
  cases(apart);
  AttnPlacement side = apart;
  side.name = "one allocation, K, V a block";
  side.side_by_side = true;
  cases(side);
  cudaFree(all);
  auto [again, apart2] = one_allocation("the same, allocated again");
  cases(apart2);
  cudaFree(again);
  cudaFree(tables);
}

struct Bench {
  __nv_bfloat16* buf = nullptr;
  int64_t rows = 0;  // of K elements
  unsigned* sink = nullptr;
  PieceFixed fixed;  // buffers for pieces_kernel's fixed costs (1536 tiles)
  CUtensorMap map32{}, map64{};
  int iters = 20;
  cudaEvent_t t0{}, t1{};

  // Seconds per run of `launch(row0)`, each run at another place in the buffer (no L2 reuse).
  template <class F>
  double time(int64_t run_rows, F&& launch) {
    const int64_t places = std::max<int64_t>(1, rows / run_rows - 1);
    launch(0);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    ERNIE_CUDA_CHECK(cudaEventRecord(t0));
    for (int i = 0; i < iters; ++i) launch(((i + 1) % places) * run_rows);
    ERNIE_CUDA_CHECK(cudaEventRecord(t1));
    ERNIE_CUDA_CHECK(cudaEventSynchronize(t1));
    float ms = 0;
    ERNIE_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
    return ms * 1e-3 / iters;
  }
};

template <int R, int S, Copy kCopy>
void run_case(Bench& b, const char* copy_name, int tiles, bool persistent) {
  auto kernel = stream_kernel<R, S, kCopy>;
  ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kSmem)));
  int per_sm = 0, sms = 0, device = 0;
  ERNIE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 2 * R, kSmem));
  ERNIE_CUDA_CHECK(cudaGetDevice(&device));
  ERNIE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int grid = persistent ? std::min(tiles, per_sm * sms) : tiles;
  const CUtensorMap& map = R == 32 ? b.map32 : b.map64;
  const int64_t run_rows = static_cast<int64_t>(tiles) * R;
  const double sec = b.time(run_rows, [&](int64_t row0) {
    kernel<<<grid, 2 * R, kSmem>>>(b.buf, row0, tiles, map, b.sink);
  });
  ERNIE_CUDA_CHECK(cudaGetLastError());
  const double bytes = static_cast<double>(run_rows) * kK * 2;
  std::printf("%-9s R=%-2d S=%d %-10s tiles %5d grid %5d (%d/SM)  %8.1f us  %5.2f TB/s\n",
              copy_name, R, S, persistent ? "persistent" : "per-tile", tiles, grid, per_sm,
              sec * 1e6, bytes / sec * 1e-12);
}

template <int S, int P, int kFixed = 0>
void run_pieces(Bench& b, int tiles) {
  auto kernel = pieces_kernel<S, P, kFixed>;
  const int smem = std::max(S * kPieceStage + 1024, 81 * 1024);  // two CTAs an SM, as the GEMM
  ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  ERNIE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 128, smem));
  const int64_t run_rows = tiles * kPieceTile / (kK * 2);
  const double sec = b.time(run_rows, [&](int64_t row0) {
    kernel<<<tiles, 128, smem>>>(reinterpret_cast<const unsigned char*>(b.buf), row0 * kK * 2,
                                 b.sink, b.fixed);
  });
  ERNIE_CUDA_CHECK(cudaGetLastError());
  const double bytes = static_cast<double>(tiles) * kPieceTile;
  std::printf("pieces    P=%d (%5d B) S=%d tiles %5d (%d/SM)  %8.1f us  %5.2f TB/s%s%s%s\n", P,
              kPieceStage / P, S, tiles, per_sm, sec * 1e6, bytes / sec * 1e-12,
              (kFixed & 1) ? "  +index read" : "", (kFixed & 2) ? "  +2-byte epilogue" : "",
              (kFixed & 4) ? "  +staged epilogue" : "");
}

// Plain 16-byte loads over the same number of bytes (cuda::measure_read_bandwidth).
void run_ldg(int iters, int64_t bytes) {
  const double rate = measure_read_bandwidth(bytes, iters);
  std::printf("%-9s %-37s %8.1f us  %5.2f TB/s\n", "ldg", "16-byte loads, 8 CTAs/SM x 256",
              static_cast<double>(bytes) / rate * 1e6, rate * 1e-12);
}

// cluster_gemm against cuBLAS on out [m, n] = x [m, k] w [n, k]^T, each launch on another of
// kCopies weight matrices (more bytes than L2 holds, as in a step), then the milestones of
// single launches.
void run_cluster_gemm(int iters) {
  constexpr int kCopies = 8;
  struct Shape {
    const char* name;
    int m, n, k;
  };
  const Shape shapes[] = {{"qkv", 256, 3584, 2560},
                          {"o", 256, 2560, 2560},
                          {"qkv", 128, 3584, 2560},
                          {"qkv", 64, 3584, 2560}};
  cudaEvent_t t0{}, t1{};
  ERNIE_CUDA_CHECK(cudaEventCreate(&t0));
  ERNIE_CUDA_CHECK(cudaEventCreate(&t1));
  cublasHandle_t blas = nullptr;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate");
  constexpr size_t kFlushBytes = size_t{256} << 20;
  void* flush = nullptr;
  ERNIE_CUDA_CHECK(cudaMalloc(&flush, kFlushBytes));
  const auto timed = [&](auto&& launch) {  // us a launch, launches back to back
    for (int i = 0; i < kCopies; ++i) launch(i);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    ERNIE_CUDA_CHECK(cudaEventRecord(t0));
    for (int i = 0; i < iters; ++i) launch(i % kCopies);
    ERNIE_CUDA_CHECK(cudaEventRecord(t1));
    ERNIE_CUDA_CHECK(cudaEventSynchronize(t1));
    float ms = 0;
    ERNIE_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
    return 1e3 * ms / iters;
  };
  const char* names[kCgStamps] = {"entry",    "synced", "first slice", "issued",
                                  "mma done", "staged", "stored",      "exit"};
  for (const Shape& sh : shapes) {
    const size_t w_elems = static_cast<size_t>(sh.n) * sh.k;
    __nv_bfloat16 *x = nullptr, *w = nullptr, *out = nullptr;
    ERNIE_CUDA_CHECK(cudaMalloc(&x, static_cast<size_t>(sh.m) * sh.k * 2));
    ERNIE_CUDA_CHECK(cudaMalloc(&w, kCopies * w_elems * 2));
    ERNIE_CUDA_CHECK(cudaMalloc(&out, static_cast<size_t>(sh.m) * sh.n * 2));
    fill_random_bf16(x, static_cast<int64_t>(sh.m) * sh.k, false, 0.0, 1.0, 11, nullptr);
    fill_random_bf16(w, kCopies * static_cast<int64_t>(w_elems), false, 0.0, 0.02, 12, nullptr);
    const float one = 1.0f, zero = 0.0f;
    const double blas_us = timed([&](int c) {
      if (cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.n, sh.m, sh.k, &one, w + c * w_elems,
                       CUDA_R_16BF, sh.k, x, CUDA_R_16BF, sh.k, &zero, out, CUDA_R_16BF, sh.n,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
        throw std::runtime_error("cublasGemmEx");
      }
    });
    std::printf("-- %s %d x %d -> %d: cuBLAS %.1f us a launch\n", sh.name, sh.m, sh.k, sh.n,
                blas_us);
    for (const int splits : {1, 2, 4}) {
      // The engine's token tile for this shape, with the split count forced.
      ClusterGemmPlan plan = cluster_gemm_plan(sh.m, sh.n, sh.k);
      plan.splits = splits;
      plan.share = 1;
      if (!cluster_gemm_plan_valid(plan, sh.m, sh.n, sh.k)) continue;
      const double us = timed(
          [&](int c) { cluster_gemm(out, x, w + c * w_elems, sh.m, sh.n, sh.k, plan, nullptr); });
      const int ctas = cluster_gemm_ctas(plan, sh.m, sh.n);
      uint64_t* d_stamps = nullptr;
      ERNIE_CUDA_CHECK(cudaMalloc(&d_stamps, size_t{8} * ctas * kCgStamps));
      std::vector<uint64_t> st(static_cast<size_t>(ctas) * kCgStamps);
      std::printf(
          "   splits %d (%d CTAs): %.1f us a launch; one launch's milestones, us from the "
          "first entry (median / latest over CTAs):\n",
          splits, ctas, us);
      // Warm: right after a launch of the same kernel (its code in L2 and in the SMs). Cold:
      // after 256 MB written, so that L2 holds none of its code, tensor maps or input. The
      // weights are the copy read longest ago in both (not in L2).
      const int oldest = iters % kCopies;
      for (const bool cold : {false, true}) {
        ERNIE_CUDA_CHECK(cudaMemset(d_stamps, 0, st.size() * 8));
        cluster_gemm(out, x, w + (oldest + 1) % kCopies * w_elems, sh.m, sh.n, sh.k, plan, nullptr);
        if (cold) ERNIE_CUDA_CHECK(cudaMemsetAsync(flush, 1, kFlushBytes, nullptr));
        ERNIE_CUDA_CHECK(cudaEventRecord(t0));
        cluster_gemm(out, x, w + oldest * w_elems, sh.m, sh.n, sh.k, plan, nullptr, d_stamps);
        ERNIE_CUDA_CHECK(cudaEventRecord(t1));
        ERNIE_CUDA_CHECK(cudaEventSynchronize(t1));
        float ms = 0;
        ERNIE_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
        ERNIE_CUDA_CHECK(cudaMemcpy(st.data(), d_stamps, st.size() * 8, cudaMemcpyDeviceToHost));
        uint64_t first = ~uint64_t{0};
        for (int c = 0; c < ctas; ++c) first = std::min(first, st[c * kCgStamps + kStampEntry]);
        std::printf("   %s (%.1f us by events):", cold ? "cold" : "warm", 1e3 * ms);
        for (int p = 0; p < kCgStamps; ++p) {
          std::vector<double> v(ctas);
          for (int c = 0; c < ctas; ++c) v[c] = 1e-3 * (st[c * kCgStamps + p] - first);
          std::sort(v.begin(), v.end());
          std::printf(" %s %.1f/%.1f", names[p], v[ctas / 2], v.back());
        }
        std::printf("\n");
      }
      cudaFree(d_stamps);
    }
    cudaFree(x);
    cudaFree(w);
    cudaFree(out);
  }
  cudaFree(flush);
  cublasDestroy(blas);
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
}

int run(int iters) {
  if (std::getenv("PROBE_CLUSTER_GEMM") != nullptr) {
    run_cluster_gemm(iters);
    return 0;
  }
  Bench b;
  b.iters = iters;
  const size_t bytes = size_t{6} << 30;
  b.rows = static_cast<int64_t>(bytes / (kK * 2));
  ERNIE_CUDA_CHECK(cudaMalloc(&b.buf, bytes));
  ERNIE_CUDA_CHECK(cudaMemset(b.buf, 0x3c, bytes));
  ERNIE_CUDA_CHECK(cudaMalloc(&b.sink, sizeof(unsigned)));
  ERNIE_CUDA_CHECK(cudaEventCreate(&b.t0));
  ERNIE_CUDA_CHECK(cudaEventCreate(&b.t1));
  b.map32 = tensor_map_bf16_sw128(b.buf, b.rows, kK, 32);
  b.map64 = tensor_map_bf16_sw128(b.buf, b.rows, kK, 64);
  // The 256-token gate/up's weights (64 experts x 3072 rows: 1536 tiles of 640 KB).
  constexpr int kTiles = 1536;
  std::vector<int32_t> order(kTiles);
  for (int i = 0; i < kTiles; ++i) order[i] = i;
  int32_t* d_order = nullptr;
  ERNIE_CUDA_CHECK(cudaMalloc(&d_order, kTiles * sizeof(int32_t)));
  ERNIE_CUDA_CHECK(
      cudaMemcpy(d_order, order.data(), kTiles * sizeof(int32_t), cudaMemcpyHostToDevice));
  b.fixed.order = d_order;
  ERNIE_CUDA_CHECK(cudaMalloc(&b.fixed.out, size_t{kTiles} * kOutRows * kOutCols * 2));
  ERNIE_CUDA_CHECK(cudaMalloc(&b.fixed.counters, kTiles * sizeof(int32_t)));
  std::printf("-- 64 experts' gate/up, %.1f MB\n", kTiles * kPieceTile * 1e-6);
  run_ldg(iters, kTiles * kPieceTile);
  for (int rep = 0; rep < 2; ++rep) {
    run_pieces<4, 1>(b, kTiles);
    run_pieces<4, 2>(b, kTiles);
    run_pieces<4, 8>(b, kTiles);
    run_pieces<4, 16>(b, kTiles);
    run_pieces<5, 8>(b, kTiles);
    run_pieces<3, 8>(b, kTiles);
  }
  // The GEMM's fixed costs a CTA on the 2 KB pieces (pieces_kernel's kFixed).
  for (int rep = 0; rep < 2; ++rep) {
    run_pieces<4, 8>(b, kTiles);
    run_pieces<4, 8, 1>(b, kTiles);
    run_pieces<4, 8, 2>(b, kTiles);
    run_pieces<4, 8, 4>(b, kTiles);
    run_pieces<4, 8, 3>(b, kTiles);
    run_pieces<4, 8, 5>(b, kTiles);
  }
  cudaFree(d_order);
  cudaFree(b.fixed.out);
  cudaFree(b.fixed.counters);
  // Decode attention's stream (attn_stream_kernel), 537 MB a run.
  std::printf("-- decode attention's K/V stream, %.1f MB\n", 2 * kAttnCacheBytes * 1e-6);
  run_attn_placements(iters, b.sink, b.t0, b.t1);
  if (std::getenv("PROBE_PIECES_ONLY") != nullptr) return 0;
  // One token: 6 experts x 3072 gate/up rows; 16 tokens: ~51 experts.
  for (const int rows : {6 * 3072, 51 * 3072}) {
    std::printf("-- %d weight rows x %d (%.1f MB)\n", rows, kK, rows * kK * 2e-6);
    run_ldg(iters, static_cast<int64_t>(rows) * kK * 2);
    for (const bool persistent : {false, true}) {
      run_case<32, 5, Copy::kCpAsync>(b, "cp.async", rows / 32, persistent);
      run_case<64, 3, Copy::kCpAsync>(b, "cp.async", rows / 64, persistent);
      run_case<32, 5, Copy::kTma>(b, "tma", rows / 32, persistent);
      run_case<32, 7, Copy::kTma>(b, "tma", rows / 32, persistent);
      run_case<64, 3, Copy::kTma>(b, "tma", rows / 64, persistent);
      run_case<64, 4, Copy::kTma>(b, "tma", rows / 64, persistent);
      run_case<32, 5, Copy::kBulk>(b, "bulk", rows / 32, persistent);
      run_case<64, 3, Copy::kBulk>(b, "bulk", rows / 64, persistent);
    }
  }
  cudaFree(b.buf);
  cudaFree(b.sink);
  return 0;
}

}  // namespace
}  // namespace ernie::cuda

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::max(1, std::atoi(argv[1])) : 20;
  try {
    return ernie::cuda::run(iters);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
