#include <algorithm>
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/hopper.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/skinny_gemm.cuh"

namespace ernie::cuda {
namespace {

constexpr int kSkinnyWarps = 4;  // weight rows per CTA
constexpr size_t kSkinnyMaxSmem = 200 * 1024;

// Shared memory of a CTA: its weight rows and the input.
size_t skinny_smem_bytes(int m, int k) {
  return static_cast<size_t>(kSkinnyWarps + m) * k * sizeof(__nv_bfloat16);
}

__device__ __forceinline__ float2 bf2(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

__device__ __forceinline__ void store(float* p, float v) {
  *p = v;
}
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16(v);
}

// M: rows of x the kernel is built for (m <= M). Shared memory: the CTA's kSkinnyWarps weight
// rows ([rows][k / 8] pieces of 8), brought by one bulk copy issued before the wait (plain loads
// placed there in the source are scheduled after the wait by the compiler; a bulk copy is
// not), then the input [m][k / 8], staged by the whole CTA after the wait.
// kRope (bf16 out only): out is a qkv projection; the epilogue rotates q and k as
// rope_store_kv does (the pair of columns 2i, 2i + 1 is two warps of one CTA: rows start at a
// multiple of kSkinnyWarps) and stores k and v into the cache too.
template <int M, typename OutT, bool kRope = false>
__global__ void __launch_bounds__(kSkinnyWarps * 32)
    skinny_gemm_kernel(OutT* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n,
                       int k, const SkinnyRope rope) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  extern __shared__ __align__(16) uint4 smem[];
  __shared__ __align__(8) uint64_t w_full;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * kSkinnyWarps, row = row0 + warp;
  const int pieces = k / 8;
  if (threadIdx.x == 0) {
    const uint32_t bytes = static_cast<uint32_t>(min(kSkinnyWarps, n - row0)) * k * 2;
    mbar_init(&w_full, 1);
    mbar_init_fence();
    mbar_arrive_expect_tx(&w_full, bytes);
    bulk_load(smem, w + static_cast<size_t>(row0) * k, bytes, &w_full);
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
  uint4* xs = smem + kSkinnyWarps * pieces;
  // The input, kStageBatch pieces per thread loaded before any is stored (one L2 round trip per
  // batch, not per piece).
  constexpr int kStageBatch = 4;
  const int total = m * pieces;
  for (int base = 0; base < total; base += kStageBatch * blockDim.x) {
    uint4 v[kStageBatch];
#pragma unroll
    for (int j = 0; j < kStageBatch; ++j) {
      const int i = base + j * blockDim.x + threadIdx.x;
      if (i < total) {
        const int t = i / pieces, q = i % pieces;
        v[j] = reinterpret_cast<const uint4*>(x + static_cast<size_t>(t) * k)[q];
      }
    }
#pragma unroll
    for (int j = 0; j < kStageBatch; ++j) {
      const int i = base + j * blockDim.x + threadIdx.x;
      if (i >= total) continue;
      xs[i] = v[j];
    }
  }
  __syncthreads();  // the input is staged, and the barrier's initialisation is visible
  mbar_wait(&w_full, 0);
  float acc[M] = {};
  if (row < n) {
    const uint4* wrow = smem + warp * pieces;
    for (int q = lane; q < pieces; q += 32) {
      const uint4 wv = wrow[q];
      const float2 w0 = bf2(wv.x), w1 = bf2(wv.y), w2 = bf2(wv.z), w3 = bf2(wv.w);
#pragma unroll
      for (int t = 0; t < M; ++t) {
        if (t < m) {
          const uint4 xv = xs[t * pieces + q];
          const float2 x0 = bf2(xv.x), x1 = bf2(xv.y), x2 = bf2(xv.z), x3 = bf2(xv.w);
          float s = acc[t];
          s = fmaf(w0.x, x0.x, s);
          s = fmaf(w0.y, x0.y, s);
          s = fmaf(w1.x, x1.x, s);
          s = fmaf(w1.y, x1.y, s);
          s = fmaf(w2.x, x2.x, s);
          s = fmaf(w2.y, x2.y, s);
          s = fmaf(w3.x, x3.x, s);
          s = fmaf(w3.y, x3.y, s);
          acc[t] = s;
        }
      }
    }
  }
  if constexpr (!kRope) {
    if (row >= n) return;
#pragma unroll
    for (int t = 0; t < M; ++t) {
      float v = acc[t];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == t && t < m) store(out + static_cast<size_t>(t) * n + row, v);
    }
  } else {
    // Each output as the bf16 the unfused path would have stored, then rotated like
    // rope_store_kv (the same f32 arithmetic).
    __shared__ float vals[kSkinnyWarps][M];
#pragma unroll
    for (int t = 0; t < M; ++t) {
      float v = acc[t];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == t) vals[warp][t] = __bfloat162float(__float2bfloat16(v));
    }
    __syncthreads();
    if (row >= n || lane >= m) return;
    const int t = lane, half = rope.head_dim / 2;
    const int q_cols = rope.heads * rope.head_dim, kv = rope.kv_heads * rope.head_dim;
    float v = vals[warp][t];
    if (row < q_cols + kv) {
      const float a = vals[warp & ~1][t], b = vals[warp | 1][t];
      float sn, cs;
      sincosf(static_cast<float>(rope.positions[t]) * rope.inv_freq[(row / 2) % half], &sn, &cs);
      v = row % 2 == 0 ? a * cs - b * sn : b * cs + a * sn;
    }
    const __nv_bfloat16 r = __float2bfloat16(v);
    out[static_cast<size_t>(t) * n + row] = r;
    const int64_t slot = rope.slots[t];
    if (row >= q_cols + kv) {
      rope.v_cache[slot * kv + (row - q_cols - kv)] = r;
    } else if (row >= q_cols) {
      rope.k_cache[slot * kv + (row - q_cols)] = r;
    }
  }
}

