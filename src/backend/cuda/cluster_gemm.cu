#include <cuda.h>

#include <algorithm>

#include "backend/cuda/cluster_gemm.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/hopper.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/switches.h"
#include "common/check.h"

namespace ernie::cuda {
namespace {

constexpr int kCgThreads = 384;  // a producer warpgroup and two consumer warpgroups
constexpr int kCgRows = 128;     // weight rows a CTA: 64 per consumer warpgroup
constexpr int kCgBK = 64;        // reduction per stage: one 128-byte swizzled row of bf16
constexpr int kCgHalfBytes = 64 * kCgBK * 2;  // one consumer's weight box (8 KB)
constexpr int kCgLd = kCgRows + 4;            // floats per token of the staged partial sums
constexpr int kCgMaxSplits = 8;               // the portable cluster size

enum Epilogue { kStore = 0, kSwiGlu = 1, kRope = 2 };

template <int TN>
struct CgShape {
  static constexpr int kXBytes = TN * kCgBK * 2;
  static constexpr int kStageBytes = 2 * kCgHalfBytes + kXBytes;
  static constexpr int kStages = std::min(8, (200 * 1024) / kStageBytes);
  static constexpr size_t kSmem = static_cast<size_t>(kStages) * kStageBytes + 1024 + 256;
  static_assert(static_cast<size_t>(TN) * kCgLd * sizeof(float) <=
                    static_cast<size_t>(kStages) * kStageBytes,
                "the staged partial sums reuse the ring");
};

template <int TN>
__device__ __forceinline__ void cg_mma(float (&acc)[TN / 2], uint64_t a, uint64_t b) {
  if constexpr (TN == 256) {
    wgmma_m64n256k16(acc, a, b);
  } else if constexpr (TN == 128) {
    wgmma_m64n128k16(acc, a, b, 1);
  } else {
    static_assert(TN == 64, "token tiles of 64, 128 or 256");
    wgmma_m64n64k16(acc, a, b, 1);
  }
}

// Eight floats at `p` in cluster CTA `cta`'s shared memory (the same offset as in this CTA).
__device__ __forceinline__ void ld_cluster_f8(float (&v)[8], const float* p, uint32_t cta) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
               : "=r"(remote)
               : "r"(smem_u32(p)), "r"(cta));
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3])
               : "r"(remote)
               : "memory");
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v[4]), "=f"(v[5]), "=f"(v[6]), "=f"(v[7])
               : "r"(remote + 16)
               : "memory");
}

// The sum over the splits (cluster ranks cta0..) of the eight staged partial sums at `p`, in
// rank order (every split's loads issued before the first add).
__device__ __forceinline__ void sum_splits(float (&s)[8], const float* p, int splits, int cta0) {
  if (splits == 1) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) s[j] = v[j];
    return;
  }
  float v[kCgMaxSplits][8];
#pragma unroll
  for (int r = 0; r < kCgMaxSplits; ++r) {
    if (r < splits) ld_cluster_f8(v[r], p, cta0 + r);
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j] = v[0][j];
#pragma unroll
  for (int r = 1; r < kCgMaxSplits; ++r) {
    if (r < splits) {
#pragma unroll
      for (int j = 0; j < 8; ++j) s[j] += v[r][j];
    }
  }
}

// Diagnostics (cluster_gemm's `stamps`, ernie_stream_probe): the global timer into this CTA's
// milestone `slot` (kCgStamps a CTA, CTAs in launch order x, y, z).
__device__ __forceinline__ void stamp(uint64_t* stamps, int slot) {
  if (stamps == nullptr) return;
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  stamps[cta * kCgStamps + slot] = t;
}

__device__ __forceinline__ float bf16_round(float v) {
  return __bfloat162float(__float2bfloat16(v));
}

__device__ __forceinline__ uint4 pack_bf16x8(const float (&v)[8]) {
  return make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]),
                    pack_bf16(v[6], v[7]));
}

