#include <algorithm>
#include <unordered_map>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/hopper.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/switches.h"

namespace ernie::cuda {
namespace {

constexpr int kKeysPerTile = 64;
constexpr int kPrefillRowWarps = kAttentionPrefillRows / 16;  // mma.sync path: a warp per 16 rows
// K/V tile buffers of the decode kernel: 109 KB at head_dim 128, two CTAs per SM.
constexpr int kDecodeBuffers = 3;
constexpr float kLog2e = 1.4426950408889634f;

// Row of the paged cache that holds key j of a sequence (shift and mask for power-of-two block
// sizes, the common case; a division otherwise).
__device__ __forceinline__ int64_t key_slot(const int32_t* table, int j, int block_size,
                                            int block_shift) {
  if (block_shift >= 0) {
    return (static_cast<int64_t>(table[j >> block_shift]) << block_shift) | (j & (block_size - 1));
  }
  return static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size;
}

// What one CTA covers: query tile `tile` (bm rows of its sequence, starting at row0; a row is
// (token - q0) * group + head) and the keys [k_begin, k_end) of split `split` that those rows
// may see.
struct TileSpan {
  int seq, row0, group, q0, rows, k_begin, k_end;
};
__device__ __forceinline__ TileSpan tile_span(const PagedAttentionArgs& a, int tile, int split,
                                              int bm) {
  TileSpan t;
  t.seq = a.tile_seq[tile];
  t.row0 = a.tile_row0[tile];
  t.group = a.heads / a.kv_heads;
  t.q0 = a.query_start[t.seq];
  t.rows = (a.query_start[t.seq + 1] - t.q0) * t.group;
  const int last_row = min(t.row0 + bm, t.rows) - 1;
  const int kv_end = min(a.context_lens[t.seq], a.positions[t.q0 + last_row / t.group] + 1);
  t.k_begin = split * a.dims[0];
  t.k_end = a.splits == 1 ? kv_end : min(kv_end, t.k_begin + a.dims[0]);
  return t;
}

// 2^x on the special function unit (2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Largest tile maximum above the running one (log2 units) that leaves the running maximum where
// it is: probabilities then reach at most 2^kRescaleSlack (exact in bf16 and f32 alike), and
// the output and sum are rescaled only when some row of the warp outgrows it.
constexpr float kRescaleSlack = 8.0f;

// Maximum and sum of n values as trees (short dependency chains instead of one of length n).
template <int N>
__device__ __forceinline__ float tree_max(const float* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    return fmaxf(tree_max<N / 2>(v), tree_max<N - N / 2>(v + N / 2));
  }
}
template <int N>
__device__ __forceinline__ float tree_sum(const float* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    return tree_sum<N / 2>(v) + tree_sum<N - N / 2>(v + N / 2);
  }
}

// One online-softmax step of a warp over its NT x 8 key columns of a tile, in the m16n8
// accumulator layout (rows g and g + 8, columns 2 (lane % 4), +1 of each 8-column tile), leaving
// the output alone. Keys from key0 on that are past k_end or after a row's position are masked
// (tests skipped when every row sees every key: min_pos is the smallest position among the
// warp's rows). The running maximum m (log2 units, scores times scale_log2) moves only past
// kRescaleSlack; when it moves for some row of the warp, l is rescaled, rescale[] holds the
// factors for the output and the result is true (the same for the whole warp). s is left
// holding the probabilities 2^(s scale - m), and l their running sum.
template <int NT>
__device__ __forceinline__ bool softmax_probs(float (&s)[NT][4], float (&m)[2], float (&l)[2],
                                              float (&rescale)[2], int key0, int k_end,
                                              const int (&pos)[2], int min_pos, float scale_log2) {
  const int c = threadIdx.x % 4;
  const int last_key = key0 + NT * 8 - 1;
  if (last_key >= k_end || last_key > min_pos) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = key0 + nt * 8 + 2 * c + (e & 1);
        if (j >= k_end || j > pos[e / 2]) s[nt][e] = -INFINITY;
      }
    }
  }
  float mx[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float v[2 * NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      v[2 * nt] = s[nt][2 * i];
      v[2 * nt + 1] = s[nt][2 * i + 1];
    }
    mx[i] = tree_max<2 * NT>(v);
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    mx[i] *= scale_log2;  // scale_log2 > 0: the maximum of the scaled scores (or -inf)
  }
  const bool grow = mx[0] > m[0] + kRescaleSlack || mx[1] > m[1] + kRescaleSlack;
  const bool moved = __any_sync(0xffffffffu, grow);
  if (moved) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float next = fmaxf(m[i], mx[i]);
      rescale[i] = fast_exp2(m[i] - (next == -INFINITY ? 0.0f : next));  // 0 from -inf
      m[i] = next;
      l[i] *= rescale[i];
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float base = m[i] == -INFINITY ? 0.0f : m[i];
    float p[2 * NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        p[2 * nt + e] = fast_exp2(fmaf(s[nt][2 * i + e], scale_log2, -base));
        s[nt][2 * i + e] = p[2 * nt + e];
      }
    }
    l[i] += tree_sum<2 * NT>(p);
  }
  return moved;
}

// Output rows g and g + 8 of the m16n8 layout times rescale[0] and rescale[1].
template <int ND>
__device__ __forceinline__ void rescale_rows(float (&o)[ND][4], const float (&rescale)[2]) {
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nd][e] *= rescale[e / 2];
  }
}

// softmax_probs, then the output rescaled where the maximum moved.
template <int NT, int ND>
__device__ __forceinline__ void softmax_step(float (&s)[NT][4], float (&o)[ND][4], float (&m)[2],
                                             float (&l)[2], int key0, int k_end,
                                             const int (&pos)[2], int min_pos, float scale_log2) {
  float rescale[2];
  if (softmax_probs(s, m, l, rescale, key0, k_end, pos, min_pos, scale_log2)) {
    rescale_rows(o, rescale);
  }
}

