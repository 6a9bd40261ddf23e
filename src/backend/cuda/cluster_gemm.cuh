// Linear layers of decode-sized batches (tens to a few hundred tokens) on the tensor cores with
// the roles swapped: a CTA's 128 weight rows are wgmma's M side, brought by TMA, and all of the
// batch's tokens (up to 256 per CTA) its N side, so each weight byte is read once. To have
// enough CTAs streaming the weights, the reduction is split over a cluster of 1, 2 or 4 CTAs;
// each stages its partial sums in shared memory, and after a cluster barrier every CTA adds a
// share of the tile's outputs from all of them (distributed shared memory), in rank order: the
// result does not depend on which CTA finishes first. The epilogue then stores bf16, or does
// SwiGLU (the shared experts' gate/up), or rope with the KV-cache store (qkv).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/skinny_gemm.cuh"

namespace ernie::cuda {

// The backend takes it from this many tokens (fewer: skinny_tc, skinny_gemm).
constexpr int kClusterGemmMinTokens = 17;

// How a call runs: `splits` CTAs of a cluster share the reduction (1, 2 or 4; tests up to 8),
// each CTA takes `token_tile` tokens (64, 128 or 256; more tokens take more tiles). splits == 0:
// not taken.
struct ClusterGemmPlan {
  int splits = 0;
  int token_tile = 0;
  // Tiles (of 128 weight rows) in a cluster that share each slice's tokens (1, 2 or 4): each
  // brings a piece by TMA multicast into all of them (clusters of splits x share CTAs).
  int share = 1;
};

// The plan for out [m, n] = x [m, k] w [n, k]^T on this device, or splits == 0 when the call
// does not fit: n % 128 != 0, k % 64 != 0, or more tiles than one wave of resident clusters.
// Splits as many as one wave of CTAs allows (each split at least two 64-wide slices of k).
// (SwiGLU's n is its gate and up rows together.)
ClusterGemmPlan cluster_gemm_plan(int m, int n, int k);
// Whether `plan` can run an m x k input on this device (a plan from cluster_gemm_plan can;
// tests force other splits).
bool cluster_gemm_plan_valid(const ClusterGemmPlan& plan, int m, int n, int k);

// Diagnostics: with `stamps` set (kCgStamps 64-bit words a CTA, CTAs in launch order: x the
// split, y the weight tile, z the token tile), each CTA writes the global timer (ns) at these
// milestones; the engine passes none.
enum ClusterGemmStamp {
  kStampEntry,       // thread 0 begins
  kStampSynced,      // barriers initialised and (cluster) synchronised
  kStampFirstSlice,  // the first slice's weights and tokens have landed
  kStampIssued,      // the producer has issued its last slice
  kStampLoopDone,    // the first consumer's multiplies are done
  kStampStaged,      // every split's sums are staged
  kStampStored,      // this CTA's outputs are stored
  kStampExit,        // the last barrier passed
};
constexpr int kCgStamps = 8;
// CTAs of an m x ? -> n launch under `plan`: the rows a stamp buffer needs.
int cluster_gemm_ctas(const ClusterGemmPlan& plan, int m, int n);

// out [m, n] bf16 = x w^T (f32 sums); x, w, out 16-byte aligned, row-major.
void cluster_gemm(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m, int n,
                  int k, const ClusterGemmPlan& plan, cudaStream_t stream,
                  uint64_t* stamps = nullptr);

// out [m, n / 2] = silu(gate) * up with [gate; up] = x w^T, w's first n / 2 rows the gate's:
// the values of cluster_gemm followed by silu_mul (each sum rounded to bf16 first).
void cluster_gemm_swiglu(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                         int n, int k, const ClusterGemmPlan& plan, cudaStream_t stream);

// A qkv projection [m, (heads + 2 kv_heads) head_dim] followed by rope_store_kv's work, as
// skinny_gemm_rope does for a few tokens. Fits where the plan does and head_dim % 8 == 0.
bool cluster_gemm_rope_fits(const SkinnyRope& rope);
void cluster_gemm_rope(__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w, int m,
                       int k, const SkinnyRope& rope, const ClusterGemmPlan& plan,
                       cudaStream_t stream);

}  // namespace ernie::cuda
