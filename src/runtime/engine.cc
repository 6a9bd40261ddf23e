#include "runtime/engine.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <span>
#include <thread>

#include "common/check.h"
#include "common/log.h"
#include "model/roofline.h"

namespace ernie::runtime {

int64_t kv_blocks_for_memory(const model::ModelConfig& c, int block_size, int64_t bytes,
                             size_t bytes_per_element) {
  const int64_t per_block = c.num_hidden_layers * 2 * block_size * c.num_key_value_heads *
                            c.head_dim * static_cast<int64_t>(bytes_per_element);
  return bytes / per_block;
}

SchedulingLimits serving_defaults(const backend::DeviceSpec& device) {
  if (device.total_memory <= 0) return {256, 8192};
  std::string name = device.name;
  for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  const bool big = device.total_memory >= (int64_t{70} << 30) && name.find("a100") == name.npos;
  return big ? SchedulingLimits{1024, 8192} : SchedulingLimits{256, 2048};
}

namespace {

// The largest decode batch recorded as a CUDA graph (0: none).
int graph_max_batch(const EngineConfig& cfg) {
  return cfg.enforce_eager || cfg.profile_stages ? 0 : std::min(cfg.max_num_seqs, 512);
}

// Device memory `graphs` decode graphs take once recorded, set aside from the KV cache's budget
// (as vLLM does by default): per graph, a share per layer of its nodes' memory. H100, 21B (28
// layers): 35 graphs took 0.136 GB (3.9 MB each), 51 graphs 0.172 GB (3.4 MB each); 5.25 MB
// are reserved.
int64_t graph_memory_estimate(const model::ModelConfig& c, size_t graphs) {
  constexpr int64_t kBytesPerGraphLayer = 192 << 10;
  return static_cast<int64_t>(graphs) * c.num_hidden_layers * kBytesPerGraphLayer;
}

// Runs the largest step the scheduler can produce (max_num_batched_tokens of prefill, logits
// and sampling for up to max_num_seqs rows) against a temporary cache, so the backend knows its
// activation peak; returns the bytes left for the KV cache after the graphs' estimate.
int64_t profile_kv_budget(model::Ernie45& model, const EngineConfig& cfg, int64_t max_len) {
  auto& be = model.backend();
  const auto& c = model.config();
  const int32_t n = static_cast<int32_t>(
      std::min<int64_t>(cfg.max_num_batched_tokens, std::max<int64_t>(max_len, 1)));
  const int32_t blocks = (n + cfg.block_size - 1) / cfg.block_size;
  be.allocate_kv_cache(static_cast<int>(c.num_hidden_layers), blocks, cfg.block_size);
  backend::StepInput step;
  for (int32_t i = 0; i < n; ++i) {
    step.token_ids.push_back(static_cast<int32_t>(i % c.vocab_size));
    step.positions.push_back(i);
    step.slot_mapping.push_back(i);
  }
  step.query_start = {0, n};
  step.context_lens = {n};
  step.max_blocks_per_seq = blocks;
  for (int32_t b = 0; b < blocks; ++b) step.block_tables.push_back(b);
  const int32_t rows = std::min<int32_t>(n, cfg.max_num_seqs);
  for (int32_t r = n - rows; r < n; ++r) step.logits_indices.push_back(r);
  const backend::Tensor logits = model.forward_logits(step);
  std::vector<backend::SamplingRow> sampling(rows);
  for (auto& r : sampling) {
    r.top_k = 50;
    r.top_p = 0.9f;
    r.num_logprobs = cfg.max_logprobs;
  }
  be.sample(logits, sampling);
  const size_t graphs = model::Ernie45::graph_sizes(graph_max_batch(cfg)).size();
  return be.kv_memory_budget(cfg.gpu_memory_utilization, graph_memory_estimate(c, graphs),
                             cat(graphs, " CUDA graphs"));
}

}  // namespace

Engine::Engine(model::Ernie45& model, std::shared_ptr<const tokenizer::Tokenizer> tok,
               EngineConfig cfg)
    : model_(model),
      tok_(std::move(tok)),
      cfg_(cfg),
      max_model_len_(cfg.max_model_len > 0 ? cfg.max_model_len
                                           : model.config().max_position_embeddings),
      kv_([&] {
        const auto& c = model.config();
        require(cfg.block_size > 0 && cfg.block_size <= 1024,
                cat("block size must be in [1, 1024], got ", cfg.block_size));
        int64_t blocks = cfg.num_blocks_override;
        if (blocks <= 0) {
          int64_t budget = cfg.kv_cache_memory;
          if (model.backend().sizes_kv_from_device_memory() && cfg.gpu_memory_utilization > 0) {
            require(
                cfg.gpu_memory_utilization <= 1.0,
                cat("gpu_memory_utilization must be in (0, 1], got ", cfg.gpu_memory_utilization));
            budget = profile_kv_budget(model, cfg, max_model_len_);
          }
          blocks = kv_blocks_for_memory(c, cfg.block_size, budget,
                                        dtype_size(model.backend().kv_dtype()));
          // More than every sequence at full length is never used.
          const int64_t useful = static_cast<int64_t>(cfg.max_num_seqs) *
                                 ((max_model_len_ + cfg.block_size - 1) / cfg.block_size);
          blocks = std::min(blocks, useful);
        }
        require(blocks > 0, "no memory for the KV cache: raise the KV cache budget");
        return KvCacheManager(blocks, cfg.block_size, cfg.enable_prefix_caching);
      }()),
      sched_({cfg.max_num_seqs, cfg.max_num_batched_tokens, max_model_len_}, kv_),
      seed_rng_(cfg.seed) {
  const auto& c = model.config();
  require(cfg.max_num_seqs > 0, "max_num_seqs must be positive");
  require(cfg.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive");
  require(max_model_len_ <= c.max_position_embeddings,
          cat("max_model_len ", max_model_len_,
              " is larger than the model's max_position_embeddings ", c.max_position_embeddings));
  if (kv_capacity_tokens() < max_model_len_) {
    throw Error(
        cat("The model's max seq len (", max_model_len_,
            ") is larger than the maximum number of tokens that can be stored in KV cache (",
            kv_capacity_tokens(),
            "). Try increasing the KV cache memory or decreasing max_model_len."));
  }
  model.backend().allocate_kv_cache(static_cast<int>(c.num_hidden_layers), kv_.num_blocks(),
                                    cfg.block_size);
  model.backend().enable_profile(cfg.profile_stages);
  async_ = cfg.async_scheduling && !cfg.profile_stages;  // stages are timed one step at a time
  if (cfg.profile_stages && !cfg.enforce_eager) {
    log::info("stage profiling: CUDA graphs are off (every op is timed on its own)");
  }
  {  // graphs recorded for an earlier engine on this model are dropped either way
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t held_before = model.backend().device_memory_in_use();
    const int graphs = model.enable_graphs(
        graph_max_batch(cfg),
        static_cast<int>((max_model_len_ + cfg.block_size - 1) / cfg.block_size));
    if (graphs > 0) {
      log::info(
          "Captured ", graphs, " CUDA graphs for decode batches up to ", graph_max_batch(cfg),
          " in ", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
          " s",
          held_before >= 0
              ? cat(", took ", (model.backend().device_memory_in_use() - held_before) / 1e9, " GB")
              : std::string());
    }
  }
  for (int64_t id : c.eos_token_ids) eos_ids_.push_back(static_cast<int32_t>(id));
  if (tok_) {
    for (int32_t id : tok_->eos_token_ids()) {
      if (std::find(eos_ids_.begin(), eos_ids_.end(), id) == eos_ids_.end()) eos_ids_.push_back(id);
    }
  }
}

Engine::~Engine() = default;

void Engine::validate_request(const std::vector<int32_t>& prompt,
                              const SamplingParams& params) const {
  params.validate(cfg_.max_logprobs);
  if (prompt.empty()) throw ParamError("prompt", "The prompt cannot be empty.");
  const int64_t vocab = model_.config().vocab_size;
  if (params.prompt_logprobs == -1 && vocab > cfg_.max_logprobs) {
    throw ParamError("prompt_logprobs",
                     cat("Requested prompt logprobs of ", vocab,
                         ", which is greater than max allowed: ", cfg_.max_logprobs));
  }
  for (int32_t t : prompt) {
    if (t < 0 || t >= vocab)
      throw ParamError("prompt", cat("Token id ", t, " is out of vocabulary (size ", vocab, ")."));
  }
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  if (n_prompt >= max_model_len_) {
    throw ParamError("prompt",
                     cat("This model's maximum context length is ", max_model_len_,
                         " tokens. However, your request has ", n_prompt,
                         " input tokens. Please reduce the length of the input messages."));
  }
  if (n_prompt + params.max_tokens > max_model_len_) {
    throw ParamError(
        "max_tokens",
        cat("This model's maximum context length is ", max_model_len_,
            " tokens. However, you requested ", n_prompt + params.max_tokens, " tokens (", n_prompt,
            " in the messages, ", params.max_tokens,
            " in the completion). Please reduce the length of the messages or completion."));
  }
}

void Engine::add_request(const std::string& id, std::vector<int32_t> prompt,
                         SamplingParams params) {
  if (requests_.count(id)) throw Error(cat("request id '", id, "' is already in use"));
  validate_request(prompt, params);
  auto req = std::make_unique<Request>();
  req->id = id;
  req->prompt = std::make_shared<const std::vector<int32_t>>(std::move(prompt));
  if (params.prompt_logprobs == -1)
    params.prompt_logprobs = static_cast<int>(model_.config().vocab_size);
  req->params = std::make_shared<const SamplingParams>(std::move(params));
  for (int i = 0; i < req->params->n; ++i) {
    auto s = std::make_unique<Sequence>();
    s->request_id = id;
    s->index = i;
    s->arrival = next_arrival_++;
    s->prompt = req->prompt;
    s->params = req->params;
    s->seed = req->params->seed ? *req->params->seed + static_cast<uint64_t>(i) : seed_rng_();
    s->tokens = *req->prompt;
    s->scores_prompt = i == 0 && req->params->prompt_logprobs.has_value();
    if (tok_)
      s->detok = std::make_unique<tokenizer::IncrementalDetokenizer>(
          tok_, req->params->skip_special_tokens);
    sched_.add(s.get());
    req->seqs.push_back(std::move(s));
  }
  prompt_tokens_ += static_cast<int64_t>(req->prompt->size()) * req->params->n;
  requests_[id] = std::move(req);
}

void Engine::abort_request(const std::string& id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  for (auto& s : it->second->seqs) {
    if (!s->finished()) finish_seq(*s, FinishReason::kAbort);
  }
  aborted_.push_back(id);
}

void Engine::finish_seq(Sequence& s, FinishReason why) {
  if (s.finished()) return;
  s.finish = why;
  if (s.detok && why != FinishReason::kAbort && !s.stop_string) s.text += s.detok->finish();
  sched_.remove(&s);
}

backend::SamplingRow Engine::sampling_row(const Sequence& s) const {
  const SamplingParams& p = *s.params;
  backend::SamplingRow r;
  r.temperature = p.temperature;
  // A greedy row's argmax survives top-k, top-p and min-p: left out, the row stays on the
  // backends' greedy paths (a model's generation config may set top_p for every request).
  const bool greedy = p.temperature < 1e-5f;
  r.top_p = greedy ? 1.0f : p.top_p;
  r.top_k = greedy ? 0 : p.top_k;
  r.min_p = greedy ? 0.0f : p.min_p;
  r.presence_penalty = p.presence_penalty;
  r.frequency_penalty = p.frequency_penalty;
  r.repetition_penalty = p.repetition_penalty;
  if (!p.logit_bias.empty()) r.logit_bias = &p.logit_bias;
  r.prompt_tokens = s.prompt.get();
  r.output_tokens = &s.output;
  if (static_cast<int>(s.output.size()) < p.min_tokens) {
    if (!p.ignore_eos) r.banned = eos_ids_;
    r.banned.insert(r.banned.end(), p.stop_token_ids.begin(), p.stop_token_ids.end());
  }
  r.seed = s.seed;
  r.position = static_cast<int64_t>(s.output.size());
  r.num_logprobs = p.logprobs ? *p.logprobs : -1;
  return r;
}

void Engine::append_token(Sequence& s, const backend::SampledToken& t) {
  const SamplingParams& p = *s.params;
  s.output.push_back(t.id);
  if (s.pending_at >= 0) {  // the placeholder the next step was scheduled with
    s.tokens[static_cast<size_t>(s.pending_at)] = t.id;
    s.pending_at = -1;
  } else {
    s.tokens.push_back(t.id);
  }
  ++generation_tokens_;
  if (p.logprobs) s.logprobs.push_back(t);
  const size_t text_before = s.text.size();
  if (s.detok) s.text += s.detok->add(t.id);
  const bool may_stop = static_cast<int>(s.output.size()) >= p.min_tokens;
  if (may_stop) {
    if (!p.ignore_eos && std::find(eos_ids_.begin(), eos_ids_.end(), t.id) != eos_ids_.end()) {
      finish_seq(s, FinishReason::kStop);
      return;
    }
    if (std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), t.id) !=
        p.stop_token_ids.end()) {
      s.stop_token = t.id;
      finish_seq(s, FinishReason::kStop);
      return;
    }
    // Stop strings, matched across token boundaries: search the text that could contain a
    // match ending in the new piece; the earliest match wins.
    size_t best = std::string::npos;
    const std::string* hit = nullptr;
    for (const auto& stop : p.stop) {
      const size_t from = text_before >= stop.size() ? text_before - stop.size() + 1 : 0;
      const size_t pos = s.text.find(stop, from);
      if (pos != std::string::npos && pos < best) {
        best = pos;
        hit = &stop;
      }
    }
    if (hit) {
      s.text.resize(p.include_stop_str_in_output ? best + hit->size() : best);
      s.stop_string = *hit;
      finish_seq(s, FinishReason::kStop);
      return;
    }
  }
  if (static_cast<int>(s.output.size()) >= p.max_tokens || s.num_tokens() >= max_model_len_) {
    finish_seq(s, FinishReason::kLength);
  }
}