// mma.sync kernel. RW warps split the query rows (16 each), KW warps split each 64-key tile.
// Prefill tiles the wgmma kernel does not take use RW = kPrefillRowWarps (64 query rows per
// CTA); decode uses KW = 4 (16 rows, keys split four ways and merged through shared memory at
// the end). K/V tiles go through NB buffers: NB - 1 tiles stream in while one is used (decode
// reads nothing else, and its rate follows the bytes in flight).
// kTma (head_dim 128, power-of-two cache blocks of 8-64): thread 0 brings each K/V tile by TMA,
// one box per cache block and 64-column half, into the 128-byte swizzled layout, and an
// mbarrier per buffer signals it; fragments are read through the swizzle. Otherwise every
// thread copies 16-byte chunks (cp.async) into rows padded to D + 8.
// kSpread (kTma decode; the default for grids of more than one wave): in the key loop each
// warp's first lane issues the boxes of its own cache blocks (block b of a tile: warp b % KW),
// from table entries it read one tile earlier, and thread 0 declares a tile's bytes as soon as
// its buffer's previous tile has landed. Without it thread 0 alone reads the table and issues
// every box of the tile after the loop's barrier (16 boxes at 16-key blocks), and Nsight Compute
// on the 16 x 8500 step put 41% of the warp samples at that barrier, the other warps waiting for
// thread 0's issue. Measured (H200): decode attention 16 x 8500 -1.3%, 64 x 1500 -5%, 256 x 1500
// -2%; steps 16 x 8500 -0.6%, 1 x 1000 +0.3% (its splits hold one tile). Sending a buffer's keys
// out as soon as every warp had its scores (a second barrier a tile) was slower (+3% at 16 x
// 8500): dropped.
// kIssue: 0 thread 0 issues, 1 kSpread (above), 2 kWs (TMA decode; the default for grids of
// one wave, see launch_d): a fifth warp only streams tiles, keys and values into their own
// barriers, and the four others take them without a CTA barrier in the key loop, each giving a
// buffer's keys back as soon as it has its scores and its values once it has P V; a buffer's
// next keys then stream in during the softmax and P V of the tile before (more bytes in flight
// for the same shared memory), and nothing on the consumers' path waits on a block-table load.
template <int D, int RW, int KW, int NB, bool kTma, int kIssue = 0>
__global__ void __launch_bounds__(32 * RW * KW + (kIssue == 2 ? 32 : 0))
    paged_attention_kernel(const PagedAttentionArgs a, const __grid_constant__ CUtensorMap k_map,
                           const __grid_constant__ CUtensorMap v_map) {
  // kTma: the key tiles that earlier steps wrote load before the wait for the kernel before
  // (rope, which writes this step's keys and rotates the queries); see below.
  if constexpr (kTma) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  } else {
    pdl_begin();
  }
  static_assert((RW == 1 || KW == 1) && D % 16 == 0 && NB >= 2);
  static_assert(!kTma || D == 128);
  constexpr bool kSpread = kIssue == 1, kWs = kIssue == 2;
  static_assert(kIssue == 0 || (kTma && RW == 1 && KW > 1));
  constexpr int kConsumers = 32 * RW * KW;  // the warps that do the math
  constexpr int kThreads = kConsumers + (kWs ? 32 : 0);
  constexpr int BM = 16 * RW, BN = kKeysPerTile, NK = BN / KW, NT = NK / 8, LD = D + 8;
  constexpr int kChunks = D / 8;         // 16-byte chunks per row
  constexpr int kHalf = BN * 128;        // kTma: bytes of one 64-column half of a tile
  constexpr int kTileBytes = 2 * kHalf;  // kTma: one K or V tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // kTma: [NB buffers][K, V][2 halves][BN rows][128 bytes] at a 1024-byte boundary, then Q;
  // otherwise Q, then [NB buffers][K, V][BN][LD].
  unsigned char* ring = reinterpret_cast<unsigned char*>(
      kTma ? (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023}
           : reinterpret_cast<uintptr_t>(smem_raw) + BM * LD * sizeof(__nv_bfloat16));
  __nv_bfloat16* sq = kTma ? reinterpret_cast<__nv_bfloat16*>(ring + 2 * NB * kTileBytes)
                           : reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [BM][LD]
  __nv_bfloat16* skv = reinterpret_cast<__nv_bfloat16*>(ring);
  auto k_tile = [&](int buf) { return skv + (2 * buf) * BN * LD; };
  auto v_tile = [&](int buf) { return skv + (2 * buf + 1) * BN * LD; };
  // Address of 16-byte chunk `ch` of key row `r` in buffer `buf` (K, or V with is_v).
  auto kv_chunk = [&](int buf, bool is_v, int r, int ch) -> const __nv_bfloat16* {
    if constexpr (kTma) {
      return reinterpret_cast<const __nv_bfloat16*>(ring + (2 * buf + is_v) * kTileBytes +
                                                    (ch / 8) * kHalf + r * 128 +
                                                    (((ch % 8) ^ (r % 8)) << 4));
    } else {
      return (is_v ? v_tile(buf) : k_tile(buf)) + r * LD + ch * 8;
    }
  };
  __shared__ __align__(8) uint64_t full[kTma ? NB : 1];
  // kWs: full[] signals a buffer's keys, full_v[] its values; empty_k[] and empty_v[] count the
  // consumer warps that are done with them.
  __shared__ __align__(8) uint64_t full_v[kWs ? NB : 1], empty_k[kWs ? NB : 1],
      empty_v[kWs ? NB : 1];

  const int tile = a.heads_inner ? blockIdx.y : blockIdx.x;
  const int kvh = a.heads_inner ? blockIdx.x : blockIdx.y, split = blockIdx.z;
  const auto [seq, row0, group, q0, rows, k_begin, k_end] = tile_span(a, tile, split, BM);
  const size_t row_stride = static_cast<size_t>(a.heads + 2 * a.kv_heads) * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int wr = warp / KW, wk = warp % KW;
  // A split that starts past the position of every query of the tile holds none of their keys,
  // and the combine never reads its partials (it takes the splits up to each token's position).
  if (split > 0 && k_begin > a.positions[q0 + (min(row0 + BM, rows) - 1) / group]) return;

  auto load_q = [&] {
    for (int i = threadIdx.x; i < BM * kChunks; i += kConsumers) {
      const int r = i / kChunks, ch = i % kChunks, row = row0 + r;
      const bool valid = row < rows;
      const __nv_bfloat16* src = a.qkv;
      if (valid) {
        src = a.qkv + static_cast<size_t>(q0 + row / group) * row_stride +
              static_cast<size_t>(kvh * group + row % group) * D + ch * 8;
      }
      cp_async_16(sq + r * LD + ch * 8, src, valid);
    }
    cp_async_commit();
  };
  if constexpr (!kTma) load_q();

  int pos[2];
  for (int i = 0; i < 2; ++i) {
    const int row = row0 + wr * 16 + g + 8 * i;
    pos[i] = row < rows ? a.positions[q0 + row / group] : -1;
  }
  // The smallest position among the warp's rows (padding rows count as -1: never "full").
  int min_pos = min(pos[0], pos[1]);
  for (int o = 16; o > 0; o >>= 1) min_pos = min(min_pos, __shfl_xor_sync(0xffffffffu, min_pos, o));
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;

  const int32_t* table = a.block_tables + static_cast<size_t>(seq) * a.dims[1];
  if constexpr (kTma) {
    // Rows of the last tile past the sequence's last cache block are never loaded. A buffer
    // used before holds an earlier tile there (finite: those keys get probability 0, and 0 * V
    // stays 0); a fresh one could hold anything, so its V rows start at zero.
    const int n_tiles = k_begin < k_end ? (k_end - k_begin + BN - 1) / BN : 0;
    if (n_tiles > 0 && n_tiles <= NB) {
      uint4* v_last = reinterpret_cast<uint4*>(ring + (2 * (n_tiles - 1) + 1) * kTileBytes);
      for (int i = threadIdx.x; i < kTileBytes / 16; i += kThreads) {
        v_last[i] = make_uint4(0, 0, 0, 0);
      }
    }
    if (threadIdx.x == 0) {
      for (int b = 0; b < NB; ++b) mbar_init(&full[b], 1);
      if constexpr (kWs) {
        for (int b = 0; b < NB; ++b) {
          mbar_init(&full_v[b], 1);
          mbar_init(&empty_k[b], KW);
          mbar_init(&empty_v[b], KW);
        }
      }
      mbar_init_fence();
    }
    fence_proxy_async();
    __syncthreads();
  }
  // Keys [kt, kt + BN) into buffer `buf`; rows past the range are zero (never NaN * 0).
  auto load_kv = [&](int buf, int kt) {
    if constexpr (kTma) {
      if (threadIdx.x != 0) return;
      const int bs = a.block_size;
      const int first = kt / bs, last = (min(kt + BN, k_end) - 1) / bs;
      mbar_arrive_expect_tx(&full[buf], (last - first + 1) * bs * 128 * 4);
      unsigned char* sk = ring + 2 * buf * kTileBytes;
      for (int b = first; b <= last; ++b) {
        const int slot0 = table[b] * bs, row = b * bs - kt;
        for (int half = 0; half < 2; ++half) {
          tma_load_3d(sk + half * kHalf + row * 128, &k_map, &full[buf], half * 64, kvh, slot0);
          tma_load_3d(sk + kTileBytes + half * kHalf + row * 128, &v_map, &full[buf], half * 64,
                      kvh, slot0);
        }
      }
      return;
    }
    __nv_bfloat16* sk = k_tile(buf);
    __nv_bfloat16* sv = v_tile(buf);
    for (int i = threadIdx.x; i < BN * kChunks; i += kThreads) {
      const int key = i / kChunks, ch = i % kChunks, j = kt + key;
      const bool valid = j < k_end;
      size_t off = 0;
      if (valid) {
        const int64_t slot = key_slot(table, j, a.block_size, a.block_shift);
        off = (static_cast<size_t>(slot) * a.kv_heads + kvh) * D + ch * 8;
      }
      cp_async_16(sk + key * LD + ch * 8, a.k_cache + off, valid);
      cp_async_16(sv + key * LD + ch * 8, a.v_cache + off, valid);
    }
  };
  // kSpread: the boxes of cache blocks first + warp + KW j of the tile at kt, from the table
  // entries ent[j] that lane 0 read (fetch) a tile before; thread 0 declared the tile's bytes.
  // At most 8 blocks a tile (blocks of >= 8 keys), so two per warp.
  static_assert(!kSpread || BN / 8 <= 2 * KW);
  int ent[2] = {0, 0};
  auto block_range = [&](int kt, int& first, int& last) {
    first = kt >> a.block_shift;
    last = (min(kt + BN, k_end) - 1) >> a.block_shift;
  };
  auto fetch = [&](int kt) {
    if (lane != 0 || kt >= k_end) return;
    int first, last;
    block_range(kt, first, last);
#pragma unroll
    for (int j = 0; j < 2; ++j) ent[j] = table[min(first + warp + KW * j, last)];
  };
  auto expect = [&](int buf, int kt) {
    int first, last;
    block_range(kt, first, last);
    mbar_arrive_expect_tx(&full[buf], (last - first + 1) * a.block_size * 128 * 4);
  };
  auto issue = [&](int buf, int kt) {
    if (lane != 0) return;
    int first, last;
    block_range(kt, first, last);
    unsigned char* sk = ring + 2 * buf * kTileBytes;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int b = first + warp + KW * j;
      if (b > last) break;
      const int slot0 = ent[j] << a.block_shift, row = (b << a.block_shift) - kt;
      for (int half = 0; half < 2; ++half) {
        tma_load_3d(sk + half * kHalf + row * 128, &k_map, &full[buf], half * 64, kvh, slot0);
        tma_load_3d(sk + kTileBytes + half * kHalf + row * 128, &v_map, &full[buf], half * 64, kvh,
                    slot0);
      }
    }
  };
  // kTma: keys before the position of the tile's first query token were written by earlier
  // steps, so whole tiles of them load at once; the rest (and the queries) after the wait.
  const int first_new = a.positions[q0];
  auto early = [&](int kt) { return kTma && kt + BN <= first_new; };
  uint32_t qf[D / 16][4];
  auto load_qf = [&] {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const __nv_bfloat16* p = sq + (wr * 16 + g) * LD + kk * 16 + 2 * c;
      qf[kk][0] = load_u32(p);
      qf[kk][1] = load_u32(p + 8 * LD);
      qf[kk][2] = load_u32(p + 8);
      qf[kk][3] = load_u32(p + 8 * LD + 8);
    }
  };
  const float scale_log2 = a.scale * kLog2e;
  const int kb = wk * NK;
  // ldmatrix row addresses: lane l gives row l % 8 of matrix l / 8.
  const int lrow = lane % 8, lmat = lane / 8;
  // A tile's math: the warp's scores of its NK keys (S = Q K^T), then O += P V.
  auto tile_scores = [&](int buf, float(&s)[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        // Matrices: keys nt*8.. at d kk*16 and kk*16+8, then keys (nt+1)*8.. likewise.
        uint32_t b[4];
        ldmatrix_x4(b, kv_chunk(buf, false, kb + (nt + lmat / 2) * 8 + lrow, kk * 2 + lmat % 2));
        mma_16816(s[nt], qf[kk], b[0], b[1]);
        mma_16816(s[nt + 1], qf[kk], b[2], b[3]);
      }
    }
  };
  auto tile_values = [&](int buf, const float(&s)[NT][4]) {
#pragma unroll
    for (int ks = 0; ks < NK / 16; ++ks) {
      const uint32_t pa[4] = {pack_bf16(s[2 * ks][0], s[2 * ks][1]),
                              pack_bf16(s[2 * ks][2], s[2 * ks][3]),
                              pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                              pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
      for (int nd = 0; nd < D / 8; nd += 2) {
        // Transposed matrices: keys ks*16.. and ks*16+8.. at d nd*8, then at d (nd+1)*8.
        uint32_t b[4];
        ldmatrix_x4_trans(b,
                          kv_chunk(buf, true, kb + ks * 16 + (lmat % 2) * 8 + lrow, nd + lmat / 2));
        mma_16816(o[nd], pa, b[0], b[1]);
        mma_16816(o[nd + 1], pa, b[2], b[3]);
      }
    }
  };
  if constexpr (kWs) {
    if (warp == KW) {
      // The producer warp streams every tile of the range, keys into full[] and values into
      // full_v[] of buffer i % NB once the consumers have released that buffer's previous keys
      // (empty_k) or values (empty_v); lane 0 issues. The block-table entries come 32 blocks at
      // a time, one per lane, a chunk ahead (a tile's blocks never straddle two chunks: a chunk
      // is 4-32 whole tiles).
      const int first_block = k_begin >> a.block_shift;
      const int last_block = (k_end - 1) >> a.block_shift;
      auto load_chunk = [&](int chunk) {
        const int b = first_block + 32 * chunk + lane;
        return k_begin < k_end && b <= last_block ? table[b] : 0;
      };
      int cur = load_chunk(0), next = load_chunk(1), chunk = 0;
      auto send = [&](int kt, bool values, int buf) {
        const int first = kt >> a.block_shift, last = (min(kt + BN, k_end) - 1) >> a.block_shift;
        uint64_t* bar = values ? &full_v[buf] : &full[buf];
        if (lane == 0) mbar_arrive_expect_tx(bar, (last - first + 1) * a.block_size * 128 * 2);
        unsigned char* dst = ring + (2 * buf + values) * kTileBytes;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          if (first + j > last) break;
          const int entry = __shfl_sync(0xffffffffu, cur, first + j - first_block - 32 * chunk);
          const int slot0 = entry << a.block_shift, row = ((first + j) << a.block_shift) - kt;
          if (lane == 0) {
            for (int half = 0; half < 2; ++half) {
              tma_load_3d(dst + half * kHalf + row * 128, values ? &v_map : &k_map, bar, half * 64,
                          kvh, slot0);
            }
          }
        }
      };
      bool waited = false;
      for (int kt = k_begin, i = 0; kt < k_end; kt += BN, ++i) {
        const int b = i % NB;
        const uint32_t parity = ((i / NB) & 1) ^ 1;  // the phase that freed the buffer
        if ((kt >> a.block_shift) - first_block >= 32 * (chunk + 1)) {
          cur = next;
          ++chunk;
          next = load_chunk(chunk + 1);
        }
        if (!waited && !early(kt)) {
          asm volatile("griddepcontrol.wait;" ::: "memory");
          waited = true;
        }
        if (i >= NB) mbar_wait(&empty_k[b], parity);
        send(kt, false, b);
        if (i >= NB) mbar_wait(&empty_v[b], parity);
        send(kt, true, b);
      }
      asm volatile("griddepcontrol.wait;" ::: "memory");  // before the merge's stores
    } else {
      // The consumers: no CTA barrier in the key loop; each warp gives a buffer's keys back
      // once it has its scores, and its values once it has P V.
      asm volatile("griddepcontrol.wait;" ::: "memory");
      load_q();
      cp_async_wait<0>();
      named_barrier_sync(1, kConsumers);
      load_qf();
      int buf = 0;
      for (int kt = k_begin, it = 0; kt < k_end;
           kt += BN, buf = buf + 1 == NB ? 0 : buf + 1, ++it) {
        const uint32_t parity = (it / NB) & 1;
        float s[NT][4];
        mbar_wait(&full[buf], parity);
        tile_scores(buf, s);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty_k[buf]);
        softmax_step(s, o, m, l, kt + kb, k_end, pos, min_pos, scale_log2);
        mbar_wait(&full_v[buf], parity);
        tile_values(buf, s);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty_v[buf]);
      }
    }
  } else {
    if constexpr (kTma) {
      for (int b = 0; b < NB - 1; ++b) {
        const int kt = k_begin + b * BN;
        if (kt < k_end && early(kt)) load_kv(b, kt);
      }
      asm volatile("griddepcontrol.wait;" ::: "memory");
      load_q();
    }
    for (int b = 0; b < NB - 1; ++b) {  // the first NB - 1 key tiles, one group each
      const int kt = k_begin + b * BN;
      if (kt < k_end && !early(kt)) load_kv(b, kt);
      cp_async_commit();
    }
    if constexpr (kSpread) {
      // The first tile of the loop's issue: its entries, and its bytes on its (unused) buffer.
      const int kt = k_begin + (NB - 1) * BN;
      fetch(kt);
      if (threadIdx.x == 0 && kt < k_end) expect(NB - 1, kt);
    }
    cp_async_wait<NB - 1>();  // the query rows have landed
    __syncthreads();
    load_qf();
    int buf = 0;
    for (int kt = k_begin, it = 0; kt < k_end; kt += BN, buf = buf + 1 == NB ? 0 : buf + 1, ++it) {
      cp_async_wait<NB - 2>();  // this tile has landed (for this thread's copies) ...
      __syncthreads();          // ... for all, and everyone is done with the previous tile
      // The tile NB - 1 ahead goes into the previous tile's buffer.
      const int ahead = kt + (NB - 1) * BN;
      if constexpr (kSpread) {
        if (ahead < k_end) {
          issue(buf == 0 ? NB - 1 : buf - 1, ahead);
          fetch(ahead + BN);
        }
      } else {
        if (ahead < k_end) load_kv(buf == 0 ? NB - 1 : buf - 1, ahead);
      }
      cp_async_commit();
      if constexpr (kTma) mbar_wait(&full[buf], (it / NB) & 1);
      if constexpr (kSpread) {
        // This buffer's next tile (issued after the next barrier, once every warp is done here).
        if (threadIdx.x == 0 && ahead + BN < k_end) expect(buf, ahead + BN);
      }
      float s[NT][4];
      tile_scores(buf, s);
      softmax_step(s, o, m, l, kt + kb, k_end, pos, min_pos, scale_log2);
      tile_values(buf, s);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }

  if constexpr (KW == 1) {
    // Writes one output element of local row r (un-normalised o, row max m in log2 units, sum l).
    auto emit = [&](int r, int d, float ov, float mr, float lr) {
      const int row = row0 + r;
      if (row >= rows) return;
      const size_t t = q0 + row / group, h = kvh * group + row % group;
      const float val = lr > 0.0f ? ov / lr : 0.0f;
      if (a.splits == 1) {
        a.out[(t * a.heads + h) * D + d] = __float2bfloat16(val);
      } else {
        const size_t idx = (static_cast<size_t>(split) * a.tokens + t) * a.heads + h;
        a.partial_o[idx * D + d] = val;
        if (d == 0) a.partial_lse[idx] = lr > 0.0f ? mr + log2f(lr) : -INFINITY;
      }
    };
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2;
        emit(wr * 16 + g + 8 * i, nd * 8 + 2 * c + (e & 1), o[nd][e], m[i], l[i]);
      }
    }
  } else {
    // Merge of the KW key quarters. Each warp's un-normalised rows go to shared memory (rows of
    // D + 8 floats: a half warp's 8-byte stores then hit 32 distinct banks), one thread per row
    // turns the warps' maxima and sums into weights, then only the tile's rows that exist (5 of
    // 16 for one token of 20 heads over 4 KV heads) are summed, 16 bytes at a time.
    constexpr int LO = D + 8;
    static_assert((KW * 16 * LO + 2 * KW * 16 + 16) * sizeof(float) <=
                  2 * NB * BN * (kTma ? 128 : LD) * sizeof(__nv_bfloat16));
    __syncthreads();  // K/V tiles are free: reuse them for the merge
    // Addressed from smem_raw so that the compiler keeps to shared-memory instructions.
    float* mo = reinterpret_cast<float*>(smem_raw + (ring - smem_raw));  // [KW][16][LO]
    float* mw = mo + KW * 16 * LO;            // [KW][16]: maxima (log2 units), then weights
    float* ml = mw + KW * 16;                 // [KW][16]: sums
    float* lse = ml + KW * 16;                // [16]
    const bool consumer = !kWs || warp < KW;  // kWs: the producer warp holds no rows
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (consumer) {
          *reinterpret_cast<float2*>(mo + (wk * 16 + g + 8 * i) * LO + nd * 8 + 2 * c) =
              make_float2(o[nd][2 * i], o[nd][2 * i + 1]);
        }
      }
    }
    if (consumer && c == 0) {
      for (int i = 0; i < 2; ++i) {
        mw[wk * 16 + g + 8 * i] = m[i];
        ml[wk * 16 + g + 8 * i] = l[i];
      }
    }
    __syncthreads();
    if (threadIdx.x < 16) {
      const int r = threadIdx.x;
      float mr = -INFINITY, f[KW], lr = 0.0f;
#pragma unroll
      for (int w = 0; w < KW; ++w) mr = fmaxf(mr, mw[w * 16 + r]);
#pragma unroll
      for (int w = 0; w < KW; ++w) {
        const float mx = mw[w * 16 + r];
        f[w] = mx == -INFINITY ? 0.0f : fast_exp2(mx - mr);
        lr += ml[w * 16 + r] * f[w];
      }
#pragma unroll
      for (int w = 0; w < KW; ++w) mw[w * 16 + r] = lr > 0.0f ? f[w] / lr : 0.0f;
      lse[r] = lr > 0.0f ? mr + log2f(lr) : -INFINITY;
    }
    __syncthreads();
    const int valid = min(16, rows - row0);
    for (int idx = threadIdx.x; idx < valid * (D / 4); idx += kThreads) {
      const int r = idx / (D / 4), d = idx % (D / 4) * 4;
      float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int w = 0; w < KW; ++w) {
        const float f = mw[w * 16 + r];
        const float4 v = *reinterpret_cast<const float4*>(mo + (w * 16 + r) * LO + d);
        acc.x += f * v.x;
        acc.y += f * v.y;
        acc.z += f * v.z;
        acc.w += f * v.w;
      }
      const int row = row0 + r;
      const size_t t = q0 + row / group, h = kvh * group + row % group;
      if (a.splits == 1) {
        *reinterpret_cast<uint2*>(a.out + (t * a.heads + h) * D + d) =
            make_uint2(pack_bf16(acc.x, acc.y), pack_bf16(acc.z, acc.w));
      } else {
        const size_t pi = (static_cast<size_t>(split) * a.tokens + t) * a.heads + h;
        *reinterpret_cast<float4*>(a.partial_o + pi * D + d) = acc;
        if (d == 0) a.partial_lse[pi] = lse[r];
      }
    }
  }
}

