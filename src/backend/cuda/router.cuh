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

// Only the logits [tokens, experts] f32 (at most 8 tokens; logits needs tokens * experts
// floats), with route_topk's launch order, for kernels that pick the experts themselves (the
// decode MoE GEMMs routing one token: moe.cuh's RouteInGemm).
void route_logits(float* logits, const __nv_bfloat16* x, const float* router, int tokens,
                  int hidden, int experts, cudaStream_t stream, bool early_dependents);

}  // namespace ernie::cuda
