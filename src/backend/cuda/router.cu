#include <algorithm>
#include <climits>

#include "backend/cuda/align.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/hopper.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/router.cuh"
#include "backend/cuda/switches.h"
#include "backend/cuda/topk.cuh"

namespace ernie::cuda {
namespace {

// Logits tile: 64 tokens (4 warps x 16) x 32 experts (4 n-tiles of 8), 32 of the reduction per
// stage. Weight rows are padded to 40 floats so a half-warp's float2 reads hit distinct banks.
constexpr int kBM = 64, kBN = 32, kBK = 32, kStages = 3;
constexpr int kXLd = kBK + 8, kWLd = kBK + 8;
constexpr int kThreads = 128;
// Reduction tiles per split at least: 8 up to 64 tokens (at most 10 splits of a 2560-wide
// router: fewer partial sums for the top-k kernel to add; H200, against 4: steps 16 x 1000 and
// 16 x 8500 -1.2 to -1.4%, 64 x 1500 -0.2%), 4 beyond (256 x 1000 was 0.7% slower with 8).
int min_tiles_per_split(int tokens) {
  return tokens <= 64 ? 8 : 4;
}
constexpr int kTargetCtas = 264;  // two per SM on the H100

struct Split {
  int m_tiles, n_tiles, k_tiles, splits, tiles_per_split;
};

Split plan_split(int tokens, int hidden, int experts) {
  Split s;
  s.m_tiles = (tokens + kBM - 1) / kBM;
  s.n_tiles = (experts + kBN - 1) / kBN;
  s.k_tiles = hidden / kBK;
  const int want = std::max(1, kTargetCtas / (s.m_tiles * s.n_tiles));
  s.splits = std::max(1, std::min(want, s.k_tiles / min_tiles_per_split(tokens)));
  s.tiles_per_split = (s.k_tiles + s.splits - 1) / s.splits;
  s.splits = (s.k_tiles + s.tiles_per_split - 1) / s.tiles_per_split;
  return s;
}

// hi + mid + lo bf16 terms of a pair of f32 weights (each the bf16 rounding of what the terms
// before it left), each packed as one bf16x2 register.
__device__ __forceinline__ void split_pair(float2 w, uint32_t& hi, uint32_t& mid, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(w.x, w.y);
  const float2 hf = __bfloat1622float2(h);
  const float2 r1 = make_float2(w.x - hf.x, w.y - hf.y);
  const __nv_bfloat162 m = __floats2bfloat162_rn(r1.x, r1.y);
  const float2 mf = __bfloat1622float2(m);
  const __nv_bfloat162 l = __floats2bfloat162_rn(r1.x - mf.x, r1.y - mf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  mid = *reinterpret_cast<const uint32_t*>(&m);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

constexpr int kTopkWarps = 4;

// The MoE layout of one token's k pairs (align_pairs's result) with one barrier: the token's
// experts are distinct, so each pair's block is its expert's rank among them, the block's first
// row the pair and its other rows padding. ids (shared memory) [k]; pair_of_block: k ints of
// shared scratch. Returns false, having written nothing, if two pairs share an expert (only NaN
// logits do that), for align_pairs to lay them out. Every thread of the CTA calls it.
__device__ __forceinline__ bool align_one_token(const RouteLayout& L, const int32_t* ids, int k,
                                                int* pair_of_block) {
  const int tid = threadIdx.x;
  bool dup = false;
  if (tid < k) {
    const int e = ids[tid];
    int rank = 0;
    for (int j = 0; j < k; ++j) {
      rank += ids[j] < e;
      dup = dup || (j < tid && ids[j] == e);
    }
    pair_of_block[rank] = tid;
  }
  if (__syncthreads_or(dup)) return false;
  const int rows = L.num_blocks * L.block_m;
  for (int r = tid; r < rows; r += blockDim.x) {
    const int b = r / L.block_m;
    L.sorted_pairs[r] = r % L.block_m == 0 && b < k ? pair_of_block[b] : -1;
  }
  for (int b = tid; b < L.num_blocks; b += blockDim.x) {
    L.block_expert[b] = b < k ? ids[pair_of_block[b]] : -1;
  }
  if (tid < k) L.pair_pos[pair_of_block[tid]] = tid * L.block_m;
  return true;
}

// What the last CTA of a fused launch (router_small_kernel<true>) finishes with: the top-k of
// every token, then the MoE layout of the pairs (RouteLayout).
struct Tail {
  int32_t* ids;
  float* weights;
  const float* bias;
  int k;
  float norm_min;
  RouteLayout layout;
  bool lean = false;   // topk_token's lean stores, align_one_token
  bool redux = false;  // topk_token's hardware reductions
};

// Up to this many tokens router_small_kernel computes the logits, and with a layout its last CTA
// does the top-k and the layout too. The fused tail runs in one CTA (4 warps, a token per warp
// at a time), so it pays only while the tokens are few: beyond this the tensor-core logits
// kernel and the separate top-k and align kernels spread the work.
constexpr int kFusedRouteTokens = 8;

// When the logits kernels let the kernels after them launch (route_topk's launch order).
enum Trigger : int { kAtStart, kAfterWait, kAtEnd };

// CTAs of the current fused launch that have written their logits; the last one resets it.
__device__ unsigned int g_route_arrivals = 0;

// partial[split][token][expert] = sum over this split's reduction range of x * W.
__global__ void __launch_bounds__(kThreads)
    router_logits_kernel(float* partial, const __nv_bfloat16* x, const float* w, int tokens,
                         int hidden, int experts, int tiles_per_split, Trigger trigger) {
  if (trigger == kAtStart) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  // The router's weights are fixed: the first stages' weights load before the wait for x.
  __shared__ __align__(16) __nv_bfloat16 xs[kStages][kBM][kXLd];
  __shared__ __align__(16) float ws[kStages][kBN][kWLd];
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN, split = blockIdx.z;
  const int kt0 = split * tiles_per_split;
  const int kt_end = min(hidden / kBK, kt0 + tiles_per_split);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;

  auto load_x = [&](int stage, int kt) {
    const int k0 = kt * kBK;
    for (int i = tid; i < kBM * (kBK / 8); i += kThreads) {  // 8 bf16 per chunk
      const int r = i / (kBK / 8), ch = i % (kBK / 8);
      const bool ok = m0 + r < tokens;
      cp_async_16(&xs[stage][r][ch * 8],
                  ok ? x + static_cast<size_t>(m0 + r) * hidden + k0 + ch * 8 : x, ok);
    }
  };
  auto load_w = [&](int stage, int kt) {
    const int k0 = kt * kBK;
    for (int i = tid; i < kBN * (kBK / 4); i += kThreads) {  // 4 floats per chunk
      const int r = i / (kBK / 4), ch = i % (kBK / 4);
      const bool ok = n0 + r < experts;
      cp_async_16(&ws[stage][r][ch * 4],
                  ok ? w + static_cast<size_t>(n0 + r) * hidden + k0 + ch * 4 : w, ok);
    }
  };

  float acc[kBN / 8][4] = {};
  const int n = kt_end - kt0;
  // A commit group per stage; the first also holds the weights loaded before the wait.
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n) load_w(s, kt0 + s);
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (trigger == kAfterWait) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n) load_x(s, kt0 + s);
    cp_async_commit();
  }
  for (int i = 0; i < n; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (i + kStages - 1 < n) {
      load_x((i + kStages - 1) % kStages, kt0 + i + kStages - 1);
      load_w((i + kStages - 1) % kStages, kt0 + i + kStages - 1);
    }
    cp_async_commit();
    const int st = i % kStages;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t a[4];
      const __nv_bfloat16* p = &xs[st][warp * 16 + g][ks * 16 + 2 * c];
      a[0] = load_u32(p);
      a[1] = load_u32(p + 8 * kXLd);
      a[2] = load_u32(p + 8);
      a[3] = load_u32(p + 8 * kXLd + 8);
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        const float* q = &ws[st][nt * 8 + g][ks * 16 + 2 * c];
        uint32_t h0, md0, l0, h1, md1, l1;
        split_pair(*reinterpret_cast<const float2*>(q), h0, md0, l0);
        split_pair(*reinterpret_cast<const float2*>(q + 8), h1, md1, l1);
        mma_16816(acc[nt], a, l0, l1);  // smallest terms first
        mma_16816(acc[nt], a, md0, md1);
        mma_16816(acc[nt], a, h0, h1);
      }
    }
  }
  cp_async_wait<0>();
  float* out = partial + static_cast<size_t>(split) * tokens * experts;
