// One sequence being generated (a request with n > 1 becomes n sequences sharing a prompt).
#pragma once

#include <algorithm>
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
  int64_t cached_prompt_tokens = -1;  // prompt tokens found in the prefix cache at admission

  // Text (when a tokenizer is present).
  std::unique_ptr<tokenizer::IncrementalDetokenizer> detok;
  std::string text;                             // output text so far (stop strings applied)
  size_t text_sent = 0;                         // bytes of `text` already returned to the caller
  size_t tokens_sent = 0;                       // output ids already returned
  std::vector<backend::SampledToken> logprobs;  // per output token, when asked for
  // Prompt logprobs (params->prompt_logprobs; a request's first sequence only): entry p is
  // prompt token p + 1's, from the logits at position p (the first token has none), filled as
  // the prompt's chunks run; sent once, with the sequence's first output.
  std::vector<backend::SampledToken> prompt_logprobs;
  bool scores_prompt = false;  // params->prompt_logprobs set and index 0 (kept here: hot paths)
  bool prompt_logprobs_sent = false;

  FinishReason finish = FinishReason::kNone;
  std::optional<std::string> stop_string;
  std::optional<int32_t> stop_token;

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  // Prompt logprobs still to compute: the prompt then runs without cached blocks, and its
  // chunks return a logits row per position that gives one.
  bool needs_prompt_logprobs() const {
    return scores_prompt && prompt_logprobs.size() + 1 < prompt->size();
  }
  // The positions [first, first + count) of chunk [start, start + n) whose logits give prompt
  // logprobs not computed yet (after a preemption the chunks run again over scored ones).
  struct LogitRows {
    int64_t first = 0, count = 0;
  };
  LogitRows prompt_logprob_rows(int64_t start, int64_t n) const {
    if (!needs_prompt_logprobs()) return {};
    const int64_t have = static_cast<int64_t>(prompt_logprobs.size());
    const int64_t first = std::max(start, have);
    const int64_t end = std::min(start + n, static_cast<int64_t>(prompt->size()) - 1);
    return {first, std::max<int64_t>(0, end - first)};
  }
  bool finished() const { return finish != FinishReason::kNone; }
};

}  // namespace ernie::runtime