// The end of a wgmma attention tile: each warp's 16 rows (first row `row`; rows g and g + 8 of
// the m16n8 layout) normalised and stored as bf16, or as f32 partials with their log-sum-exp
// when the keys are split. l holds each thread's partial sums (reduced over the quad here).
template <int ND>
__device__ __forceinline__ void store_rows(const PagedAttentionArgs& a, const float (&o)[ND][4],
                                           const float (&m)[2], float (&l)[2], int row, int rows,
                                           int q0, int group, int kvh, int split) {
  constexpr int D = ND * 8;
  const int g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row + g + 8 * i;
    if (r >= rows) continue;
    const size_t t = q0 + r / group, h = kvh * group + r % group;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
      const int d = nd * 8 + 2 * c;
      const float v0 = o[nd][2 * i] * inv, v1 = o[nd][2 * i + 1] * inv;
      if (a.splits == 1) {
        *reinterpret_cast<__nv_bfloat162*>(a.out + (t * a.heads + h) * D + d) =
            __floats2bfloat162_rn(v0, v1);
      } else {
        const size_t idx = (static_cast<size_t>(split) * a.tokens + t) * a.heads + h;
        a.partial_o[idx * D + d] = v0;
        a.partial_o[idx * D + d + 1] = v1;
        if (d == 0) a.partial_lse[idx] = l[i] > 0.0f ? m[i] + log2f(l[i]) : -INFINITY;
      }
    }
  }
}