#pragma unroll
  for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int t = m0 + warp * 16 + g + (j >= 2 ? 8 : 0);
      const int e = n0 + nt * 8 + 2 * c + (j & 1);
      if (t < tokens && e < experts) out[static_cast<size_t>(t) * experts + e] = acc[nt][j];
    }
  }
  // kAtEnd: the kernels after this one launch only now: launched early, the routed GEMM's CTAs
  // would sit on every SM waiting, and the shared experts' GEMM (side stream, free to run while
  // the router is latency-bound) could not start until they finish. (kAfterWait: the routed
  // GEMM holds the shared experts' blocks itself, which need only x.)
  if (trigger == kAtEnd) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Few tokens (at most kFusedRouteTokens): logits[token][expert] by one CTA per expert, f32
// weights times the bf16 activations in f32 FMAs (each thread a fixed set of 4-column groups, a
// fixed reduction tree after), no split partials. The router's weights are fixed, so the
// expert's row comes into shared memory by one bulk copy issued before the wait for x (plain
// loads placed there in the source are scheduled after the wait by the compiler: seen in the
// SASS). kFused: the last CTA to finish also does the top-k and the layout, so a small decode
// step routes in one launch. (It replaced tensor-core logits split over 20 CTAs with the same
// fused tail: step 1 x 1000 2.695 -> 2.630 ms on an H200, the router's span in a layer 16.7 ->
// 13.3 us; the bulk copy another 0.3%. Taking 9-32 tokens too, followed by the top-k and align
// kernels, made 16 x 1000 1.6% slower.)
constexpr int kSmallThreads = 128;
constexpr size_t kSmallMaxSmem = 200 * 1024;  // a weight row, the input, the tail's scratch

