// One sequence being generated (a request with n > 1 becomes n sequences sharing a prompt).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "runtime/kv_cache.h"
#include "runtime/sampling_params.h"
#include "tokenizer/detokenizer.h"

namespace ernie::runtime {

enum class FinishReason { kNone, kStop, kLength, kAbort };
const char* finish_reason_name(FinishReason r);

struct Sequence {
  std::string request_id;  // the user's request
  int index = 0;           // which of its n outputs
  uint64_t arrival = 0;    // admission order (FCFS), unique
  std::shared_ptr<const std::vector<int32_t>> prompt;
  std::shared_ptr<const SamplingParams> params;
  uint64_t seed = 0;

  std::vector<int32_t> tokens;  // prompt + output
  std::vector<int32_t> output;  // generated ids
  int64_t num_computed = 0;     // tokens whose KV is in the cache
  // Asynchronous scheduling: tokens[pending_at] is a placeholder for the id that row
  // pending_row of the step in flight draws (-1: none); await_final: that id is the last
  // (max_tokens or the context limit), so nothing is scheduled for it.
  int64_t pending_at = -1;
  int pending_row = 0;
  bool await_final = false;
  BlockTable table;
  int num_preemptions = 0;

  // Text (when a tokenizer is present).
  std::unique_ptr<tokenizer::IncrementalDetokenizer> detok;
  std::string text;                             // output text so far (stop strings applied)
  size_t text_sent = 0;                         // bytes of `text` already returned to the caller
  size_t tokens_sent = 0;                       // output ids already returned
  std::vector<backend::SampledToken> logprobs;  // per output token, when asked for

  FinishReason finish = FinishReason::kNone;
  std::optional<std::string> stop_string;
  std::optional<int32_t> stop_token;

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  bool finished() const { return finish != FinishReason::kNone; }
};

}  // namespace ernie::runtime