template <int M, typename OutT, bool kRope>
void launch(OutT* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n, int k,
            const SkinnyRope& rope, cudaStream_t stream) {
  const size_t smem = skinny_smem_bytes(m, k);
  static bool configured = false;
  if (!configured) {
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(skinny_gemm_kernel<M, OutT, kRope>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kSkinnyMaxSmem)));
    configured = true;
  }
  const int grid = (n + kSkinnyWarps - 1) / kSkinnyWarps;
  launch_pdl(skinny_gemm_kernel<M, OutT, kRope>, grid, kSkinnyWarps * 32, smem, stream, out, x, w,
             m, n, k, rope);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

template <typename OutT, bool kRope = false>
void dispatch(OutT* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n, int k,
              const SkinnyRope& rope, cudaStream_t stream) {
  static_assert(kSkinnyMaxRows == 4);
  if (m == 1) {
    launch<1, OutT, kRope>(out, x, w, m, n, k, rope, stream);
  } else if (m == 2) {
    launch<2, OutT, kRope>(out, x, w, m, n, k, rope, stream);
  } else {
    launch<4, OutT, kRope>(out, x, w, m, n, k, rope, stream);
  }
}

constexpr int kMmaRows = 16;  // input rows of an m16n8k16 tile

// ---- 5-32 rows on the tensor cores, whole weight rows per CTA (skinny_tc) ----
// A CTA owns R weight rows over the whole reduction, so no partial sums leave it and no cluster
// is needed: its rows come into shared memory by bulk copies issued before the wait (a grid of
// one wave is resident beside the kernel before it and streams the weights while that kernel
// runs), and only the input (16 MT x k, from L2: MT m16 tiles) and the math remain after it.
// kTcWarps warps split the reduction; each takes its input fragments straight from global
// memory, in batches of 16-byte loads (one L2 round trip per batch, not per k step: one batch
// at k = 2560 and one m16 tile), and the warps' 16 MT x R partial sums are added in warp order
// through shared memory (deterministic). Within each 32-wide chunk of the reduction, thread
// (g, c) of a warp holds columns 8c .. 8c + 7 of input rows g and g + 8 and of weight row g: the
// first four are the k-values an m16n8k16 step gives that thread, the last four the next step's
// (the same permutation of k on both operands, so the sum is the product's). Weight rows are 64
// bytes longer than their data in shared memory, so the eight lanes of a quarter-warp read
// 16-byte pieces from eight different bank groups.
constexpr int kTcWarps = 8, kTcThreads = 32 * kTcWarps, kTcMaxTiles = 2;
// 32-wide chunks of the reduction whose input a warp loads at once (80 registers of input).
constexpr int tc_batch(int tiles) {
  return 10 / tiles;
}