// The fused tail, by one whole CTA of kSmallThreads: the top-k of every token (a warp per
// token, logits [tokens][experts] in global memory), the ids also into shared memory after the
// bias (for the layout to read without a trip to L2), then the MoE layout. tail_smem: the
// warps' scratch [warps][2 * experts]; bias_s: the bias, then room for the ids, counts and
// offsets.
__device__ __forceinline__ void route_tail(const Tail& tail, const float* logits, float* tail_smem,
                                           float* bias_s, int tokens, int experts) {
  const int warp = threadIdx.x / 32;
  auto* ids_s = reinterpret_cast<int32_t*>(bias_s + experts);
  for (int t = warp; t < tokens; t += kSmallThreads / 32) {
    topk_token(t, tail.ids, tail.weights, Partials::split_major(logits, tokens, experts, 1), bias_s,
               experts, tail.k, tail.norm_min, tail_smem + static_cast<size_t>(warp) * 2 * experts,
               ids_s, tail.lean, tail.redux);
  }
  __syncthreads();                        // every token's ids are written
  int* counts = ids_s + tokens * tail.k;  // 2 * experts + 1 ints, at least k
  const RouteLayout& L = tail.layout;
  if (tail.lean && tokens == 1 && tail.k <= kSmallThreads &&
      align_one_token(L, ids_s, tail.k, counts)) {
    return;
  }
  align_pairs(L.sorted_pairs, L.block_expert, L.pair_pos, ids_s, tokens * tail.k, experts,
              L.block_m, L.num_blocks, counts, counts + experts);
}

