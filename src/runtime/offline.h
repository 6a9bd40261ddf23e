// A minimal batch generator over the step interface: every request's blocks are reserved up
// front, prompts are prefilled in chunks under a token budget mixed with decodes, then all
// sequences decode together. The engine (continuous batching, preemption, prefix caching)
// replaces it for serving; tests and `ernie generate` use it now.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "model/ernie45.h"
#include "runtime/sampling.h"

namespace ernie::runtime {

struct GenerateRequest {
  std::vector<int32_t> prompt;
  int max_tokens = 16;
  float temperature = 1.0f;
  uint64_t seed = 0;
  int logprobs = 0;  // top-k logprobs per generated token
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;  // end the request like EOS (the tokenizer's EOS ids)
};

struct GenerateResult {
  std::vector<int32_t> tokens;
  std::vector<std::vector<TokenLogprob>> logprobs;  // [generated, k]
  std::string finish_reason;                        // "stop" or "length"
};

struct OfflineOptions {
  int block_size = 16;
  int max_num_batched_tokens = 8192;  // per-step token budget; prompts longer are chunked
};

std::vector<GenerateResult> generate(model::Ernie45& model, backend::Backend& be,
                                     const std::vector<GenerateRequest>& requests,
                                     const OfflineOptions& opts);

}  // namespace ernie::runtime
