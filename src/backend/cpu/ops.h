// CPU reference ops on raw f32 pointers: plain, exact (f32 math, f64 where a sum is long), and
// used both by the CPU backend and as the oracle that GPU kernels are tested against.
#pragma once

#include <cstdint>
#include <span>

namespace ernie::backend::cpu {

// out[m, n] = sum_k x[m, k] * w[n, k]. Parallel over n; each weight row is read once per 4 rows.
void gemm_xwt(float* out, const float* x, const float* w, int64_t m, int64_t n, int64_t k);

// out = (x / sqrt(mean(x^2) + eps)) * weight, per row of `hidden`.
void rms_norm(float* out, const float* x, const float* weight, int64_t rows, int64_t hidden,
              float eps);

// silu(gate) * up where gate_up rows are [gate (inter) | up (inter)].
void silu_mul(float* out, const float* gate_up, int64_t rows, int64_t inter);

// Rotates `num_heads` heads of `head_dim` in place at `position` (interleaved pairs:
// (x[2j], x[2j+1]) by angle position * theta^(-2j/head_dim)).
void rope_interleaved(float* x, int num_heads, int head_dim, int64_t position, double theta);

// MoE routing for one token: softmax(logits) -> top-k of (p + bias) -> the unbiased p of the
// chosen experts renormalised by max(sum, norm_min). Writes k expert ids and weights, ordered
// by descending biased score (ties: lower id first).
void route_token(const float* logits, const float* bias, int num_experts, int k, float norm_min,
                 int32_t* experts, float* weights);

}  // namespace ernie::backend::cpu
