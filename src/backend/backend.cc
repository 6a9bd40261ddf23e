#include "backend/backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "common/check.h"

namespace ernie::backend {

const char* stage_name(Stage s) {
  switch (s) {
    case Stage::kEmbedding:
      return "embedding";
    case Stage::kNorm:
      return "norms";
    case Stage::kQkvProj:
      return "qkv_proj";
    case Stage::kRopeKv:
      return "rope_kv";
    case Stage::kAttention:
      return "attention";
    case Stage::kOProj:
      return "o_proj";
    case Stage::kDenseMlp:
      return "dense_mlp";
    case Stage::kMoeRouter:
      return "moe_router";
    case Stage::kMoeExperts:
      return "moe_experts";
    case Stage::kMoeShared:
      return "moe_shared";
    case Stage::kMoeCombine:
      return "moe_combine";
    case Stage::kLmHead:
      return "lm_head";
    case Stage::kSampling:
      return "sampling";
    case Stage::kHostSchedule:
      return "host_schedule";
    case Stage::kHostOutput:
      return "host_output";
    case Stage::kCount:
      break;
  }
  return "?";
}

SampledToken score_token(std::span<const float> raw, int32_t id, int k) {
  const int32_t vocab = static_cast<int32_t>(raw.size());
  require_parts(id >= 0 && id < vocab, "score_token: token ", id, " outside the vocabulary of ",
                vocab);
  const float mx = *std::max_element(raw.begin(), raw.end());
  double sum = 0.0;
  for (float l : raw) sum += std::exp(static_cast<double>(l) - mx);
  const double lse = mx + std::log(sum);
  SampledToken out;
  out.id = id;
  out.logprob = static_cast<float>(raw[id] - lse);
  int32_t rank = 1;
  for (float l : raw) rank += l > raw[id];
  out.rank = rank;
  // The k best in one pass: a heap whose top is the worst kept.
  k = std::clamp(k, 0, vocab);
  auto better = [&](int32_t a, int32_t b) { return raw[a] != raw[b] ? raw[a] > raw[b] : a < b; };
  std::vector<int32_t> heap;
  heap.reserve(static_cast<size_t>(k));
  for (int32_t t = 0; t < vocab && k > 0; ++t) {
    if (static_cast<int>(heap.size()) < k) {
      heap.push_back(t);
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (better(t, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = t;
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  std::sort_heap(heap.begin(), heap.end(), better);
  for (int32_t t : heap) out.top.push_back({t, static_cast<float>(raw[t] - lse)});
  return out;
}

void HostStageTimer::mark(Stage s) {
  if (!on_) return;
  const auto now = std::chrono::steady_clock::now();
  if (open_)
    profile_.ms[static_cast<int>(stage_)] +=
        std::chrono::duration<double, std::milli>(now - since_).count();
  open_ = true;
  stage_ = s;
  since_ = now;
}

void HostStageTimer::end_step() {
  if (!on_ || !open_) return;
  mark(stage_);
  open_ = false;
  ++profile_.steps;
}

StageProfile HostStageTimer::take() {
  end_step();
  StageProfile p = profile_;
  profile_ = {};
  return p;
}

void validate_step(const StepInput& s, int64_t num_blocks, int64_t block_size, int64_t vocab_size) {
  const int64_t t = s.num_tokens(), n = s.num_seqs();
  require(t > 0, "step has no tokens");
  require(static_cast<int64_t>(s.positions.size()) == t, "step: positions size != token count");
  require(static_cast<int64_t>(s.slot_mapping.size()) == t,
          "step: slot_mapping size != token count");
  require(static_cast<int64_t>(s.query_start.size()) == n + 1,
          "step: query_start must have num_seqs + 1 entries");
  require(s.query_start.front() == 0 && s.query_start.back() == t,
          "step: query_start must run from 0 to the token count");
  require(s.max_blocks_per_seq > 0 &&
              static_cast<int64_t>(s.block_tables.size()) == n * s.max_blocks_per_seq,
          "step: block_tables must be [num_seqs, max_blocks_per_seq]");
  for (int32_t id : s.token_ids) {
    require_parts(id >= 0 && id < vocab_size, "step: token id ", id, " outside vocabulary of ",
                  vocab_size);
  }
  for (const auto& [i, r] : s.token_feed) {
    require_parts(i >= 0 && i < t && r >= 0, "step: token feed {", i, ", ", r,
                  "} outside the step");
  }
  for (int64_t q = 0; q < n; ++q) {
    const int32_t b = s.query_start[q], e = s.query_start[q + 1], ctx = s.context_lens[q];
    require_parts(b < e, "step: sequence ", q, " has no tokens");
    require_parts(ctx >= e - b && ctx <= s.max_blocks_per_seq * block_size, "step: sequence ", q,
                  " context length ", ctx, " does not fit its block table");
    for (int32_t i = b; i < e; ++i) {
      // New tokens are the last e-b positions of the context, in order.
      require_parts(s.positions[i] == ctx - (e - i), "step: token ", i, " has position ",
                    s.positions[i], " but its sequence's context is ", ctx);
      const int64_t blk = s.block_tables[q * s.max_blocks_per_seq + s.positions[i] / block_size];
      require_parts(blk >= 0 && blk < num_blocks, "step: token ", i, " maps to invalid block ",
                    blk);
      require_parts(s.slot_mapping[i] == blk * block_size + s.positions[i] % block_size,
                    "step: token ", i, " slot ", s.slot_mapping[i],
                    " disagrees with its block table");
    }
    for (int32_t p = 0; p < ctx; p += static_cast<int32_t>(block_size)) {
      const int64_t blk = s.block_tables[q * s.max_blocks_per_seq + p / block_size];
      require_parts(blk >= 0 && blk < num_blocks, "step: sequence ", q,
                    " block table entry invalid");
    }
  }
  for (int32_t r : s.logits_indices) {
    require_parts(r >= 0 && r < t, "step: logits index ", r, " outside the step's tokens");
  }
}

}  // namespace ernie::backend
