// Continuous batching with vLLM's policy: every step, running sequences first (decodes, and
// prefills still in progress), then waiting ones in arrival order, all under a token budget
// (chunked prefill) and a sequence limit. When blocks run out the most recently admitted
// running sequence is preempted: its blocks are freed and it is recomputed later (it goes back
// to the front of the queue), so the oldest sequence always makes progress.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "runtime/kv_cache.h"
#include "runtime/request.h"

namespace ernie::runtime {

// Logits rows a step returns for prompt logprobs: at most kPromptLogprobRows, and together
// with one row per running sequence at most max_num_seqs + kPromptLogprobSlack (the worst-case
// step the KV cache was sized with returns max_num_seqs rows). A sequence whose prompt
// logprobs find no room waits, and no sequence is admitted meanwhile, so it never starves.
constexpr int64_t kPromptLogprobRows = 256;
constexpr int64_t kPromptLogprobSlack = 16;

struct SchedulerConfig {
  int max_num_seqs = 256;
  int max_num_batched_tokens = 8192;
  int64_t max_model_len = 0;
};

struct ScheduledSeq {
  Sequence* seq;
  int64_t start;                    // first token position computed this step
  int64_t num_tokens;               // tokens computed this step
  bool samples;                     // the chunk ends at the sequence's last token: sample after it
  Sequence::LogitRows prompt_rows;  // positions whose logits give prompt logprobs
};

struct SchedulerOutput {
  std::vector<ScheduledSeq> seqs;
  int64_t num_tokens = 0;
  int64_t num_prompt_rows = 0;  // logits rows for prompt logprobs, over every sequence
  int num_preempted = 0;
};

class Scheduler {
 public:
  Scheduler(SchedulerConfig cfg, KvCacheManager& kv) : cfg_(cfg), kv_(kv) {}

  void add(Sequence* s) { waiting_.push_back(s); }
  // Removes a sequence wherever it is, freeing its blocks.
  void remove(Sequence* s);
  SchedulerOutput schedule();
  // After the step ran: advances num_computed and registers newly full blocks.
  void update(const SchedulerOutput& out);

  size_t num_running() const { return running_.size(); }
  size_t num_waiting() const { return waiting_.size(); }
  int64_t num_preemptions() const { return preemptions_; }

 private:
  void preempt(Sequence* s);

  SchedulerConfig cfg_;
  KvCacheManager& kv_;
  std::vector<Sequence*> running_;  // in admission order
  std::deque<Sequence*> waiting_;
  int64_t preemptions_ = 0;
};

}  // namespace ernie::runtime
