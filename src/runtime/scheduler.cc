#include "runtime/scheduler.h"

#include <algorithm>

#include "common/check.h"

namespace ernie::runtime {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
    default:
      return "";
  }
}

void Scheduler::remove(Sequence* s) {
  auto it = std::find(running_.begin(), running_.end(), s);
  if (it != running_.end()) running_.erase(it);
  auto wt = std::find(waiting_.begin(), waiting_.end(), s);
  if (wt != waiting_.end()) waiting_.erase(wt);
  kv_.free(s->table);
}

void Scheduler::preempt(Sequence* s) {
  kv_.free(s->table);
  s->num_computed = 0;
  ++s->num_preemptions;
  ++preemptions_;
  running_.erase(std::find(running_.begin(), running_.end(), s));
  waiting_.push_front(s);
}

SchedulerOutput Scheduler::schedule() {
  SchedulerOutput out;
  int64_t budget = cfg_.max_num_batched_tokens;
  // Fits chunk [start, start + n) of s to the logits rows left for prompt logprobs when
  // `reserved` rows go to sequences that may sample; 0 when none of it fits.
  auto fit_rows = [&](const Sequence& s, int64_t start, int64_t n, int64_t reserved) {
    const Sequence::LogitRows want = s.prompt_logprob_rows(start, n);
    const int64_t left =
        std::min(kPromptLogprobRows, cfg_.max_num_seqs + kPromptLogprobSlack - reserved) -
        out.num_prompt_rows;
    if (want.count <= std::max<int64_t>(left, 0)) return n;
    return std::max<int64_t>(0, want.first + std::max<int64_t>(left, 0) - start);
  };
  auto add = [&](Sequence* s, int64_t start, int64_t n) {
    ScheduledSeq sc{s, start, n, start + n == s->num_tokens(), s->prompt_logprob_rows(start, n)};
    out.num_prompt_rows += sc.prompt_rows.count;
    out.seqs.push_back(sc);
    budget -= n;
  };
  bool held_back = false;  // a running sequence's prompt logprobs found no room
  // 1. Running sequences, oldest first.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* s = running_[i];
    if (s->await_final) {  // its last token is in flight: nothing to compute
      ++i;
      continue;
    }
    const int64_t todo = std::min(s->num_tokens() - s->num_computed, budget);
    check(todo > 0, "a running sequence has nothing to compute");
    const int64_t n = fit_rows(*s, s->num_computed, todo, static_cast<int64_t>(running_.size()));
    if (n == 0) {
      held_back = true;
      ++i;
      continue;
    }
    bool self_preempted = false;
    while (!kv_.allocate(s->table, s->num_computed + n, {})) {
      Sequence* victim = running_.back();
      // Never preempt a sequence already scheduled this step (older than s anyway).
      preempt(victim);
      ++out.num_preempted;
      if (victim == s) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;
    add(s, s->num_computed, n);
    ++i;
  }
  // 2. Waiting sequences in arrival order, unless this step had to preempt or hold back.
  while (out.num_preempted == 0 && !held_back && !waiting_.empty() && budget > 0 &&
         static_cast<int>(running_.size()) < cfg_.max_num_seqs &&
         static_cast<int64_t>(running_.size()) + 1 + out.num_prompt_rows <=
             cfg_.max_num_seqs + kPromptLogprobSlack) {
    Sequence* s = waiting_.front();
    // A prompt whose logprobs are asked for runs whole: cached blocks have no logits.
    const std::vector<int32_t> prefix =
        s->needs_prompt_logprobs() ? std::vector<int32_t>{} : kv_.cached_prefix(s->tokens);
    const int64_t computed = static_cast<int64_t>(prefix.size()) * kv_.block_size();
    const int64_t n = fit_rows(*s, computed, std::min(s->num_tokens() - computed, budget),
                               static_cast<int64_t>(running_.size()) + 1);
    if (n == 0) break;
    if (!kv_.allocate(s->table, computed + n, prefix)) break;  // FCFS: nobody jumps the queue
    s->num_computed = computed;
    if (s->cached_prompt_tokens < 0) s->cached_prompt_tokens = computed;  // the first admission
    s->table.hashes.clear();
    // The adopted prefix blocks are already cached: record their hashes.
    kv_.cache_full_blocks(s->table, s->tokens, computed);
    waiting_.pop_front();
    running_.push_back(s);
    add(s, computed, n);
  }
  for (const auto& sc : out.seqs) out.num_tokens += sc.num_tokens;
  return out;
}

void Scheduler::update(const SchedulerOutput& out) {
  for (const auto& sc : out.seqs) {
    // Finished while the step ran (asynchronous scheduling: a stop in the step before): its
    // blocks are gone.
    if (sc.seq->finished()) continue;
    sc.seq->num_computed = sc.start + sc.num_tokens;
    kv_.cache_full_blocks(sc.seq->table, sc.seq->tokens, sc.seq->num_computed);
  }
}

}  // namespace ernie::runtime
