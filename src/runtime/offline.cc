#include "runtime/offline.h"

#include <algorithm>
#include <span>

#include "common/check.h"

namespace ernie::runtime {

std::vector<GenerateResult> generate(model::Ernie45& model, backend::Backend& be,
                                     const std::vector<GenerateRequest>& requests,
                                     const OfflineOptions& opts) {
  const auto& cfg = model.config();
  require(opts.block_size > 0, "block size must be positive");
  require(opts.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive");
  const int n = static_cast<int>(requests.size());
  struct Seq {
    std::vector<int32_t> tokens;  // prompt + generated
    int32_t computed = 0;         // tokens whose KV is in the cache
    std::vector<int32_t> blocks;
    Rng rng{0};
    bool done = false;
  };
  std::vector<Seq> seqs(n);
  std::vector<GenerateResult> results(n);
  int64_t next_block = 0;
  int max_blocks = 1;
  for (int i = 0; i < n; ++i) {
    const auto& r = requests[i];
    require(!r.prompt.empty(), cat("prompt ", i, " is empty"));
    require(r.max_tokens >= 1, cat("prompt ", i, ": max_tokens must be at least 1"));
    for (int32_t id : r.prompt) {
      require(id >= 0 && id < cfg.vocab_size,
              cat("prompt ", i, ": token id ", id, " outside the vocabulary [0, ", cfg.vocab_size,
                  ")"));
    }
    const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
    require(total <= cfg.max_position_embeddings,
            cat("prompt ", i, ": ", r.prompt.size(), " prompt tokens + ", r.max_tokens,
                " max tokens exceed the model's ", cfg.max_position_embeddings, " positions"));
    const int nb = static_cast<int>((total + opts.block_size - 1) / opts.block_size);
    // Hand blocks out in reverse so block ids never equal logical order (catches table bugs).
    for (int b = 0; b < nb; ++b)
      seqs[i].blocks.push_back(static_cast<int32_t>(next_block + nb - 1 - b));
    next_block += nb;
    max_blocks = std::max(max_blocks, nb);
    seqs[i].tokens = r.prompt;
    seqs[i].rng = Rng(r.seed, "sampling");
  }
  be.allocate_kv_cache(static_cast<int>(cfg.num_hidden_layers), std::max<int64_t>(next_block, 1),
                       opts.block_size);

  while (true) {
    backend::StepInput step;
    step.max_blocks_per_seq = max_blocks;
    std::vector<int> step_seqs;
    std::vector<bool> wants_logits;
    int budget = opts.max_num_batched_tokens;
    // Decodes first, then prefill chunks, like vLLM's scheduler.
    for (int pass = 0; pass < 2; ++pass) {
      for (int i = 0; i < n && budget > 0; ++i) {
        Seq& s = seqs[i];
        if (s.done) continue;
        const int32_t pending = static_cast<int32_t>(s.tokens.size()) - s.computed;
        const bool decoding = s.computed >= static_cast<int32_t>(requests[i].prompt.size());
        if ((pass == 0) != decoding) continue;
        const int32_t take = std::min<int32_t>(pending, budget);
        budget -= take;
        step.query_start.push_back(step.num_tokens());
        for (int32_t k = 0; k < take; ++k) {
          const int32_t pos = s.computed + k;
          step.token_ids.push_back(s.tokens[pos]);
          step.positions.push_back(pos);
          step.slot_mapping.push_back(static_cast<int64_t>(s.blocks[pos / opts.block_size]) *
                                          opts.block_size +
                                      pos % opts.block_size);
        }
        s.computed += take;
        step.context_lens.push_back(s.computed);
        for (int b = 0; b < max_blocks; ++b) {
          step.block_tables.push_back(b < static_cast<int>(s.blocks.size()) ? s.blocks[b] : -1);
        }
        const bool last = s.computed == static_cast<int32_t>(s.tokens.size());
        if (last) step.logits_indices.push_back(step.num_tokens() - 1);
        step_seqs.push_back(i);
        wants_logits.push_back(last);
      }
    }
    if (step_seqs.empty()) break;
    step.query_start.push_back(step.num_tokens());
    const std::vector<float> logits = model.forward(step);
    size_t row = 0;
    for (size_t j = 0; j < step_seqs.size(); ++j) {
      if (!wants_logits[j]) continue;
      const int i = step_seqs[j];
      const auto& r = requests[i];
      std::span<const float> lg(logits.data() + row * cfg.vocab_size, cfg.vocab_size);
      ++row;
      const int32_t tok = sample(lg, r.temperature, seqs[i].rng);
      results[i].tokens.push_back(tok);
      if (r.logprobs > 0) results[i].logprobs.push_back(top_logprobs(lg, r.logprobs));
      seqs[i].tokens.push_back(tok);
      const bool eos =
          (!r.ignore_eos && std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), tok) !=
                                cfg.eos_token_ids.end()) ||
          std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), tok) !=
              r.stop_token_ids.end();
      if (eos || static_cast<int>(results[i].tokens.size()) >= r.max_tokens) {
        seqs[i].done = true;
        results[i].finish_reason = eos ? "stop" : "length";
      }
    }
  }
  return results;
}

}  // namespace ernie::runtime