__host__ __device__ inline int skinny_tc_ld(int k) {
  return k * 2 + 64;
}
size_t skinny_tc_smem_bytes(int rows_per_cta, int k) {
  // The partial sums [warps][16 MT][R] floats reuse the weights' space once the math is done.
  return std::max(
      static_cast<size_t>(rows_per_cta) * skinny_tc_ld(k),
      static_cast<size_t>(kTcWarps) * kMmaRows * kTcMaxTiles * rows_per_cta * sizeof(float));
}

template <int R, int MT, bool kRope>
__global__ void __launch_bounds__(kTcThreads)
    skinny_tc_kernel(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                     int n, int k, const SkinnyRope rope) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  constexpr int NT = R / 8, BM = kMmaRows * MT, kBatch = tc_batch(MT);
  extern __shared__ __align__(16) unsigned char tc_smem[];
  __shared__ __align__(8) uint64_t w_full;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int n0 = blockIdx.x * R, ld = skinny_tc_ld(k);
  const uint32_t row_bytes = static_cast<uint32_t>(k) * 2;
  if (tid == 0) {
    mbar_init(&w_full, 1);
    mbar_init_fence();
    mbar_arrive_expect_tx(&w_full, R * row_bytes);
    for (int r = 0; r < R; ++r) {
      bulk_load(tc_smem + r * ld, w + static_cast<size_t>(n0 + r) * k, row_bytes, &w_full);
    }
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // Rows past m read row m - 1: their sums are never stored, and rows do not mix.
  const int kw = k / kTcWarps, chunks = kw / 32, kbase = warp * kw + 8 * c;
  const uint4* x_lo[MT];
  const uint4* x_hi[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int r = kMmaRows * mt + g;
    x_lo[mt] = reinterpret_cast<const uint4*>(x + static_cast<size_t>(min(r, m - 1)) * k + kbase);
    x_hi[mt] =
        reinterpret_cast<const uint4*>(x + static_cast<size_t>(min(r + 8, m - 1)) * k + kbase);
  }
  float acc[MT][NT][4] = {};
  __syncthreads();  // the barrier's initialisation is visible
  for (int base = 0; base < chunks; base += kBatch) {
    // Every load of the batch first, unconditionally (indices clamped), then the math.
    uint4 lo[MT][kBatch], hi[MT][kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int ch = min(base + j, chunks - 1);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        lo[mt][j] = x_lo[mt][ch * 4];  // 32 columns = 4 uint4
        hi[mt][j] = x_hi[mt][ch * 4];
      }
    }
    if (base == 0) mbar_wait(&w_full, 0);
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (base + j >= chunks) break;
      const int col = (warp * kw + 32 * (base + j) + 8 * c) * 2;  // byte offset in a row
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 b = *reinterpret_cast<const uint4*>(tc_smem + (nt * 8 + g) * ld + col);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t a0[4] = {lo[mt][j].x, hi[mt][j].x, lo[mt][j].y, hi[mt][j].y};
          const uint32_t a1[4] = {lo[mt][j].z, hi[mt][j].z, lo[mt][j].w, hi[mt][j].w};
          mma_16816(acc[mt][nt], a0, b.x, b.y);
          mma_16816(acc[mt][nt], a1, b.z, b.w);
        }
      }
    }
  }
  __syncthreads();  // every warp is done with the weights: their space takes the partial sums
  float* part = reinterpret_cast<float*>(tc_smem);  // [warp][BM rows][R]
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int col = nt * 8 + 2 * c, r = kMmaRows * mt + g;
      *reinterpret_cast<float2*>(part + (warp * BM + r) * R + col) =
          make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<float2*>(part + (warp * BM + r + 8) * R + col) =
          make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
  __syncthreads();
  // A pair of adjacent columns (2i, 2i + 1) of one row per thread and trip.
  for (int i = tid; i < BM * R / 2; i += kTcThreads) {
    const int t = i / (R / 2), col = 2 * (i % (R / 2));
    if (t >= m) continue;
    float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
    for (int wi = 0; wi < kTcWarps; ++wi) {
      const float2 v = *reinterpret_cast<const float2*>(part + (wi * BM + t) * R + col);
      s0 += v.x;
      s1 += v.y;
    }
    const int row = n0 + col;  // output column (the weight row)
    if constexpr (!kRope) {
      *reinterpret_cast<__nv_bfloat162*>(out + static_cast<size_t>(t) * n + row) =
          __floats2bfloat162_rn(s0, s1);
    } else {
      // As the bf16 the unfused path stores, then rotated like rope_store_kv (the same f32
      // arithmetic as skinny_gemm_kernel's epilogue).
      const float a = __bfloat162float(__float2bfloat16(s0));
      const float b = __bfloat162float(__float2bfloat16(s1));
      const int half = rope.head_dim / 2;
      const int q_cols = rope.heads * rope.head_dim, kv = rope.kv_heads * rope.head_dim;
      float v0 = a, v1 = b;
      if (row < q_cols + kv) {
        float sn, cs;
        sincosf(static_cast<float>(rope.positions[t]) * rope.inv_freq[(row / 2) % half], &sn, &cs);
        v0 = a * cs - b * sn;
        v1 = b * cs + a * sn;
      }
      const __nv_bfloat162 r = __floats2bfloat162_rn(v0, v1);
      *reinterpret_cast<__nv_bfloat162*>(out + static_cast<size_t>(t) * n + row) = r;
      const int64_t slot = rope.slots[t];
      if (row >= q_cols + kv) {
        *reinterpret_cast<__nv_bfloat162*>(rope.v_cache + slot * kv + (row - q_cols - kv)) = r;
      } else if (row >= q_cols) {
        *reinterpret_cast<__nv_bfloat162*>(rope.k_cache + slot * kv + (row - q_cols)) = r;
      }
    }
  }
}