// Prefill tiles for head_dim 128 on wgmma (sm_90a): one warpgroup per 64 query rows. Q and
// double-buffered 64-key K/V tiles land by cp.async in the 128-byte swizzled layout (two
// 64-column halves of 64 rows x 128 bytes each, the swizzle computed); S = Q K^T is a wgmma
// with both operands in shared memory, the softmax runs on S in registers exactly as in the
// mma.sync kernel (the accumulator of each warp has the m16n8 layout), and O += P V takes P from
// registers and V as an N-major operand.
constexpr int kWgD = 128, kWgRows = 64, kWgHalf = 64 * 128;  // bytes of a 64-row half tile
constexpr size_t kWgAttnSmem = 1024 + 5 * 2 * kWgHalf;       // Q + 2 x (K, V)

// Byte offset of 16-byte chunk `ch` (of 16) of row `r` in a swizzled 64-row tile.
__device__ __forceinline__ int swz64(int r, int ch) {
  return (ch / 8) * kWgHalf + r * 128 + (((ch % 8) ^ (r % 8)) << 4);
}

// The 64 query rows from row0 of a tile into `dst` (swizzled, rows past `rows` zero) by
// cp.async, the 128 threads of one warpgroup (thread: this thread's index in it); the caller
// commits and waits.
__device__ __forceinline__ void load_q_rows(unsigned char* dst, const PagedAttentionArgs& a,
                                            int row0, int rows, int q0, int group, int kvh,
                                            int thread) {
  constexpr int kChunks = kWgD / 8;
  const size_t row_stride = static_cast<size_t>(a.heads + 2 * a.kv_heads) * kWgD;
  for (int i = thread; i < kWgRows * kChunks; i += 128) {
    const int r = i / kChunks, ch = i % kChunks, row = row0 + r;
    const bool valid = row < rows;
    const __nv_bfloat16* src = a.qkv;
    if (valid) {
      src = a.qkv + static_cast<size_t>(q0 + row / group) * row_stride +
            static_cast<size_t>(kvh * group + row % group) * kWgD + ch * 8;
    }
    cp_async_16(dst + swz64(r, ch), src, valid);
  }
}

