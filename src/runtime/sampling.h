// Host-side sampling for the offline generator. (The engine moves sampling onto the backend.)
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/rng.h"

namespace ernie::runtime {

struct TokenLogprob {
  int32_t id;
  float logprob;
};

// argmax, lowest id on ties.
int32_t greedy(std::span<const float> logits);
// Samples from softmax(logits / temperature); temperature <= 0 means greedy.
int32_t sample(std::span<const float> logits, float temperature, Rng& rng);
// The k most likely tokens under log_softmax(logits), most likely first (ties: lower id).
std::vector<TokenLogprob> top_logprobs(std::span<const float> logits, int k);

}  // namespace ernie::runtime
