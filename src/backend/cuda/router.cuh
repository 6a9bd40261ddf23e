// The ERNIE-4.5 MoE router on the device: logits = x W^T with f32 weights, p = softmax(logits),
// experts = top-k of p + correction bias (selection only), weights = the unbiased p of the
// chosen experts divided by max(sum, norm_min).
//
// Up to 8 tokens (a decode step of few sequences, where the router is pure latency) the logits
// are f32 FMAs of the f32 weights and the bf16 activations, one CTA per expert, each weight row
// loaded before the kernel waits for x. Otherwise the logits run on the tensor cores: each f32
// weight is split into three bf16 terms (hi = bf16(w), mid = bf16(w - hi), lo = bf16(w - hi -
// mid), together all 24 significant bits) and each is multiplied with the bf16 activations with
// f32 accumulation. Either way the result differs from an f32 GEMM by summation order only. The
// tensor-core path splits the reduction over more CTAs for few tokens; the partial sums are
// added in a fixed order by the top-k kernel, so results do not depend on scheduling.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ernie::cuda {

// Bytes of device scratch route_topk needs for this shape.
size_t route_scratch_bytes(int tokens, int hidden, int experts);

// moe_align's outputs (see moe.cuh), for route_topk to write as well.
struct RouteLayout {
  int32_t* sorted_pairs = nullptr;  // [num_blocks * block_m]
  int32_t* block_expert = nullptr;  // [num_blocks]
  int32_t* pair_pos = nullptr;      // [tokens * k]
  int block_m = 0, num_blocks = 0;
};

// x [tokens, hidden] bf16; router [experts, hidden] f32; bias [experts] f32; scratch of
// route_scratch_bytes(). Writes ids [tokens, k] (descending biased score, lower id first on
// ties) and weights [tokens, k]. hidden % 32 == 0, experts <= 1024, k <= experts. With a
// layout and at most 8 tokens it also lays the pairs out as moe_align does, in the same
// launch, and returns true; otherwise the caller runs moe_align.
//
// Launch order (programmatic dependent launch): up to kRouteOrderedTokens tokens the router's
// kernels let the kernels after them launch only once they have waited for x (so whatever
// launches after route_topk, and after moe_align, which lets its dependents launch at once, may
// read x before its own wait); by default once the logits are stored, with early_dependents
// right after the wait. Beyond it they launch at once (they then wait as usual).
constexpr int kRouteOrderedTokens = 64;
bool route_topk(int32_t* ids, float* weights, const __nv_bfloat16* x, const float* router,
                const float* bias, int tokens, int hidden, int experts, int k, float norm_min,
                void* scratch, cudaStream_t stream, const RouteLayout* layout = nullptr,
                bool early_dependents = false);

// For many tokens the caller may instead compute the logits as one bf16 GEMM (cuBLAS) of x
// with the router's weights split into kRouterTerms bf16 terms as the tensor-core path splits
// them (hi, mid, lo above: together all 24 significant bits), stacked lo, mid, hi as
// [kRouterTerms * experts, hidden] so that the top-k adds the smallest first. The result
// differs from an f32 GEMM by summation order only.
constexpr int kRouterTerms = 3;
// terms [kRouterTerms, count] bf16 from router [count] f32 (count even).
void split_router_terms(__nv_bfloat16* terms, const float* router, int64_t count,
                        cudaStream_t stream);
// The top-k from partial [tokens, kRouterTerms * experts] f32 = x terms^T: route_topk's ids and
// weights (the caller lays the pairs out with moe_align).
void route_topk_terms(int32_t* ids, float* weights, const float* partial, const float* bias,
                      int tokens, int experts, int k, float norm_min, cudaStream_t stream);

}  // namespace ernie::cuda