CompletionDelta Engine::take_delta(Sequence& s) {
  CompletionDelta d;
  d.index = s.index;
  d.token_ids.assign(s.output.begin() + static_cast<long>(s.tokens_sent), s.output.end());
  if (s.params->logprobs) {
    d.logprobs.assign(s.logprobs.begin() + static_cast<long>(s.tokens_sent), s.logprobs.end());
  }
  s.tokens_sent = s.output.size();
  size_t end = s.text.size();
  if (!s.finished() && !s.params->stop.empty()) {
    // Hold back text that could be the start of a stop string, on a character boundary.
    size_t hold = 0;
    for (const auto& stop : s.params->stop) hold = std::max(hold, stop.size() - 1);
    end = end > hold ? end - hold : 0;
    while (end > s.text_sent && end < s.text.size() &&
           (static_cast<unsigned char>(s.text[end]) & 0xc0) == 0x80)
      --end;
  }
  if (end > s.text_sent) {
    d.text = s.text.substr(s.text_sent, end - s.text_sent);
    s.text_sent = end;
  }
  if (s.finished()) {
    d.finish_reason = finish_reason_name(s.finish);
    if (s.stop_string)
      d.stop_reason = *s.stop_string;
    else if (s.stop_token)
      d.stop_reason = *s.stop_token;
  }
  d.num_output_tokens = static_cast<int64_t>(s.output.size());
  return d;
}