template <int R, int MT, bool kRope>
void launch_tc(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n,
               int k, const SkinnyRope& rope, cudaStream_t stream) {
  static const bool configured = [] {
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(skinny_tc_kernel<R, MT, kRope>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kSkinnyMaxSmem)));
    return true;
  }();
  (void)configured;
  launch_pdl(skinny_tc_kernel<R, MT, kRope>, static_cast<unsigned>(n / R), kTcThreads,
             skinny_tc_smem_bytes(R, k), stream, out, x, w, m, n, k, rope);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

template <bool kRope>
void dispatch_tc(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n,
                 int k, int rows_per_cta, const SkinnyRope& rope, cudaStream_t stream) {
  static_assert(kTcMaxTiles == 2);
  if (rows_per_cta == 16) {
    if (m <= kMmaRows) {
      launch_tc<16, 1, kRope>(out, x, w, m, n, k, rope, stream);
    } else {
      launch_tc<16, 2, kRope>(out, x, w, m, n, k, rope, stream);
    }
  } else if (m <= kMmaRows) {
    launch_tc<32, 1, kRope>(out, x, w, m, n, k, rope, stream);
  } else {
    launch_tc<32, 2, kRope>(out, x, w, m, n, k, rope, stream);
  }
}

}  // namespace

bool skinny_gemm_fits(int m, int k) {
  return m >= 1 && m <= kSkinnyMaxRows && k > 0 && k % 8 == 0 &&
         skinny_smem_bytes(m, k) <= kSkinnyMaxSmem;
}