template <bool kFused>
__global__ void __launch_bounds__(kSmallThreads)
    router_small_kernel(float* logits, const __nv_bfloat16* x, const float* w, int tokens,
                        int hidden, int experts, const Tail tail, Trigger trigger, bool latency) {
  const int e = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int groups = hidden / 4;
  // Dynamic shared memory: the expert's weight row (hidden floats), the input (tokens x hidden
  // bf16), then (kFused) the tail's scratch.
  extern __shared__ __align__(16) float dyn_smem[];
  __shared__ __align__(8) uint64_t w_full, x_full;
  auto* xs = reinterpret_cast<__nv_bfloat16*>(dyn_smem + hidden);
  const uint32_t x_bytes = static_cast<uint32_t>(tokens) * hidden * 2;
  if (tid == 0) {
    mbar_init(&w_full, 1);
    mbar_init(&x_full, 1);
    mbar_init_fence();
    mbar_arrive_expect_tx(&w_full, static_cast<uint32_t>(hidden) * 4);
    bulk_load(dyn_smem, w + static_cast<size_t>(e) * hidden, static_cast<uint32_t>(hidden) * 4,
              &w_full);
  }
  // kFused: the correction bias too (whichever CTA ends up doing the tail), by cp.async, which
  // stays before the wait (see above): the tail does not wait on memory for it (a DRAM trip
  // while the folded shared experts stream beside it). With the ids kept in shared memory for
  // the layout and the combine's 16-byte loads: H200, step 1 x 1000 2.493 -> 2.390 ms.
  // [warps][2 * experts] floats, then the bias, ids, counts
  float* tail_smem = dyn_smem + hidden + x_bytes / 4;
  float* bias_s = tail_smem + (kSmallThreads / 32) * 2 * experts;
  if constexpr (kFused) {
    for (int i = tid; i < experts; i += kSmallThreads) cp_async_4(bias_s + i, tail.bias + i);
    cp_async_commit();
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (trigger == kAfterWait) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  // latency: the input by one bulk copy too (a loop of loads from L2 waits for each: a trip
  // per 128 groups of four columns, five at a hidden size of 2560).
  if (latency && tid == 0) {
    mbar_arrive_expect_tx(&x_full, x_bytes);
    bulk_load(xs, x, x_bytes, &x_full);
  }
  __syncthreads();  // the barriers' initialisation is visible
  mbar_wait(&w_full, 0);
  if (latency) mbar_wait(&x_full, 0);
  const __nv_bfloat16* xin = latency ? xs : x;
  float acc[kFusedRouteTokens] = {};
  const float4* wrow = reinterpret_cast<const float4*>(dyn_smem);
  for (int q = tid; q < groups; q += kSmallThreads) {
    const float4 wv = wrow[q];
#pragma unroll
    for (int t = 0; t < kFusedRouteTokens; ++t) {
      if (t < tokens) {
        const uint2 xv =
            *reinterpret_cast<const uint2*>(xin + static_cast<size_t>(t) * hidden + 4 * q);
        const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&xv.x));
        const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&xv.y));
        acc[t] = fmaf(wv.x, a.x, acc[t]);
        acc[t] = fmaf(wv.y, a.y, acc[t]);
        acc[t] = fmaf(wv.z, b.x, acc[t]);
        acc[t] = fmaf(wv.w, b.y, acc[t]);
      }
    }
  }
  __shared__ float red[kSmallThreads / 32][kFusedRouteTokens];
#pragma unroll
  for (int t = 0; t < kFusedRouteTokens; ++t) {
    // (lean tail: only the tokens there are, not all eight reductions)
    if (t < tokens || !tail.lean) {
      float v = acc[t];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) red[warp][t] = v;
    }
  }
  __syncthreads();
  if (tid < tokens) {
    float v = 0.0f;
#pragma unroll
    for (int i = 0; i < kSmallThreads / 32; ++i) v += red[i][tid];
    logits[static_cast<size_t>(tid) * experts + e] = v;
  }
  // By default the kernels after this one launch only now (see router_logits_kernel).
  if (trigger == kAtEnd) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if constexpr (kFused) {
    __shared__ bool last;
    // The bias copy has landed (long since; no CTA may end with a copy into its shared memory
    // in flight), and this CTA's logits are visible before it is counted.
    cp_async_wait<0>();
    if (!latency) __threadfence();
    __syncthreads();
    if (tid == 0) {
      // latency: the arrival itself releases the CTA's logits (ordered before it by the
      // barrier) and acquires the other CTAs', instead of two sequentially consistent fences.
      last = (latency ? atomic_add_acq_rel_gpu(&g_route_arrivals, 1u)
                      : atomicAdd(&g_route_arrivals, 1u)) == gridDim.x - 1;
    }
    __syncthreads();  // also: every thread's bias copy is visible to all
    if (!last) return;
    if (!latency) __threadfence();
    route_tail(tail, logits, tail_smem, bias_s, tokens, experts);
    if (tid == 0) g_route_arrivals = 0;
  }
}

__global__ void __launch_bounds__(kTopkWarps * 32)
    router_topk_kernel(int32_t* ids, float* weights, const Partials part, const float* bias,
                       int tokens, int experts, int k, float norm_min) {
  pdl_begin();
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32;
  const int t = blockIdx.x * kTopkWarps + warp;
  if (t >= tokens) return;
  topk_token(t, ids, weights, part, bias, experts, k, norm_min,
             smem + static_cast<size_t>(warp) * 2 * experts);
}