double Engine::take_in_flight(std::vector<Sequence*>& touched) {
  if (!in_flight_) return 0.0;
  const InFlight f = std::move(*in_flight_);
  in_flight_.reset();
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<backend::SampledToken> tokens = model_.backend().finish_sample();
  const double wait_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  check(tokens.size() == f.sampled.size(), "one token per sampled sequence");
  for (size_t i = 0; i < f.sampled.size(); ++i) {
    const InFlightRow& row = f.sampled[i];
    auto it = requests_.find(row.request_id);
    if (it == requests_.end()) continue;  // aborted or ended while the step ran
    Sequence& s = *it->second->seqs[static_cast<size_t>(row.index)];
    if (s.arrival != row.arrival) continue;  // a later request under the same id
    if (s.finished()) continue;              // stopped on the step before: this row was a spare
    append_token(s, tokens[i]);
    touched.push_back(&s);
  }
  return wait_ms;
}

std::vector<RequestOutput> Engine::step() {
  using Clock = std::chrono::steady_clock;
  auto ms = [](auto d) { return std::chrono::duration<double, std::milli>(d).count(); };
  const auto t_start = Clock::now();
  std::vector<RequestOutput> outputs;
  // Aborted requests are reported once, then forgotten.
  for (const auto& id : aborted_) {
    auto it = requests_.find(id);
    if (it == requests_.end()) continue;
    RequestOutput o;
    o.request_id = id;
    o.num_prompt_tokens = static_cast<int64_t>(it->second->prompt->size());
    o.finished = true;
    for (auto& s : it->second->seqs) o.outputs.push_back(take_delta(*s));
    outputs.push_back(std::move(o));
    requests_.erase(it);
  }
  aborted_.clear();

  // Sequences whose tokens this call takes: the step in flight's (asynchronous scheduling),
  // else this step's.
  std::vector<Sequence*> touched;
  const SchedulerOutput plan = sched_.schedule();
  backend::StepInput step;
  std::vector<Sequence*> sampled;
  double device_ms = 0.0;  // queueing the forward pass and the sampling, waiting for tokens
  auto t_forward = Clock::now();
  if (plan.seqs.empty()) {
    device_ms += take_in_flight(touched);  // sequences that wait only for their last token
  } else {
    ++steps_;
    int max_blocks = 1;
    for (const auto& sc : plan.seqs)
      max_blocks = std::max<int>(max_blocks, static_cast<int>(sc.seq->table.blocks.size()));
    step.max_blocks_per_seq = max_blocks;
    const int bs = cfg_.block_size;
    const size_t n_seqs = plan.seqs.size(), n_tokens = static_cast<size_t>(plan.num_tokens);
    step.token_ids.reserve(n_tokens);
    step.positions.reserve(n_tokens);
    step.slot_mapping.reserve(n_tokens);
    step.query_start.reserve(n_seqs + 1);
    step.context_lens.reserve(n_seqs);
    step.block_tables.reserve(n_seqs * static_cast<size_t>(max_blocks));
    step.logits_indices.reserve(n_seqs + static_cast<size_t>(plan.num_prompt_rows));
    // Rows for prompt logprobs follow the sampled rows.
    std::vector<int32_t> prompt_rows;
    std::vector<std::pair<Sequence*, Sequence::LogitRows>> scored;
    for (const auto& sc : plan.seqs) {
      Sequence& s = *sc.seq;
      for (int64_t p = 0; p < sc.prompt_rows.count; ++p) {
        prompt_rows.push_back(
            static_cast<int32_t>(step.num_tokens() + sc.prompt_rows.first - sc.start + p));
      }
      if (sc.prompt_rows.count > 0) scored.push_back({&s, sc.prompt_rows});
      step.query_start.push_back(step.num_tokens());
      for (int64_t pos = sc.start; pos < sc.start + sc.num_tokens; ++pos) {
        if (pos == s.pending_at) step.token_feed.push_back({step.num_tokens(), s.pending_row});
        step.token_ids.push_back(s.tokens[pos]);
        step.positions.push_back(static_cast<int32_t>(pos));
        step.slot_mapping.push_back(static_cast<int64_t>(s.table.blocks[pos / bs]) * bs + pos % bs);
      }
      step.context_lens.push_back(static_cast<int32_t>(sc.start + sc.num_tokens));
      const auto& blocks = s.table.blocks;  // then -1 to the table's width
      step.block_tables.insert(step.block_tables.end(), blocks.begin(), blocks.end());
      step.block_tables.insert(step.block_tables.end(), max_blocks - blocks.size(), -1);
      if (sc.samples) {
        step.logits_indices.push_back(step.num_tokens() - 1);
        sampled.push_back(&s);
      }
    }
    step.query_start.push_back(step.num_tokens());
    step.logits_indices.insert(step.logits_indices.end(), prompt_rows.begin(), prompt_rows.end());
    t_forward = Clock::now();
    const backend::Tensor logits = model_.forward_logits(step);
    device_ms += ms(Clock::now() - t_forward);
    // The step before's tokens (asynchronous scheduling), while the device runs this one: the
    // rows below then see every token up to this step's.
    device_ms += take_in_flight(touched);
    if (!sampled.empty()) {
      std::vector<backend::SamplingRow> rows;
      rows.reserve(sampled.size());
      for (Sequence* s : sampled) rows.push_back(sampling_row(*s));
      const auto t_sample = Clock::now();
      const backend::Tensor sampled_logits{
          logits.data, logits.dtype, {static_cast<int64_t>(sampled.size()), logits.dim(1)}};
      model_.backend().sample_async(sampled_logits, rows);
      device_ms += ms(Clock::now() - t_sample);
    }
    if (!scored.empty()) score_prompts(logits, static_cast<int64_t>(sampled.size()), scored);
    sched_.update(plan);
    if (!sampled.empty()) {
      InFlight f;
      for (Sequence* s : sampled) f.sampled.push_back({s->request_id, s->index, s->arrival});
      in_flight_ = std::move(f);
    }
    if (async_ && in_flight_) {
      // The next step computes each sampled token's KV before its id is on the host: a
      // placeholder stands in, filled in by the device (token feed) and then by
      // take_in_flight.
      for (size_t i = 0; i < sampled.size(); ++i) {
        Sequence& s = *sampled[i];
        if (s.finished()) continue;
        s.pending_at = s.num_tokens();
        s.pending_row = static_cast<int>(i);
        s.tokens.push_back(0);
        s.await_final = static_cast<int>(s.output.size()) + 1 >= s.params->max_tokens ||
                        s.num_tokens() >= max_model_len_;
      }
    } else {
      device_ms += take_in_flight(touched);
    }
  }

  // Report every request that produced something.
  std::map<std::string, RequestOutput> by_request;
  for (Sequence* s : touched) {
    Request& r = *requests_.at(s->request_id);
    RequestOutput& o = by_request[r.id];
    o.request_id = r.id;
    o.num_prompt_tokens = static_cast<int64_t>(r.prompt->size());
    o.num_cached_tokens = std::max<int64_t>(0, r.seqs[0]->cached_prompt_tokens);
    o.outputs.push_back(take_delta(*s));
    if (s->scores_prompt && !s->prompt_logprobs_sent && !s->needs_prompt_logprobs()) {
      o.prompt_logprobs = s->prompt_logprobs;
      s->prompt_logprobs_sent = true;
    }
  }
  for (auto& [id, o] : by_request) {
    auto it = requests_.find(id);
    o.finished = std::all_of(it->second->seqs.begin(), it->second->seqs.end(),
                             [](const auto& s) { return s->finished(); });
    if (o.finished) requests_.erase(it);
    outputs.push_back(std::move(o));
  }
  const auto t_end = Clock::now();
  step_build_ms_ += ms(t_forward - t_start);
  step_device_ms_ += device_ms;
  step_output_ms_ += ms(t_end - t_forward) - device_ms;
  if (cfg_.profile_stages && !plan.seqs.empty()) {
    const model::StepCost cost = model::step_cost(model_.config(), step);
    for (size_t i = 0; i < cost.size(); ++i) {
      host_profile_.bytes[i] += cost[i].bytes;
      host_profile_.flops[i] += cost[i].flops;
    }
    host_profile_.ms[static_cast<int>(backend::Stage::kHostSchedule)] += ms(t_forward - t_start);
    host_profile_.ms[static_cast<int>(backend::Stage::kHostOutput)] +=
        ms(t_end - t_forward) - device_ms;
  }
  return outputs;
}

