#include "backend/cuda/cuda_check.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/moe.cuh"

namespace ernie::cuda {
namespace {

constexpr int kAlignThreads = 1024;

__global__ void moe_align_kernel(int32_t* sorted_pairs, int32_t* block_expert, int32_t* pair_pos,
                                 const int32_t* ids, int pairs, int experts, int num_blocks) {
  __shared__ int counts[1024];
  __shared__ int offsets[1025];
  for (int e = threadIdx.x; e < experts; e += kAlignThreads) counts[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < pairs; i += kAlignThreads) atomicAdd(&counts[ids[i]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int off = 0;
    for (int e = 0; e < experts; ++e) {
      offsets[e] = off;
      off += (counts[e] + kMoeBlockM - 1) / kMoeBlockM * kMoeBlockM;
    }
    offsets[experts] = off;
  }
  __syncthreads();
  const int used = offsets[experts];
  for (int b = threadIdx.x; b < num_blocks; b += kAlignThreads) {
    const int row = b * kMoeBlockM;
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
  for (int r = threadIdx.x; r < num_blocks * kMoeBlockM; r += kAlignThreads) sorted_pairs[r] = -1;
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += kAlignThreads) counts[e] = 0;
  __syncthreads();
  // The order inside an expert's segment does not matter: every row is computed on its own.
  for (int i = threadIdx.x; i < pairs; i += kAlignThreads) {
    const int e = ids[i];
    const int pos = offsets[e] + atomicAdd(&counts[e], 1);
    sorted_pairs[pos] = i;
    pair_pos[i] = pos;
  }
}

constexpr int kBM = kMoeBlockM, kBN = 128, kBK = 32, kStages = 3, kLd = kBK + 8;
constexpr int kGemmThreads = 128;

// One CTA computes a 64 x 128 tile (4 warps as 2 x 2, 32 x 64 each) of one M-block against its
// expert's weights. kGateUp: the 128 B rows are 64 gate rows and the matching 64 up rows
// (each warp holds 32 gate + 32 up columns), output = SwiGLU, 64 columns. Otherwise: 128
// output columns scaled by the pair's routing weight.
template <bool kGateUp>
__global__ void __launch_bounds__(kGemmThreads)
    moe_gemm_kernel(__nv_bfloat16* out, const __nv_bfloat16* a_src, const __nv_bfloat16* w,
                    const float* route_w, const int32_t* sorted_pairs, const int32_t* block_expert,
                    int k_choices, int K, int N) {
  const int e = block_expert[blockIdx.x];
  if (e < 0) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* sa = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [stages][BM][LD]
  __nv_bfloat16* sb = sa + kStages * kBM * kLd;                    // [stages][BN][LD]
  const int m0 = blockIdx.x * kBM;
  const int n0 = blockIdx.y * (kGateUp ? kBN / 2 : kBN);  // first output column
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int wm = warp / 2, wn = warp % 2;

  // Per-thread source rows for the loads (fixed over K): A 2 chunks, B 4 chunks per stage.
  const __nv_bfloat16* a_row[2];
  bool a_ok[2];
  int a_r[2], a_ch[2];
  for (int i = 0; i < 2; ++i) {
    const int idx = tid + i * kGemmThreads;  // 0..255: 64 rows x 4 chunks
    a_r[i] = idx / 4;
    a_ch[i] = idx % 4;
    const int pair = sorted_pairs[m0 + a_r[i]];
    a_ok[i] = pair >= 0;
    const int64_t src_row = kGateUp ? pair / k_choices : m0 + a_r[i];
    a_row[i] = a_ok[i] ? a_src + src_row * K : a_src;
  }
  const __nv_bfloat16* b_row[4];
  bool b_ok[4];
  int b_r[4], b_ch[4];
  const size_t w_rows = kGateUp ? 2 * static_cast<size_t>(N) : N;
  const __nv_bfloat16* we = w + static_cast<size_t>(e) * w_rows * K;
  for (int i = 0; i < 4; ++i) {
    const int idx = tid + i * kGemmThreads;  // 0..511: 128 rows x 4 chunks
    b_r[i] = idx / 4;
    b_ch[i] = idx % 4;
    int col, wrow;
    if (kGateUp) {
      col = n0 + (b_r[i] % 64);
      wrow = b_r[i] < 64 ? col : N + col;
    } else {
      col = n0 + b_r[i];
      wrow = col;
    }
    b_ok[i] = col < N;
    b_row[i] = b_ok[i] ? we + static_cast<size_t>(wrow) * K : we;
  }
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kBK;
    for (int i = 0; i < 2; ++i) {
      cp_async_16(sa + (stage * kBM + a_r[i]) * kLd + a_ch[i] * 8,
                  a_row[i] + (a_ok[i] ? k0 + a_ch[i] * 8 : 0), a_ok[i]);
    }
    for (int i = 0; i < 4; ++i) {
      cp_async_16(sb + (stage * kBN + b_r[i]) * kLd + b_ch[i] * 8,
                  b_row[i] + (b_ok[i] ? k0 + b_ch[i] * 8 : 0), b_ok[i]);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
      acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;

  const int kTiles = K / kBK;
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < kTiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < kTiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < kTiles) load_stage(next % kStages, next);
    cp_async_commit();
    const __nv_bfloat16* A = sa + (kt % kStages) * kBM * kLd;
    const __nv_bfloat16* B = sb + (kt % kStages) * kBN * kLd;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const __nv_bfloat16* p = A + (wm * 32 + mt * 16 + g) * kLd + ks * 16 + 2 * c;
        af[mt][0] = load_u32(p);
        af[mt][1] = load_u32(p + 8 * kLd);
        af[mt][2] = load_u32(p + 8);
        af[mt][3] = load_u32(p + 8 * kLd + 8);
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int brow =
            kGateUp ? (nt < 4 ? wn * 32 + nt * 8 : 64 + wn * 32 + (nt - 4) * 8) : wn * 64 + nt * 8;
        const __nv_bfloat16* p = B + (brow + g) * kLd + ks * 16 + 2 * c;
        const uint32_t b0 = load_u32(p), b1 = load_u32(p + 8);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) mma_16816(acc[mt][nt], af[mt], b0, b1);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * 32 + mt * 16 + g + 8 * half;
      const int pair = sorted_pairs[m0 + r];
      if (pair < 0) continue;
      __nv_bfloat16* orow = out + static_cast<size_t>(m0 + r) * N;
      if (kGateUp) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int col = n0 + wn * 32 + nt * 8 + 2 * c + j;
            if (col >= N) continue;
            const float gv = acc[mt][nt][2 * half + j], uv = acc[mt][nt + 4][2 * half + j];
            orow[col] = __float2bfloat16(gv / (1.0f + __expf(-gv)) * uv);
          }
        }
      } else {
        const float rw = route_w[pair];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int col = n0 + wn * 64 + nt * 8 + 2 * c + j;
            if (col < N) orow[col] = __float2bfloat16(acc[mt][nt][2 * half + j] * rw);
          }
        }
      }
    }
  }
}