// This kernel takes the cache layouts that TMA cannot (block sizes other than 8, 16, 32, 64).
__global__ void __launch_bounds__(128) prefill_attention_wgmma_kernel(const PagedAttentionArgs a) {
  constexpr int D = kWgD, BN = kKeysPerTile, kChunks = D / 8;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  unsigned char* sq = smem;  // [2 halves][64 rows][128 bytes], swizzled
  auto k_tile = [&](int buf) { return smem + (1 + 2 * buf) * 2 * kWgHalf; };
  auto v_tile = [&](int buf) { return smem + (2 + 2 * buf) * 2 * kWgHalf; };

  const int tile = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const auto [seq, row0, group, q0, rows, k_begin, k_end] = tile_span(a, tile, split, kWgRows);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;

  load_q_rows(sq, a, row0, rows, q0, group, kvh, threadIdx.x);
  const int32_t* table = a.block_tables + static_cast<size_t>(seq) * a.dims[1];
  auto load_kv = [&](int buf, int kt) {
    unsigned char* sk = k_tile(buf);
    unsigned char* sv = v_tile(buf);
    for (int i = threadIdx.x; i < BN * kChunks; i += 128) {
      const int key = i / kChunks, ch = i % kChunks, j = kt + key;
      const bool valid = j < k_end;  // rows past the range are zero (never NaN * 0)
      size_t off = 0;
      if (valid) {
        const int64_t slot = key_slot(table, j, a.block_size, a.block_shift);
        off = (static_cast<size_t>(slot) * a.kv_heads + kvh) * D + ch * 8;
      }
      cp_async_16(sk + swz64(key, ch), a.k_cache + off, valid);
      cp_async_16(sv + swz64(key, ch), a.v_cache + off, valid);
    }
  };
  if (k_begin < k_end) load_kv(0, k_begin);
  cp_async_commit();

  int pos[2];
  for (int i = 0; i < 2; ++i) {
    const int row = row0 + warp * 16 + g + 8 * i;
    pos[i] = row < rows ? a.positions[q0 + row / group] : -1;
  }
  int min_pos = min(pos[0], pos[1]);
  for (int o = 16; o > 0; o >>= 1) min_pos = min(min_pos, __shfl_xor_sync(0xffffffffu, min_pos, o));
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[D / 8][4];  // the wgmma m64n128 accumulator: 16 column tiles of 4
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
  const float scale_log2 = a.scale * kLog2e;

  int buf = 0;
  for (int kt = k_begin, t = 0; kt < k_end; kt += BN, buf ^= 1, ++t) {
    __syncthreads();  // everyone is done with the other buffer (the previous tile)
    if (kt + BN < k_end) load_kv(buf ^ 1, kt + BN);
    cp_async_commit();
    cp_async_wait<1>();  // this tile (and the query rows) have landed
    fence_proxy_async();
    __syncthreads();
    const unsigned char* sk = k_tile(buf);
    const unsigned char* sv = v_tile(buf);

    float s[BN / 8][4];  // the wgmma m64n64 accumulator: 8 column tiles of 4
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int off = (kk / 4) * kWgHalf + (kk % 4) * 32;
      wgmma_m64n64k16(reinterpret_cast<float(&)[32]>(s), wgmma_desc_sw128(sq + off),
                      wgmma_desc_sw128(sk + off), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();

    softmax_step(s, o, m, l, kt, k_end, pos, min_pos, scale_log2);
    uint32_t pa[BN / 16][4];
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float* q = s[2 * ks + r / 2] + 2 * (r % 2);
        pa[ks][r] = pack_bf16(q[0], q[1]);
      }
    }
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      // Keys 16 ks.. (two 8-key groups of 1024 bytes), d 0..63 and (8 KB further) 64..127.
      wgmma_m64n128k16_rs(reinterpret_cast<float(&)[64]>(o), pa[ks],
                          wgmma_desc_sw128_mn(sv + ks * 2048, kWgHalf));
    }
    wgmma_commit();
    wgmma_wait<0>();
  }
  cp_async_wait<0>();
  store_rows(a, o, m, l, row0 + warp * 16, rows, q0, group, kvh, split);
}

// Prefill tiles for head_dim 128 when K/V can come by TMA (power-of-two blocks of 8-64), planned
// in pairs (AttentionPlan::paired): one CTA takes 128 query rows, a consumer warpgroup per 64,
// and a producer warpgroup. One producer thread streams the key range's 128-key K/V tiles by
// TMA through a kFaStages-deep ring (a full and an empty mbarrier per stage); both consumers run
// every tile through S = Q K^T and P V on wgmma as in prefill_attention_wgmma_kernel, each with
// its own online softmax, and hand the stage back once done. Every K/V byte that reaches the SM
// serves 128 rows (the L2 traffic of 64-row tiles bound the kernel), nothing in the key loop
// waits on the whole CTA, and two warpgroups share the tensor cores of one SM. 128-key tiles
// (64-key ones measured 0.867 ms for 1 x 8000) halve the softmax's fixed work and the
// handshakes per key.
constexpr int kFaKeys = 128, kFaStages = 3, kFaConsumers = 2;
constexpr int kFaHalf = kFaKeys * 128;  // bytes of one 64-column half of a K or V tile
constexpr size_t kFaSmem = 1024 + 2 * kFaConsumers * kWgHalf + 4 * kFaStages * kFaHalf;
// Registers per thread after reallocation: 128 x 40 + 256 x 232 <= 64K. A consumer holds O and
// S (64 floats each) and P (32 registers) of a 128-key tile: without the reallocation ptxas
// spills (128 bytes at 166 registers), with it none.
constexpr int kFaProducerRegs = 40, kFaConsumerRegs = 232;