// Grid (splits, n / 128, token tiles), clusters of `splits` along x: CTA (r, tile, z) sums the
// reduction's 64-wide slices r * S / splits .. (r + 1) * S / splits - 1 (S = k / 64) for weight
// rows tile * 128.. (SwiGLU: gate rows tile * 64.. and the up rows n / 2 further) and tokens
// z * TN... The producer thread brings each slice's two 64-row weight boxes and the tokens' box
// by TMA (the first stages' weights before the wait for the previous kernel: they do not depend
// on it); each consumer warpgroup multiplies its 64 weight rows by all TN tokens.
// share > 1: clusters of splits x share CTAs, the `share` tiles of a cluster (consecutive along
// y) taking the tokens' box of a slice in `share` pieces, each piece brought once by TMA
// multicast into all of them (the cluster's CTA of split r and tile p has rank r + p splits).
// stamps (diagnostics, null in the engine): the milestones of ClusterGemmStamp, a CTA's row.
template <int TN, int kEpi>
__global__ void __launch_bounds__(kCgThreads, 1)
    cluster_gemm_kernel(const __grid_constant__ CUtensorMap w_map,
                        const __grid_constant__ CUtensorMap x_map, __nv_bfloat16* out, int m, int n,
                        int k, int splits, int share, const SkinnyRope rope, uint64_t* stamps) {
  using Shape = CgShape<TN>;
  constexpr int kStages = Shape::kStages, kStageBytes = Shape::kStageBytes;
  extern __shared__ unsigned char cg_smem_raw[];
  unsigned char* smem = align_1024(cg_smem_raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int tid = threadIdx.x, wg = tid / 128;
  const int rank = blockIdx.x, tile = blockIdx.y, t0 = blockIdx.z * TN;
  const int piece = tile % share, piece_rows = TN / share;  // this CTA's piece of the tokens
  const int cta0 = piece * splits;                          // cluster rank of split 0 of this tile
  uint16_t mask = 0;  // the CTAs of this split that take the pieces
  for (int q = 0; q < share; ++q) mask |= static_cast<uint16_t>(1u << (rank + q * splits));
  const int slices = k / kCgBK;
  const int kb0 = rank * slices / splits, count = (rank + 1) * slices / splits - kb0;
  const int row0 = kEpi == kSwiGlu ? tile * 64 : tile * kCgRows;
  const int row1 = kEpi == kSwiGlu ? n / 2 + tile * 64 : row0 + 64;
  if (tid == 0) {
    stamp(stamps, kStampEntry);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8 * share);  // one arrival per consumer warp of the sharing CTAs
    }
    mbar_init_fence();
    for (int i = 0; i < min(count, kStages); ++i) {
      unsigned char* st = smem + i * kStageBytes;
      mbar_arrive_expect_tx(&full[i], kStageBytes);
      tma_load_2d(st, &w_map, &full[i], (kb0 + i) * kCgBK, row0);
      tma_load_2d(st + kCgHalfBytes, &w_map, &full[i], (kb0 + i) * kCgBK, row1);
    }
  }
  // The cluster's barriers are initialised before any piece is multicast into them.
  if (splits * share > 1) {
    cluster_sync();
  } else {
    __syncthreads();
  }
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (tid == 128) stamp(stamps, kStampSynced);
  float* part = reinterpret_cast<float*>(smem);  // [TN tokens][kCgLd], after the main loop
  if (wg == 0) {
    if (tid == 0) {
      for (int i = 0; i < count; ++i) {
        const int s = i % kStages;
        unsigned char* st = smem + s * kStageBytes;
        if (i >= kStages) {
          mbar_wait(&empty[s], ((i / kStages) - 1) & 1);
          mbar_arrive_expect_tx(&full[s], kStageBytes);
          tma_load_2d(st, &w_map, &full[s], (kb0 + i) * kCgBK, row0);
          tma_load_2d(st + kCgHalfBytes, &w_map, &full[s], (kb0 + i) * kCgBK, row1);
        }
        unsigned char* xs = st + 2 * kCgHalfBytes;
        if (share == 1) {
          tma_load_2d(xs, &x_map, &full[s], (kb0 + i) * kCgBK, t0);
        } else {
          tma_load_2d_multicast(xs + piece * piece_rows * 128, &x_map, &full[s], (kb0 + i) * kCgBK,
                                t0 + piece * piece_rows, mask);
        }
      }
      stamp(stamps, kStampIssued);
    }
  } else {
    const int cw = wg - 1, warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
    float acc[TN / 2];
#pragma unroll
    for (int i = 0; i < TN / 2; ++i) acc[i] = 0.0f;
    if (stamps != nullptr && tid == 128) {
      mbar_wait(&full[0], 0);
      stamp(stamps, kStampFirstSlice);
    }
    for (int i = 0; i < count; ++i) {
      const int s = i % kStages;
      mbar_wait(&full[s], (i / kStages) & 1);
      const unsigned char* st = smem + s * kStageBytes;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kCgBK / 16; ++ks) {
        cg_mma<TN>(acc, wgmma_desc_sw128(st + cw * kCgHalfBytes + ks * 32),
                   wgmma_desc_sw128(st + 2 * kCgHalfBytes + ks * 32));
      }
      wgmma_commit();
      wgmma_wait<1>();  // the previous slice's group is complete
      if (i > 0 && lane == 0) {
        // Slot free here and, with shared pieces, in every CTA that multicasts into it.
        for (int q = 0; q < share; ++q) {
          if (q == piece) {
            mbar_arrive(&empty[(i - 1) % kStages]);
          } else {
            mbar_arrive_cluster(&empty[(i - 1) % kStages], rank + q * splits);
          }
        }
      }
    }
    wgmma_wait<0>();
    fence_regs(acc);
    if (tid == 128) stamp(stamps, kStampLoopDone);
    named_barrier_sync(1, 256);  // both consumers are done with the ring: it takes the sums
    // Accumulator element 4j + h: weight row 16 warp + g (+8 for h >= 2), token 8j + 2c (+1
    // for odd h); staged as part[token][row] (rows of one token contiguous; the lanes of a
    // store hit 32 distinct banks).
    const int r = cw * 64 + warp * 16 + g;
