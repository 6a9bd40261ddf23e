// The reference sampler: one row of f32 logits -> one token, with vLLM's processing order:
// logprobs of the raw logits; logit_bias and banned ids; repetition, frequency and presence
// penalties; then greedy, or temperature -> min_p -> top_k -> top_p -> a draw keyed by
// (seed, position) so a request's tokens do not depend on its batch-mates.
#pragma once

#include <span>

#include "backend/backend.h"

namespace ernie::backend::cpu {

SampledToken sample_row(std::span<const float> logits, const SamplingRow& row);

}  // namespace ernie::backend::cpu