// Pair i of the router's f32 weights split into its three bf16 terms, stored lo, mid, hi
// (route_topk_terms adds them in that order, smallest first).
__global__ void split_router_terms_kernel(__nv_bfloat162* terms, const float2* router,
                                          int64_t pairs) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t hi, mid, lo;
    split_pair(router[i], hi, mid, lo);
    terms[i] = *reinterpret_cast<const __nv_bfloat162*>(&lo);
    terms[pairs + i] = *reinterpret_cast<const __nv_bfloat162*>(&mid);
    terms[2 * pairs + i] = *reinterpret_cast<const __nv_bfloat162*>(&hi);
  }
}

}  // namespace

void split_router_terms(__nv_bfloat16* terms, const float* router, int64_t count,
                        cudaStream_t stream) {
  require(count % 2 == 0, "split_router_terms: an odd number of weights");
  if (count == 0) return;
  const int64_t pairs = count / 2;
  const int blocks = static_cast<int>(std::min<int64_t>((pairs + 255) / 256, 4096));
  split_router_terms_kernel<<<blocks, 256, 0, stream>>>(
      reinterpret_cast<__nv_bfloat162*>(terms), reinterpret_cast<const float2*>(router), pairs);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

void route_topk_terms(int32_t* ids, float* weights, const float* partial, const float* bias,
                      int tokens, int experts, int k, float norm_min, cudaStream_t stream) {
  require(tokens >= 0 && experts > 0 && experts <= 1024 && k > 0 && k <= experts,
          "route_topk_terms: bad shape");
  if (tokens == 0) return;
  const size_t smem = static_cast<size_t>(kTopkWarps) * 2 * experts * sizeof(float);
  launch_pdl(router_topk_kernel, (tokens + kTopkWarps - 1) / kTopkWarps, kTopkWarps * 32, smem,
             stream, ids, weights, Partials::token_major(partial, experts, kRouterTerms), bias,
             tokens, experts, k, norm_min);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

size_t route_scratch_bytes(int tokens, int hidden, int experts) {
  if (tokens <= 0) return 0;
  if (tokens <= kFusedRouteTokens) return static_cast<size_t>(tokens) * experts * sizeof(float);
  const Split s = plan_split(tokens, hidden, experts);
  return static_cast<size_t>(s.splits) * tokens * experts * sizeof(float);
}

namespace {

// router_small_kernel's shared memory limit, raised once.
void configure_small_router() {
  static const bool configured = [] {
    for (auto* f : {router_small_kernel<true>, router_small_kernel<false>}) {
      ERNIE_CUDA_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kSmallMaxSmem)));
    }
    return true;
  }();
  (void)configured;
}

// router_small_kernel's shared memory before the tail's: the weight row and the input.
size_t small_router_row_bytes(int tokens, int hidden) {
  return static_cast<size_t>(hidden) * sizeof(float) +
         static_cast<size_t>(tokens) * hidden * sizeof(__nv_bfloat16);
}

// The input by bulk copy, the arrival count with acquire-release semantics, and the MoE
// combine's loads issued together (moe.cu): H200, step 1 x 1000 2.400 -> 2.351 ms, 16 x 1000
// 9.420 -> 9.389. ERNIE_LATENCY_LOADS=0 turns them off.
bool latency_loads() {
  static const bool on = path_enabled("ERNIE_LATENCY_LOADS");
  return on;
}

}  // namespace