#pragma unroll
    for (int j = 0; j < TN / 8; ++j) {
      const int t = 8 * j + 2 * c;
      part[t * kCgLd + r] = acc[4 * j];
      part[(t + 1) * kCgLd + r] = acc[4 * j + 1];
      part[t * kCgLd + r + 8] = acc[4 * j + 2];
      part[(t + 1) * kCgLd + r + 8] = acc[4 * j + 3];
    }
  }
  if (splits * share > 1) {
    cluster_sync();  // every CTA's sums are staged
  } else {
    __syncthreads();
  }
  if (tid == 128) stamp(stamps, kStampStaged);
  // Eight adjacent outputs of one token per item; this CTA adds its share of the tile's items.
  constexpr int kChunks = kEpi == kSwiGlu ? 8 : 16;  // items per token
  const int tokens = min(TN, m - t0), items = tokens * kChunks;
  const int i1 = (rank + 1) * items / splits;
  for (int i = rank * items / splits + tid; i < i1; i += kCgThreads) {
    const int t = i / kChunks, q = i % kChunks;
    const size_t token = static_cast<size_t>(t0 + t);
    float v[8];
    sum_splits(v, part + t * kCgLd + 8 * q, splits, cta0);
    if constexpr (kEpi == kSwiGlu) {
      float u[8];
      sum_splits(u, part + t * kCgLd + 64 + 8 * q, splits, cta0);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        // As silu_mul on the bf16 gate and up that cluster_gemm would store.
        const float gv = bf16_round(v[j]), uv = bf16_round(u[j]);
        v[j] = gv / (1.0f + __expf(-gv)) * uv;
      }
      *reinterpret_cast<uint4*>(out + token * (n / 2) + tile * 64 + 8 * q) = pack_bf16x8(v);
    } else if constexpr (kEpi == kRope) {
      // As the bf16 the unfused path stores, then rotated like rope_store_kv (the arithmetic of
      // skinny_tc's rope epilogue).
      const int f = tile * kCgRows + 8 * q;  // qkv column of v[0]
      const int half = rope.head_dim / 2;
      const int q_cols = rope.heads * rope.head_dim, kv = rope.kv_heads * rope.head_dim;
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = bf16_round(v[j]);
      if (f < q_cols + kv) {
        const float pos = static_cast<float>(rope.positions[token]);
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
          float sn, cs;
          sincosf(pos * rope.inv_freq[((f + j) / 2) % half], &sn, &cs);
          const float a = v[j], b = v[j + 1];
          v[j] = a * cs - b * sn;
          v[j + 1] = b * cs + a * sn;
        }
      }
      const uint4 r = pack_bf16x8(v);
      *reinterpret_cast<uint4*>(out + token * n + f) = r;
      const int64_t slot = rope.slots[token];
      if (f >= q_cols + kv) {
        *reinterpret_cast<uint4*>(rope.v_cache + slot * kv + (f - q_cols - kv)) = r;
      } else if (f >= q_cols) {
        *reinterpret_cast<uint4*>(rope.k_cache + slot * kv + (f - q_cols)) = r;
      }
    } else {
      *reinterpret_cast<uint4*>(out + token * n + tile * kCgRows + 8 * q) = pack_bf16x8(v);
    }
  }
  if (tid == 128) stamp(stamps, kStampStored);
  // No CTA leaves while the others may still read its staged sums or arrive on its barriers.
  if (splits * share > 1) cluster_sync();
  if (tid == 128) stamp(stamps, kStampExit);
}