void Engine::score_prompts(const backend::Tensor& logits, int64_t first_row,
                           const std::vector<std::pair<Sequence*, Sequence::LogitRows>>& rows) {
  const int64_t vocab = logits.dim(1);
  std::vector<int32_t> targets;
  std::vector<int> ks;
  for (const auto& [s, r] : rows) {
    check(r.first == static_cast<int64_t>(s->prompt_logprobs.size()),
          "prompt logprobs are computed in order");
    for (int64_t p = r.first; p < r.first + r.count; ++p) {
      targets.push_back((*s->prompt)[static_cast<size_t>(p + 1)]);
      ks.push_back(*s->params->prompt_logprobs);
    }
  }
  const int64_t n = static_cast<int64_t>(targets.size());
  std::vector<float> host(static_cast<size_t>(n * vocab));
  model_.backend().to_host(
      backend::Tensor{
          static_cast<float*>(logits.data) + first_row * vocab, logits.dtype, {n, vocab}},
      host.data());
  // A row takes ~0.5 ms on one core at the 21B's vocabulary (103,424): rows over a few threads.
  std::vector<backend::SampledToken> scores(static_cast<size_t>(n));
  const int64_t threads = std::clamp<int64_t>(
      std::min<int64_t>(std::thread::hardware_concurrency(), 8), 1, (n + 15) / 16);
  auto work = [&](int64_t w) {
    for (int64_t i = w; i < n; i += threads) {
      scores[static_cast<size_t>(i)] = backend::score_token(
          std::span<const float>(host.data() + i * vocab, static_cast<size_t>(vocab)),
          targets[static_cast<size_t>(i)], ks[static_cast<size_t>(i)]);
    }
  };
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < threads; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  size_t i = 0;
  for (const auto& [s, r] : rows) {
    for (int64_t c = 0; c < r.count; ++c) s->prompt_logprobs.push_back(std::move(scores[i++]));
  }
}