bool route_topk(int32_t* ids, float* weights, const __nv_bfloat16* x, const float* router,
                const float* bias, int tokens, int hidden, int experts, int k, float norm_min,
                void* scratch, cudaStream_t stream, const RouteLayout* layout,
                bool early_dependents) {
  if (tokens == 0) return false;
  // Up to 64 tokens the routed GEMMs launch only once the logits are in (steps 1 x 1000 3.62 ->
  // 3.50 ms, 16 and 64 tokens no slower), or once x is (early_dependents); at 256 the early
  // launch is 0.2 ms faster per step.
  const Trigger trigger = tokens > kRouteOrderedTokens ? kAtStart
                          : early_dependents           ? kAfterWait
                                                       : kAtEnd;
  require(tokens > 0 && hidden > 0 && hidden % kBK == 0 && experts > 0 && experts <= 1024 &&
              k > 0 && k <= experts,
          "route_topk: bad shape");
  // Up to 8 tokens router_small_kernel takes the logits in both modes (fused or not), so the
  // fused results equal the separate ones.
  if (tokens <= kFusedRouteTokens) {
    auto* logits = static_cast<float*>(scratch);  // tokens x experts <= the scratch's floats
    Tail tail{ids, weights, bias, k, norm_min, {}, false, false};
    // Shared memory: the weight row and the input, then (fused) the tail's scratch.
    const size_t row_bytes = small_router_row_bytes(tokens, hidden);
    // The tail: the warps' scratch, the bias, the ids, the layout's counts and offsets.
    const size_t tail_bytes =
        (static_cast<size_t>(kSmallThreads / 32) * 2 + 1) * experts * sizeof(float) +
        (static_cast<size_t>(tokens) * k + 2 * static_cast<size_t>(experts) + 1) * sizeof(int);
    require_parts(row_bytes + tail_bytes <= kSmallMaxSmem, "route_topk: a hidden size of ", hidden,
                  " is more than the small-batch router holds");
    configure_small_router();
    const bool latency = latency_loads();
    if (layout != nullptr) {
      tail.layout = *layout;
      // The lean tail (topk_token's lean stores, align_one_token, the logits reduced only for
      // the tokens there are): H200, step 1 x 1000 2.160 -> 2.136 ms, 2-8 tokens -0.1 to -0.3%.
      // The tail's CTA shares its multiprocessor with the folded shared experts' GEMM, so its
      // cost is the instruction count of its longest thread. ERNIE_LEAN_TAIL=0 turns it off.
      static const bool lean = path_enabled("ERNIE_LEAN_TAIL");
      tail.lean = lean;
      // topk_token's argmax rounds by warp reductions (redux.sync) in the fused tail: H200,
      // steps 1-8 x 1000 -0.3 to -0.4%. ERNIE_REDUX_TOPK=0 turns it off.
      static const bool redux = path_enabled("ERNIE_REDUX_TOPK");
      tail.redux = redux;
      // Each CTA asks for kSmallMaxSmem of shared memory, so that no MoE GEMM CTA (50-62 KB)
      // fits beside it: the folded shared experts' CTAs, launched once the router has waited
      // for x, then run on the other multiprocessors, and the tail's CTA, whose instructions
      // otherwise queue behind their warps', has its multiprocessor alone. The other router
      // CTAs end right after their arrival and free theirs for the routed CTAs. H200, steps
      // 2 x 1000 3.445 -> 3.359 ms, 4 x 1000 -1.1%, 8 x 1000 -0.5%, 1 x 1000 unchanged.
      // ERNIE_ROUTER_ALONE=0 turns it off.
      static const bool alone = path_enabled("ERNIE_ROUTER_ALONE");
      const size_t smem =
          alone ? std::max(row_bytes + tail_bytes, kSmallMaxSmem) : row_bytes + tail_bytes;
      launch_pdl(router_small_kernel<true>, experts, kSmallThreads, smem, stream, logits, x, router,
                 tokens, hidden, experts, tail, trigger, latency);
      ERNIE_CUDA_CHECK(cudaGetLastError());
      return true;
    }
    launch_pdl(router_small_kernel<false>, experts, kSmallThreads, row_bytes, stream, logits, x,
               router, tokens, hidden, experts, tail, trigger, latency);
    ERNIE_CUDA_CHECK(cudaGetLastError());
    const size_t smem = static_cast<size_t>(kTopkWarps) * 2 * experts * sizeof(float);
    launch_pdl(router_topk_kernel, (tokens + kTopkWarps - 1) / kTopkWarps, kTopkWarps * 32, smem,
               stream, ids, weights, Partials::split_major(logits, tokens, experts, 1), bias,
               tokens, experts, k, norm_min);
    ERNIE_CUDA_CHECK(cudaGetLastError());
    return false;
  }
  const Split s = plan_split(tokens, hidden, experts);
  auto* partial = static_cast<float*>(scratch);
  const dim3 grid(s.m_tiles, s.n_tiles, s.splits);
  launch_pdl(router_logits_kernel, grid, kThreads, 0, stream, partial, x, router, tokens, hidden,
             experts, s.tiles_per_split, trigger);
  ERNIE_CUDA_CHECK(cudaGetLastError());
  const size_t smem = static_cast<size_t>(kTopkWarps) * 2 * experts * sizeof(float);
  launch_pdl(router_topk_kernel, (tokens + kTopkWarps - 1) / kTopkWarps, kTopkWarps * 32, smem,
             stream, ids, weights, Partials::split_major(partial, tokens, experts, s.splits), bias,
             tokens, experts, k, norm_min);
  ERNIE_CUDA_CHECK(cudaGetLastError());
  return false;
}

}  // namespace ernie::cuda