int sm_count() {
  static const int count = [] {
    int device = 0, n = 0;
    ERNIE_CUDA_CHECK(cudaGetDevice(&device));
    ERNIE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }();
  return count;
}

template <int TN, int kEpi>
auto configured_kernel() {
  static const auto kernel = [] {
    auto* f = cluster_gemm_kernel<TN, kEpi>;
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(CgShape<TN>::kSmem)));
    return f;
  }();
  return kernel;
}

int tile_index(int token_tile) {
  return token_tile == 64 ? 0 : token_tile == 128 ? 1 : 2;
}

// Clusters of `splits` CTAs resident at once (one CTA an SM: their shared memory).
template <int TN>
int resident_clusters(int splits) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(splits);
  cfg.blockDim = dim3(kCgThreads);
  cfg.dynamicSmemBytes = CgShape<TN>::kSmem;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim = {static_cast<unsigned>(splits), 1, 1};
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  ERNIE_CUDA_CHECK(
      cudaOccupancyMaxActiveClusters(&clusters, configured_kernel<TN, kStore>(), &cfg));
  return clusters;
}

int max_resident_clusters(int token_tile, int splits) {
  static int known[3][kCgMaxSplits + 1] = {};  // 0: not asked yet, -1: none fits
  int& v = known[tile_index(token_tile)][splits];
  if (v == 0) {
    const int fits = token_tile == 64    ? resident_clusters<64>(splits)
                     : token_tile == 128 ? resident_clusters<128>(splits)
                                         : resident_clusters<256>(splits);
    v = fits > 0 ? fits : -1;
  }
  return v;
}

int token_tiles(int m, int token_tile) {
  return (m + token_tile - 1) / token_tile;
}

template <int TN, int kEpi>
void launch(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n, int k,
            int splits, int share, const SkinnyRope& rope, uint64_t* stamps, cudaStream_t stream) {
  auto* kernel = configured_kernel<TN, kEpi>();
  const CUtensorMap w_map = tensor_map_bf16_sw128(w, n, k, 64);
  const CUtensorMap x_map = tensor_map_bf16_sw128(x, m, k, TN / share);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(splits, n / kCgRows, token_tiles(m, TN));
  cfg.blockDim = dim3(kCgThreads);
  cfg.dynamicSmemBytes = CgShape<TN>::kSmem;
  cfg.stream = stream;
  // A plain launch unless ERNIE_CLUSTER_GEMM_PDL=1 (early, programmatic dependent launch: the
  // first stages' weights then load while the previous kernel ends). H100, steps 64-512 x
  // 1000: early -0.6 to +0.1% against plain (docs/performance.md, thirty-sixth round).
  static const bool early = new_path_enabled("ERNIE_CLUSTER_GEMM_PDL");
  cudaLaunchAttribute attrs[2]{};
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim = {static_cast<unsigned>(splits), static_cast<unsigned>(share), 1};
  attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attrs;
  cfg.numAttrs = early ? 2 : 1;
  ERNIE_CUDA_CHECK(
      cudaLaunchKernelEx(&cfg, kernel, w_map, x_map, out, m, n, k, splits, share, rope, stamps));
}

template <int kEpi>
void dispatch(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n,
              int k, const ClusterGemmPlan& plan, const SkinnyRope& rope, uint64_t* stamps,
              cudaStream_t stream) {
  require_parts(cluster_gemm_plan_valid(plan, m, n, k), "cluster_gemm: no plan for ", m, " x ", k,
                " -> ", n, " (splits ", plan.splits, ", token tile ", plan.token_tile, ")");
  require(reinterpret_cast<uintptr_t>(out) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(w) % 16 == 0,
          "cluster_gemm: operands must be 16-byte aligned");
  switch (plan.token_tile) {
    case 64:
      launch<64, kEpi>(out, x, w, m, n, k, plan.splits, plan.share, rope, stamps, stream);
      break;
    case 128:
      launch<128, kEpi>(out, x, w, m, n, k, plan.splits, plan.share, rope, stamps, stream);
      break;
    default:
      launch<256, kEpi>(out, x, w, m, n, k, plan.splits, plan.share, rope, stamps, stream);
  }
}

}  // namespace