__global__ void __launch_bounds__(128 * (kFaConsumers + 1), 1)
    prefill_attention_fa_kernel(const PagedAttentionArgs a,
                                const __grid_constant__ CUtensorMap k_map,
                                const __grid_constant__ CUtensorMap v_map) {
  constexpr int D = kWgD, BN = kFaKeys, NC = kFaConsumers;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  unsigned char* sq = smem;  // per consumer: [2 halves][64 rows][128 bytes], swizzled
  unsigned char* ring = smem + 2 * NC * kWgHalf;  // per stage: K, V as [2 halves][BN rows][128 B]
  auto k_tile = [&](int st) { return ring + 4 * st * kFaHalf; };
  auto v_tile = [&](int st) { return ring + (4 * st + 2) * kFaHalf; };
  __shared__ __align__(8) uint64_t full[kFaStages], empty[kFaStages];

  // The plan lists the pairs longest first (plan_attention).
  const int pair = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const auto [seq, row0, group, q0, rows, k_begin, k_end] =
      tile_span(a, 2 * pair, split, NC * kWgRows);
  const int n_tiles = k_begin < k_end ? (k_end - k_begin + BN - 1) / BN : 0;
  const int32_t* table = a.block_tables + static_cast<size_t>(seq) * a.dims[1];

  // Rows of the last tile past the sequence's last cache block are never loaded. In a stage
  // used before they hold an earlier tile (finite: masked keys get probability 0 and 0 * V
  // stays 0); in a fresh stage they could hold anything, so its V rows start at zero.
  if (n_tiles > 0 && n_tiles <= kFaStages) {
    for (int i = threadIdx.x; i < 2 * kFaHalf / 16; i += blockDim.x) {
      reinterpret_cast<uint4*>(v_tile(n_tiles - 1))[i] = make_uint4(0, 0, 0, 0);
    }
  }
  if (threadIdx.x == 0) {
    for (int st = 0; st < kFaStages; ++st) {
      mbar_init(&full[st], 1);
      mbar_init(&empty[st], 4 * NC);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  fence_proxy_async();
  __syncthreads();  // the last CTA-wide barrier: the producer leaves early

  if (threadIdx.x < 128) {  // ---- producer warpgroup: one thread issues every load ----
    setmaxnreg_dec<kFaProducerRegs>();
    if (threadIdx.x == 0) {
      const int bs = a.block_size;
      for (int t = 0; t < n_tiles; ++t) {
        const int st = t % kFaStages;
        // The first round of the ring is free; later, wait for the consumers of round - 1.
        if (t >= kFaStages) mbar_wait(&empty[st], ((t / kFaStages) - 1) & 1);
        const int kt = k_begin + t * BN;
        const int first = kt / bs, last = (min(kt + BN, k_end) - 1) / bs;
        mbar_arrive_expect_tx(&full[st], (last - first + 1) * bs * 128 * 4);
        for (int b = first; b <= last; ++b) {
          const int slot0 = table[b] * bs, row = b * bs - kt;
          for (int half = 0; half < 2; ++half) {
            tma_load_3d(k_tile(st) + half * kFaHalf + row * 128, &k_map, &full[st], half * 64, kvh,
                        slot0);
            tma_load_3d(v_tile(st) + half * kFaHalf + row * 128, &v_map, &full[st], half * 64, kvh,
                        slot0);
          }
        }
      }
    }
    return;
  }

  // ---- consumer warpgroups: consumer `cons` owns rows row0 + 64 cons .. + 63 ----
  setmaxnreg_inc<kFaConsumerRegs>();
  const int ct = threadIdx.x - 128, cons = ct / 128;
  const int warp = (ct % 128) / 32, lane = ct % 32, g = lane / 4;
  const int my_row0 = row0 + cons * kWgRows;
  if (my_row0 >= rows) {
    // The pair's second tile lies past the sequence's rows (a short prompt, a decode in a mixed
    // step): nothing to compute, but every stage still needs this warpgroup's release.
    for (int t = 0; t < n_tiles; ++t) {
      const int st = t % kFaStages;
      mbar_wait(&full[st], (t / kFaStages) & 1);
      if (lane == 0) mbar_arrive(&empty[st]);
    }
    return;
  }
  unsigned char* my_q = sq + cons * 2 * kWgHalf;
  load_q_rows(my_q, a, my_row0, rows, q0, group, kvh, ct % 128);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();  // the query rows are read by wgmma (the async proxy)
  named_barrier_sync(1 + cons, 128);

  int pos[2];
  for (int i = 0; i < 2; ++i) {
    const int row = my_row0 + warp * 16 + g + 8 * i;
    pos[i] = row < rows ? a.positions[q0 + row / group] : -1;
  }
  int min_pos = min(pos[0], pos[1]);
  for (int o = 16; o > 0; o >>= 1) min_pos = min(min_pos, __shfl_xor_sync(0xffffffffu, min_pos, o));
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[D / 8][4];  // the wgmma m64n128 accumulator: 16 column tiles of 4
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
  const float scale_log2 = a.scale * kLog2e;

  // Each tile's P V overlaps the next tile's S = Q K^T and softmax: the S wgmma and the previous
  // tile's P V go out together, the softmax starts once S lands, and the output is rescaled
  // (rarely) and P replaced only after P V completes. A stage goes back to the producer once
  // its P V is done.
  uint32_t pa[BN / 16][4];  // the previous tile's probabilities, the A fragments of P V
  int pending = -1;         // ring stage of the tile whose P V is in flight
  auto issue_pv = [&](int st) {
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      // Keys 16 ks.. (two 8-key groups of 1024 bytes), d 0..63 and (kFaHalf further) 64..127.
      wgmma_m64n128k16_rs(reinterpret_cast<float(&)[64]>(o), pa[ks],
                          wgmma_desc_sw128_mn(v_tile(st) + ks * 2048, kFaHalf));
    }
    wgmma_commit();
  };
  auto retire_pv = [&] {  // after the wait that completes the pending P V
    fence_regs(reinterpret_cast<float(&)[D / 2]>(o));
    fence_regs(reinterpret_cast<uint32_t(&)[BN / 4]>(pa));
    if (lane == 0) mbar_arrive(&empty[pending]);  // this warp no longer reads the stage
  };
  // S = Q K^T of tile t into s (issued and committed; the caller waits).
  auto issue_s = [&](float(&s)[BN / 8][4], int t) {
    const int st = t % kFaStages;
    mbar_wait(&full[st], (t / kFaStages) & 1);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int col = (kk % 4) * 32;  // 16 of d within a 64-column half
      wgmma_m64n128k16(reinterpret_cast<float(&)[64]>(s),
                       wgmma_desc_sw128(my_q + (kk / 4) * kWgHalf + col),
                       wgmma_desc_sw128(k_tile(st) + (kk / 4) * kFaHalf + col), kk > 0);
    }
    wgmma_commit();
  };
  // Tile t's probabilities from its landed S into pa (the A operand of its P V).
  auto pack_p = [&](float(&s)[BN / 8][4]) {
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float* q = s[2 * ks + r / 2] + 2 * (r % 2);
        pa[ks][r] = pack_bf16(q[0], q[1]);
      }
    }
  };
  // The first tile has no P V before it; every later one issues its S together with the
  // previous tile's P V, with no branch between the wgmmas (a wgmma issued on one side of a
  // branch makes ptxas serialise them all).
  if (n_tiles > 0) {
    float s[BN / 8][4];  // the wgmma m64n128 accumulator: 16 column tiles of 4
    issue_s(s, 0);
    wgmma_wait<0>();
    fence_regs(reinterpret_cast<float(&)[BN / 2]>(s));
    float rescale[2];
    softmax_probs(s, m, l, rescale, k_begin, k_end, pos, min_pos, scale_log2);  // o is still 0
    pack_p(s);
    pending = 0;
  }
  for (int t = 1; t < n_tiles; ++t) {
    const int st = t % kFaStages, kt = k_begin + t * BN;
    float s[BN / 8][4];
    issue_s(s, t);
    issue_pv(pending);
    wgmma_wait<1>();  // S has landed; P V may still run
    fence_regs(reinterpret_cast<float(&)[BN / 2]>(s));
    float rescale[2];
    const bool moved = softmax_probs(s, m, l, rescale, kt, k_end, pos, min_pos, scale_log2);
    wgmma_wait<0>();
    retire_pv();
    if (moved) rescale_rows(o, rescale);
    pack_p(s);
    pending = st;
  }
  if (pending >= 0) {
    wgmma_fence();
    issue_pv(pending);
    wgmma_wait<0>();
    retire_pv();
  }
  store_rows(a, o, m, l, my_row0 + warp * 16, rows, q0, group, kvh, split);
}