void skinny_gemm(void* out, bool out_f32, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                 int n, int k, cudaStream_t stream) {
  if (n == 0) return;
  require_parts(skinny_gemm_fits(m, k) && n > 0, "skinny_gemm: ", m, " x ", k, " input (at most ",
                kSkinnyMaxRows, " rows, k a positive multiple of 8)");
  if (out_f32) {
    auto* o = static_cast<float*>(out);
    dispatch(o, x, w, m, n, k, SkinnyRope{}, stream);
  } else {
    auto* o = static_cast<__nv_bfloat16*>(out);
    dispatch(o, x, w, m, n, k, SkinnyRope{}, stream);
  }
}

bool skinny_rope_fits(int m, int k, const SkinnyRope& rope) {
  return skinny_gemm_fits(m, k) && rope.heads > 0 && rope.kv_heads > 0 && rope.head_dim > 0 &&
         rope.head_dim % 2 == 0 && rope.inv_freq != nullptr;
}

void skinny_gemm_rope(__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                      int k, const SkinnyRope& rope, cudaStream_t stream) {
  require_parts(skinny_rope_fits(m, k, rope), "skinny_gemm_rope: ", m, " x ", k,
                " input, head_dim ", rope.head_dim);
  const int n = (rope.heads + 2 * rope.kv_heads) * rope.head_dim;
  dispatch<__nv_bfloat16, true>(qkv, x, w, m, n, k, rope, stream);
}

bool skinny_tc_fits(int m, int n, int k, int rows_per_cta) {
  return m >= 1 && m <= kSkinnyTcMaxRows && (rows_per_cta == 16 || rows_per_cta == 32) && n > 0 &&
         n % rows_per_cta == 0 && k > 0 && k % (32 * kTcWarps) == 0 &&
         skinny_tc_smem_bytes(rows_per_cta, k) <= kSkinnyMaxSmem;
}

int skinny_tc_ctas_per_wave(int k, int rows_per_cta) {
  require(k > 0 && k % (32 * kTcWarps) == 0 && (rows_per_cta == 16 || rows_per_cta == 32),
          "skinny_tc_ctas_per_wave: bad shape");
  const size_t smem = skinny_tc_smem_bytes(rows_per_cta, k);
  if (smem > kSkinnyMaxSmem) return 0;
  auto* kernel =
      rows_per_cta == 16 ? skinny_tc_kernel<16, 2, false> : skinny_tc_kernel<32, 2, false>;
  ERNIE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kSkinnyMaxSmem)));
  int per_sm = 0, sms = 0, device = 0;
  ERNIE_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kTcThreads, smem));
  ERNIE_CUDA_CHECK(cudaGetDevice(&device));
  ERNIE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return per_sm * sms;
}

void skinny_tc(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n,
               int k, int rows_per_cta, cudaStream_t stream) {
  require_parts(skinny_tc_fits(m, n, k, rows_per_cta), "skinny_tc: ", m, " x ", k, " input, ", n,
                " outputs, ", rows_per_cta, " per CTA (at most ", kSkinnyTcMaxRows, " rows, n % ",
                rows_per_cta, " == 0, k % ", 32 * kTcWarps, " == 0)");
  dispatch_tc<false>(out, x, w, m, n, k, rows_per_cta, SkinnyRope{}, stream);
}

bool skinny_tc_rope_fits(int m, int k, int rows_per_cta, const SkinnyRope& rope) {
  const int n = (rope.heads + 2 * rope.kv_heads) * rope.head_dim;
  return rope.heads > 0 && rope.kv_heads > 0 && rope.head_dim > 0 && rope.head_dim % 2 == 0 &&
         rope.inv_freq != nullptr && skinny_tc_fits(m, n, k, rows_per_cta);
}

void skinny_tc_rope(__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                    int k, int rows_per_cta, const SkinnyRope& rope, cudaStream_t stream) {
  require_parts(skinny_tc_rope_fits(m, k, rows_per_cta, rope), "skinny_tc_rope: ", m, " x ", k,
                " input, head_dim ", rope.head_dim, ", ", rows_per_cta, " per CTA");
  const int n = (rope.heads + 2 * rope.kv_heads) * rope.head_dim;
  dispatch_tc<true>(qkv, x, w, m, n, k, rows_per_cta, rope, stream);
}

}  // namespace ernie::cuda