bool cluster_gemm_plan_valid(const ClusterGemmPlan& plan, int m, int n, int k) {
  const bool tile_ok = plan.token_tile == 64 || plan.token_tile == 128 || plan.token_tile == 256;
  const bool share_ok = (plan.share == 1 || plan.share == 2 || plan.share == 4) && tile_ok &&
                        plan.splits * plan.share <= kCgMaxSplits &&
                        n % (kCgRows * plan.share) == 0 && plan.token_tile / plan.share >= 8;
  return tile_ok && share_ok && plan.splits >= 1 && plan.splits <= kCgMaxSplits && m >= 1 &&
         token_tiles(m, plan.token_tile) <= 65535 && n >= kCgRows && n % kCgRows == 0 &&
         n / kCgRows <= 65535 && k >= kCgBK && k % kCgBK == 0 && k / kCgBK >= plan.splits;
}

int cluster_gemm_ctas(const ClusterGemmPlan& plan, int m, int n) {
  return plan.splits * (n / kCgRows) * token_tiles(m, plan.token_tile);  // launch's grid
}

ClusterGemmPlan cluster_gemm_plan(int m, int n, int k) {
  if (m < 1 || n < kCgRows || n % kCgRows != 0 || k < kCgBK || k % kCgBK != 0) return {};
  const int tn = m <= 64 ? 64 : m <= 128 ? 128 : 256;
  const int64_t tiles = static_cast<int64_t>(n / kCgRows) * token_tiles(m, tn);
  // ERNIE_CLUSTER_GEMM_SPLITS=S (A/B runs): S splits first where they fit (up to 8).
  static const int first = std::clamp(switch_bits("ERNIE_CLUSTER_GEMM_SPLITS", 4), 1, kCgMaxSplits);
  // ERNIE_CLUSTER_GEMM_SHARE=2|4 (A/B runs): the tokens' boxes shared by that many tiles.
  static const int share_first = switch_bits("ERNIE_CLUSTER_GEMM_SHARE", 1);
  for (const int splits : {first, 4, 2, 1}) {
    if (splits > first || k / kCgBK < 2 * splits || tiles * splits > sm_count()) continue;
    const bool shared = (share_first == 2 || share_first == 4) &&
                        (n / kCgRows) % share_first == 0 && splits * share_first <= kCgMaxSplits;
    const int share = shared ? share_first : 1;
    if (tiles / share > max_resident_clusters(tn, splits * share)) continue;
    return {splits, tn, share};
  }
  return {};
}

void cluster_gemm(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n,
                  int k, const ClusterGemmPlan& plan, cudaStream_t stream, uint64_t* stamps) {
  dispatch<kStore>(out, x, w, m, n, k, plan, SkinnyRope{}, stamps, stream);
}

void cluster_gemm_swiglu(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                         int n, int k, const ClusterGemmPlan& plan, cudaStream_t stream) {
  dispatch<kSwiGlu>(out, x, w, m, n, k, plan, SkinnyRope{}, nullptr, stream);
}

bool cluster_gemm_rope_fits(const SkinnyRope& rope) {
  return rope.head_dim > 0 && rope.head_dim % 8 == 0 && rope.heads > 0 && rope.kv_heads > 0 &&
         rope.k_cache != nullptr && rope.v_cache != nullptr && rope.positions != nullptr &&
         rope.slots != nullptr && rope.inv_freq != nullptr;
}

void cluster_gemm_rope(__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                       int k, const SkinnyRope& rope, const ClusterGemmPlan& plan,
                       cudaStream_t stream) {
  require(cluster_gemm_rope_fits(rope), "cluster_gemm_rope: bad rope configuration");
  const int n = (rope.heads + 2 * rope.kv_heads) * rope.head_dim;
  dispatch<kRope>(qkv, x, w, m, n, k, plan, rope, nullptr, stream);
}

}  // namespace ernie::cuda