template <bool kGateUp>
void launch_gemm(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* w,
                 const float* route_w, const int32_t* sorted_pairs, const int32_t* block_expert,
                 int64_t capacity, int k, int K, int N, cudaStream_t stream) {
  require(K % kBK == 0, cat("MoE GEMM: the reduction size ", K, " must be a multiple of ", kBK));
  const size_t smem = static_cast<size_t>(kStages) * (kBM + kBN) * kLd * sizeof(__nv_bfloat16);
  static bool configured = false;
  if (!configured) {
    ERNIE_CUDA_CHECK(cudaFuncSetAttribute(moe_gemm_kernel<kGateUp>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    configured = true;
  }
  const int cols = kGateUp ? kBN / 2 : kBN;
  const dim3 grid(static_cast<unsigned>(capacity / kBM), (N + cols - 1) / cols);
  moe_gemm_kernel<kGateUp><<<grid, kGemmThreads, smem, stream>>>(out, a, w, route_w, sorted_pairs,
                                                                 block_expert, k, K, N);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

__global__ void moe_combine_kernel(__nv_bfloat16* out, const __nv_bfloat16* y,
                                   const int32_t* pair_pos, const __nv_bfloat16* shared, int k,
                                   int hidden) {
  const size_t t = blockIdx.x;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
      acc += __bfloat162float(y[static_cast<size_t>(pair_pos[t * k + j]) * hidden + i]);
    }
    if (shared) acc += __bfloat162float(shared[t * hidden + i]);
    out[t * hidden + i] = __float2bfloat16(acc);
  }
}

}  // namespace

void moe_align(int32_t* sorted_pairs, int32_t* block_expert, int32_t* pair_pos, const int32_t* ids,
               int pairs, int experts, cudaStream_t stream) {
  if (pairs == 0) return;
  require(experts > 0 && experts <= 1024, "moe_align: at most 1024 experts");
  const int64_t capacity = moe_capacity(pairs, experts);
  moe_align_kernel<<<1, kAlignThreads, 0, stream>>>(sorted_pairs, block_expert, pair_pos, ids,
                                                    pairs, experts,
                                                    static_cast<int>(capacity / kMoeBlockM));
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

void moe_gate_up(__nv_bfloat16* act, const __nv_bfloat16* x, const __nv_bfloat16* w_gate_up,
                 const int32_t* sorted_pairs, const int32_t* block_expert, int64_t capacity, int k,
                 int hidden, int inter, cudaStream_t stream) {
  if (capacity == 0) return;
  launch_gemm<true>(act, x, w_gate_up, nullptr, sorted_pairs, block_expert, capacity, k, hidden,
                    inter, stream);
}

void moe_down(__nv_bfloat16* y, const __nv_bfloat16* act, const __nv_bfloat16* w_down,
              const float* weights, const int32_t* sorted_pairs, const int32_t* block_expert,
              int64_t capacity, int hidden, int inter, cudaStream_t stream) {
  if (capacity == 0) return;
  launch_gemm<false>(y, act, w_down, weights, sorted_pairs, block_expert, capacity, 1, inter,
                     hidden, stream);
}

void moe_combine(__nv_bfloat16* out, const __nv_bfloat16* y, const int32_t* pair_pos,
                 const __nv_bfloat16* shared, int tokens, int k, int hidden, cudaStream_t stream) {
  if (tokens == 0) return;
  moe_combine_kernel<<<tokens, 256, 0, stream>>>(out, y, pair_pos, shared, k, hidden);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