backend::StageProfile Engine::take_stage_profile() {
  backend::StageProfile p = model_.backend().take_profile();
  for (int s = 0; s < static_cast<int>(backend::Stage::kCount); ++s) {
    p.ms[s] += host_profile_.ms[s];
    p.bytes[s] += host_profile_.bytes[s];
    p.flops[s] += host_profile_.flops[s];
  }
  host_profile_ = {};
  return p;
}

EngineStats Engine::stats() const {
  EngineStats st;
  st.running = sched_.num_running();
  st.waiting = sched_.num_waiting();
  st.kv_usage = kv_.pool().usage();
  st.prefix_queries = kv_.queries();
  st.prefix_hits = kv_.hits();
  st.prompt_tokens = prompt_tokens_;
  st.generation_tokens = generation_tokens_;
  st.preemptions = sched_.num_preemptions();
  st.steps = steps_;
  st.step_build_ms = step_build_ms_;
  st.step_device_ms = step_device_ms_;
  st.step_output_ms = step_output_ms_;
  return st;
}

std::vector<std::vector<GenerateResult>> generate(Engine& engine,
                                                  const std::vector<std::vector<int32_t>>& prompts,
                                                  const std::vector<SamplingParams>& params) {
  require(prompts.size() == params.size(), "one SamplingParams per prompt");
  std::vector<std::vector<GenerateResult>> results(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    results[i].resize(params[i].n);
    engine.add_request(std::to_string(i), prompts[i], params[i]);
  }
  while (engine.has_unfinished()) {
    for (auto& out : engine.step()) {
      auto& rs = results[std::stoul(out.request_id)];
      for (auto& d : out.outputs) {
        GenerateResult& g = rs[d.index];
        g.tokens.insert(g.tokens.end(), d.token_ids.begin(), d.token_ids.end());
        g.text += d.text;
        g.logprobs.insert(g.logprobs.end(), d.logprobs.begin(), d.logprobs.end());
        if (d.finish_reason) g.finish_reason = *d.finish_reason;
      }
      if (out.prompt_logprobs) rs[0].prompt_logprobs = std::move(*out.prompt_logprobs);
    }
  }
  return results;
}

}  // namespace ernie::runtime