// Tensor maps over one layer's K or V cache [slots, kv_heads, 128] with 64 x 1 x block_size
// boxes, kept per cache address and shape (encoding one costs host time every step otherwise).
const CUtensorMap& cache_map(const __nv_bfloat16* cache, const PagedAttentionArgs& a) {
  struct Key {
    const void* p;
    int64_t slots;
    int kv_heads, block_size;
    bool operator==(const Key&) const = default;
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.p) ^ std::hash<int64_t>()(k.slots * 1315423911LL) ^
             static_cast<size_t>(k.kv_heads * 31 + k.block_size);
    }
  };
  static std::unordered_map<Key, CUtensorMap, Hash> maps;
  const Key key{cache, a.cache_slots, a.kv_heads, a.block_size};
  auto it = maps.find(key);
  if (it == maps.end()) {
    if (maps.size() > 4096) maps.clear();  // caches reallocated many times over
    const int64_t dims[3] = {kWgD, a.kv_heads, a.cache_slots};
    const int box[3] = {64, 1, a.block_size};
    it = maps.emplace(key, tensor_map_bf16_sw128_3d(cache, dims, box)).first;
  }
  return it->second;
}

// K/V tiles can come by TMA: one box per cache block (power-of-two blocks of 8-64 keys).
bool tma_loads(const PagedAttentionArgs& a) {
  return a.cache_slots > 0 && a.block_shift >= 3 && a.block_size <= kKeysPerTile;
}

void launch_prefill_wgmma(const PagedAttentionArgs& a, cudaStream_t stream) {
  if (a.paired) {
    require(tma_loads(a) && a.num_tiles % 2 == 0, "paged_attention: bad paired plan");
    static bool configured = false;
    if (!configured) {
      ERNIE_CUDA_CHECK(cudaFuncSetAttribute(prefill_attention_fa_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kFaSmem)));
      configured = true;
    }
    const dim3 grid(a.num_tiles / 2, a.kv_heads, a.splits);
    prefill_attention_fa_kernel<<<grid, 128 * (kFaConsumers + 1), kFaSmem, stream>>>(
        a, cache_map(a.k_cache, a), cache_map(a.v_cache, a));
  } else {
    static bool configured = false;
    if (!configured) {
      ERNIE_CUDA_CHECK(cudaFuncSetAttribute(prefill_attention_wgmma_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kWgAttnSmem)));
      configured = true;
    }
    const dim3 grid(a.num_tiles, a.kv_heads, a.splits);
    prefill_attention_wgmma_kernel<<<grid, 128, kWgAttnSmem, stream>>>(a);
  }
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

// One CTA per (token, head), one thread per output element. Only the splits that start at or
// before the token's position can hold its keys; the first warp turns their log-sum-exps into
// weights, then each thread sums its element over them, eight loads in flight at a time.
constexpr int kMaxSplits = 64;
// kEarlyMeta (the default; ERNIE_COMBINE_EARLY_META=0 turns it off; step 1 x 1000 -0.3%, never
// slower, in the twelfth round's A/B): the token's position and the
// split size (step inputs, which no kernel writes) come by cp.async before the wait, so the
// wait is followed by two L2 trips (log-sum-exps, then partials) instead of three.
template <bool kEarlyMeta>
__global__ void combine_splits_kernel(__nv_bfloat16* out, const float* partial_o,
                                      const float* partial_lse, const int32_t* positions,
                                      const int32_t* dims, int tokens, int heads, int d,
                                      int splits) {
  __shared__ float weight[kMaxSplits];
  const size_t th = blockIdx.x;
  const size_t plane = static_cast<size_t>(tokens) * heads;
  int active;
  if constexpr (kEarlyMeta) {
    __shared__ int32_t meta[2];  // the position, the split size
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (threadIdx.x == 0) cp_async_4(&meta[0], positions + th / heads);
    if (threadIdx.x == 1) cp_async_4(&meta[1], dims);
    cp_async_commit();
    asm volatile("griddepcontrol.wait;" ::: "memory");
    cp_async_wait<0>();
    __syncthreads();
    active = min(splits, meta[0] / meta[1] + 1);
  } else {
    pdl_begin();
    active = min(splits, positions[th / heads] / dims[0] + 1);
  }
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float lse[kMaxSplits / 32], mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < kMaxSplits / 32; ++i) {
      const int s = lane + 32 * i;
      lse[i] = s < active ? partial_lse[s * plane + th] : -INFINITY;
      mx = fmaxf(mx, lse[i]);
    }
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxSplits / 32; ++i) {
      lse[i] = lse[i] == -INFINITY ? 0.0f : fast_exp2(lse[i] - mx);
      sum += lse[i];
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxSplits / 32; ++i) {
      if (lane + 32 * i < active) weight[lane + 32 * i] = lse[i] * inv;
    }
  }
  __syncthreads();
  const float* src = partial_o + th * d + threadIdx.x;
  float acc = 0.0f;
  int s = 0;
  for (; s + 8 <= active; s += 8) {
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = src[(s + j) * plane * d];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc += weight[s + j] * v[j];
  }
  for (; s < active; ++s) acc += weight[s] * src[s * plane * d];
  out[th * d + threadIdx.x] = __float2bfloat16(acc);
}

// Dynamic shared memory of paged_attention_kernel<D, RW, ., NB, kTma>.
template <int D, int RW, int NB, bool kTma>
constexpr size_t attention_smem() {
  constexpr size_t q_bytes = static_cast<size_t>(16 * RW) * (D + 8) * sizeof(__nv_bfloat16);
  return kTma ? 1024 + 2 * NB * 2 * kKeysPerTile * 128 + q_bytes
              : q_bytes +
                    static_cast<size_t>(2 * NB * kKeysPerTile) * (D + 8) * sizeof(__nv_bfloat16);
}

template <int D, int RW, int KW, int NB, bool kTma = false, int kIssue = 0>
void launch(const PagedAttentionArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 32 * RW * KW + (kIssue == 2 ? 32 : 0);
  constexpr size_t smem = attention_smem<D, RW, NB, kTma>();
  auto* kernel = paged_attention_kernel<D, RW, KW, NB, kTma, kIssue>;
  static bool configured = false;  // set once per instantiation (host, single engine thread)
  if (!configured) {
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    configured = true;
  }
  // Decode: a tile's KV heads in consecutive CTAs. A cache slot holds its KV heads' rows side
  // by side (1 KB for the 21B model's four); with every tile of head 0 first, a multi-wave grid
  // read each slot's pieces waves apart, and the stream ran at 2.56-3.04 TB/s by placement of
  // the caches against 3.03-3.07 in this order (H100, stream probe; steps 256 x 1000 and
  // 256 x 2000 -0.3 to -1.8% on two machines, 256 prompts +0.6%: docs/performance.md,
  // thirty-fifth round).
  // ERNIE_ATTN_HEADS_INNER=0 turns it off.
  static const bool heads_inner_on = path_enabled("ERNIE_ATTN_HEADS_INNER");
  PagedAttentionArgs b = a;
  b.heads_inner = heads_inner_on && a.decode_shape && a.num_tiles <= 65535;
  const dim3 grid = b.heads_inner ? dim3(a.kv_heads, a.num_tiles, a.splits)
                                  : dim3(a.num_tiles, a.kv_heads, a.splits);
  if constexpr (kTma) {
    launch_pdl(kernel, grid, kThreads, smem, stream, b, cache_map(a.k_cache, a),
               cache_map(a.v_cache, a));
  } else {
    const CUtensorMap unused{};
    launch_pdl(kernel, grid, kThreads, smem, stream, b, unused, unused);
  }
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

// CTAs of the TMA decode kernel with its producer warp that are resident at once.
int producer_decode_slots() {
  static const int slots = [] {
    auto* kernel = paged_attention_kernel<kWgD, 1, 4, kDecodeBuffers, true, 2>;
    constexpr size_t smem = attention_smem<kWgD, 1, kDecodeBuffers, true>();
    int device = 0, sms = 0, per_sm = 0;
    ERNIE_CUDA_CHECK(cudaGetDevice(&device));
    ERNIE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    ERNIE_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 4 * 32 + 32, smem));
    return sms * per_sm;
  }();
  return slots;
}

template <int D>
void launch_d(const PagedAttentionArgs& a, cudaStream_t stream) {
  // ERNIE_ATTN_SPREAD: 0 thread 0 issues, 1 the spread issue, 2 the producer warp; unset: the
  // producer warp where the grid is one wave, else the spread issue. Measured (H200, decode
  // attention): the producer warp 16 x 8500 0.076 -> 0.072 ms, 64 x 1500 0.052 -> 0.049, one
  // token 0.011 -> 0.009, but 256 x 1500 (four waves) 0.193 -> 0.197.
  static const int issue = switch_bits("ERNIE_ATTN_SPREAD", -1);
  if (a.decode_shape && D == kWgD && tma_loads(a)) {
    const bool one_wave =
        static_cast<int64_t>(a.num_tiles) * a.kv_heads * a.splits <= producer_decode_slots();
    if (issue == 2 || (issue == -1 && one_wave)) {
      launch<kWgD, 1, 4, kDecodeBuffers, true, 2>(a, stream);
    } else if (issue != 0) {
      launch<kWgD, 1, 4, kDecodeBuffers, true, 1>(a, stream);
    } else {
      launch<kWgD, 1, 4, kDecodeBuffers, true>(a, stream);
    }
  } else if (a.decode_shape) {
    launch<D, 1, 4, kDecodeBuffers>(a, stream);
  } else if (D == kWgD) {
    launch_prefill_wgmma(a, stream);
  } else {
    launch<D, kPrefillRowWarps, 1, 2>(a, stream);
  }
}

}  // namespace

bool prefill_tiles_paired(int head_dim, int block_size) {
  return head_dim == kWgD && block_size >= 8 && block_size <= kKeysPerTile &&
         (block_size & (block_size - 1)) == 0;
}

AttentionPlan plan_attention(const std::vector<int32_t>& query_start,
                             const std::vector<int32_t>& context_lens, int heads, int kv_heads,
                             int sms, bool fixed_splits, bool pair_prefill, int min_split_keys) {
  AttentionPlan p;
  const int group = heads / kv_heads;
  const int seqs = static_cast<int>(context_lens.size());
  p.decode_shape = true;
  for (int s = 0; s < seqs; ++s) {
    if ((query_start[s + 1] - query_start[s]) * group > kAttentionDecodeRows) {
      p.decode_shape = false;
    }
  }
  const int bm = p.decode_shape ? kAttentionDecodeRows : kAttentionPrefillRows;
  p.paired = pair_prefill && !p.decode_shape;
  const int step = p.paired ? 2 * bm : bm;
  int max_ctx = 0;
  for (int s = 0; s < seqs; ++s) {
    const int rows = (query_start[s + 1] - query_start[s]) * group;
    for (int r = 0; r < rows; r += step) {
      for (int t = 0; t < step / bm; ++t) {
        p.tile_seq.push_back(s);
        p.tile_row0.push_back(r + t * bm);
      }
    }
    max_ctx = std::max(max_ctx, context_lens[s]);
  }
  if (!fixed_splits) {
    // CTAs longest first (most keys to read; a pair is one CTA), so that the long ones (the last
    // query rows of a prompt, decodes over long contexts in a mixed step) do not start last and
    // leave the tail of the launch to a few SMs. Graph plans keep their order: it may depend on
    // the batch shape only.
    const int unit = step / bm;
    std::vector<std::pair<int, int>> order;  // (keys, first tile) per CTA
    for (size_t t = 0; t < p.tile_seq.size(); t += unit) {
      const int s = p.tile_seq[t];
      const int q = query_start[s + 1] - query_start[s], rows = q * group;
      const int last_row = std::min(p.tile_row0[t] + step, rows) - 1;
      order.emplace_back(context_lens[s] - q + last_row / group + 1, static_cast<int>(t));
    }
    std::stable_sort(order.begin(), order.end(),
                     [](const auto& x, const auto& y) { return x.first > y.first; });
    std::vector<int32_t> seq, row0;
    for (const auto& [keys, t] : order) {
      for (int i = 0; i < unit; ++i) {
        seq.push_back(p.tile_seq[t + i]);
        row0.push_back(p.tile_row0[t + i]);
      }
    }
    p.tile_seq = std::move(seq);
    p.tile_row0 = std::move(row0);
  }
  // Split the key range when the tiles alone leave the GPU mostly idle: up to two CTAs per
  // multiprocessor (what fits beside the decode kernel's buffers, so one wave), at least 256
  // keys per split. With fixed_splits (graphs) the count depends on the tile count only and
  // the keys per split follow the longest context.
  const int64_t ctas = static_cast<int64_t>(p.tile_seq.size()) / (p.paired ? 2 : 1) * kv_heads;
  int splits = 1;
  if (ctas > 0 && ctas < sms && (fixed_splits || max_ctx > 512)) {
    const int want = static_cast<int>(std::max<int64_t>(1, 2 * sms / ctas));
    splits = std::min(want, kMaxSplits);
    if (!fixed_splits) splits = std::max(1, std::min(splits, (max_ctx + 255) / 256));
  }
  const int min_keys =
      std::max(kKeysPerTile, (min_split_keys + kKeysPerTile - 1) / kKeysPerTile * kKeysPerTile);
  p.split_keys = std::max(
      min_keys, ((max_ctx + splits - 1) / splits + kKeysPerTile - 1) / kKeysPerTile * kKeysPerTile);
  p.splits = fixed_splits ? splits : std::max(1, (max_ctx + p.split_keys - 1) / p.split_keys);
  return p;
}

void paged_attention(const PagedAttentionArgs& args, cudaStream_t stream) {
  if (args.num_tiles == 0) return;
  PagedAttentionArgs a = args;
  a.block_shift = -1;
  for (int b = 0; b < 31; ++b) {
    if (a.block_size == 1 << b) a.block_shift = b;
  }
  require(a.heads > 0 && a.kv_heads > 0 && a.heads % a.kv_heads == 0 && a.block_size > 0,
          "paged_attention: bad shape");
  require(a.splits == 1 || (a.partial_o && a.partial_lse), "paged_attention: splits need partials");
  switch (a.head_dim) {
    case 32:
      launch_d<32>(a, stream);
      break;
    case 48:
      launch_d<48>(a, stream);
      break;
    case 64:
      launch_d<64>(a, stream);
      break;
    case 128:
      launch_d<128>(a, stream);
      break;
    default:
      throw Error(cat("paged attention supports head_dim 32, 48, 64 and 128, not ", a.head_dim));
  }
  if (a.splits > 1) {
    require(a.splits <= kMaxSplits, "paged_attention: more key splits than the combine takes");
    static const bool early_meta = path_enabled("ERNIE_COMBINE_EARLY_META");
    launch_pdl(early_meta ? combine_splits_kernel<true> : combine_splits_kernel<false>,
               a.tokens * a.heads, a.head_dim, 0, stream, a.out, a.partial_o, a.partial_lse,
               a.positions, a.dims, a.tokens, a.heads, a.head_dim, a.splits);
    ERNIE_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace ernie::cuda
