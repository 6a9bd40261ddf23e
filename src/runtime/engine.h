// The engine: requests in, tokens and text out, one step at a time. It owns the scheduler and
// the KV cache bookkeeping and drives the model through the step interface; the caller owns the
// loop (the server runs it on one engine thread). No CUDA headers.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <variant>
#include <vector>

#include "model/ernie45.h"
#include "runtime/kv_cache.h"
#include "runtime/request.h"
#include "runtime/sampling_params.h"
#include "runtime/scheduler.h"
#include "tokenizer/tokenizer.h"

namespace ernie::runtime {

struct EngineConfig {
  int block_size = 16;
  int max_num_seqs = 256;
  int max_num_batched_tokens = 8192;
  int64_t max_model_len = 0;  // 0: the model's max_position_embeddings
  bool enable_prefix_caching = true;
  int64_t num_blocks_override = 0;      // --num-gpu-blocks-override
  int64_t kv_cache_memory = 1ll << 30;  // bytes for the KV cache when no override is given
  // Device backends: the KV cache takes what is left of this fraction of the device's memory
  // after the weights and a measured worst-case step (--gpu-memory-utilization); 0: use
  // kv_cache_memory on every backend.
  double gpu_memory_utilization = 0.9;
  int max_logprobs = 20;
  bool enforce_eager = false;   // no CUDA graphs for decode steps
  bool profile_stages = false;  // time every step's stages (implies no graphs, no async)
  // Asynchronous scheduling (on by default as in vLLM; --no-async-scheduling turns it off):
  // each step is scheduled and launched before the last step's tokens reach the host; those
  // reach the device through the step's token feed, and the host's work on them runs while
  // the device computes.
  bool async_scheduling = true;
  uint64_t seed = 0;  // seeds requests that do not set their own
};

// Sequences and tokens per step a server starts with when the command line does not set them:
// vLLM's serving defaults for the device. GPUs of 70 GiB or more other than the A100 (H100,
// H200): 1024 sequences and 8192 tokens; smaller GPUs: 256 and 2048. On the host (no device
// memory) ernie keeps 256 and 8192.
struct SchedulingLimits {
  int max_num_seqs = 256;
  int max_num_batched_tokens = 8192;
};
SchedulingLimits serving_defaults(const backend::DeviceSpec& device);

// What one of a request's n outputs produced since the last step.
struct CompletionDelta {
  int index = 0;
  std::vector<int32_t> token_ids;  // new ids
  std::string text;                // new text (held back while it may start a stop string)
  std::vector<backend::SampledToken> logprobs;  // per new id, when asked for
  std::optional<std::string> finish_reason;     // "stop", "length", "abort"
  std::variant<std::monostate, std::string, int32_t> stop_reason;
  int64_t num_output_tokens = 0;  // so far
};

struct RequestOutput {
  std::string request_id;
  std::vector<CompletionDelta> outputs;
  // Once, with the first output of a request that asked for them (SamplingParams::
  // prompt_logprobs): entry p is prompt token p + 1's logprob, rank and top logprobs.
  std::optional<std::vector<backend::SampledToken>> prompt_logprobs;
  int64_t num_prompt_tokens = 0;
  int64_t num_cached_tokens = 0;  // the prompt's tokens found in the prefix cache
  bool finished = false;          // every output finished
};

struct EngineStats {
  size_t running = 0, waiting = 0;
  double kv_usage = 0.0;
  int64_t prefix_queries = 0, prefix_hits = 0;
  int64_t prompt_tokens = 0, generation_tokens = 0;
  int64_t preemptions = 0;
  int64_t steps = 0;
  // Wall time of the steps so far, summed (ms): building the step on the host before the
  // forward pass, the forward pass and sampling (the host waits for the device's tokens), and
  // the host's work on the tokens after (stop checks, text, outputs). The GPU idles through
  // the first and the last.
  double step_build_ms = 0.0, step_device_ms = 0.0, step_output_ms = 0.0;
};

class Engine {
 public:
  // `tok` may be null (token ids only: no text, no stop strings).
  Engine(model::Ernie45& model, std::shared_ptr<const tokenizer::Tokenizer> tok, EngineConfig cfg);
  ~Engine();

  const EngineConfig& config() const { return cfg_; }
  int64_t max_model_len() const { return max_model_len_; }
  int64_t num_kv_blocks() const { return kv_.num_blocks(); }
  // Tokens the KV cache holds.
  int64_t kv_capacity_tokens() const { return kv_.num_blocks() * cfg_.block_size; }

  // The checks add_request makes before any work (parameters, vocabulary, context length);
  // reads only immutable configuration, so any thread may call it. Throws ParamError.
  void validate_request(const std::vector<int32_t>& prompt, const SamplingParams& params) const;
  // Validates and queues a request. Throws ParamError (bad parameter) or Error (prompt too
  // long, duplicate id) before doing any work.
  void add_request(const std::string& id, std::vector<int32_t> prompt, SamplingParams params);
  // Ends a request (client gone): its blocks are freed; the next step reports finish "abort".
  void abort_request(const std::string& id);
  // Runs one step (nothing when idle) and returns what changed.
  std::vector<RequestOutput> step();
  bool has_unfinished() const { return !requests_.empty() || in_flight_.has_value(); }
  EngineStats stats() const;
  // The stage profile since the last call (profile_stages), and resets it.
  // Host stages (scheduling, outputs) are the engine's own; the rest come from the backend.
  backend::StageProfile take_stage_profile();
  bool profiling() const { return cfg_.profile_stages; }

 private:
  struct Request {
    std::string id;
    std::shared_ptr<const std::vector<int32_t>> prompt;
    std::shared_ptr<const SamplingParams> params;
    std::vector<std::unique_ptr<Sequence>> seqs;
  };
  // The step whose tokens have not been taken yet (asynchronous scheduling): its sampled
  // sequences, by request id and index (a request may end while the step runs).
  struct InFlightRow {
    std::string request_id;
    int index = 0;
    uint64_t arrival = 0;  // tells the sequence from a later one under a reused id
  };
  struct InFlight {
    std::vector<InFlightRow> sampled;
  };
  // Takes the in-flight step's tokens into its sequences; adds those sequences to `touched`.
  // Returns the ms spent waiting for the device's tokens.
  double take_in_flight(std::vector<Sequence*>& touched);
  void finish_seq(Sequence& s, FinishReason why);
  void append_token(Sequence& s, const backend::SampledToken& t);
  CompletionDelta take_delta(Sequence& s);
  backend::SamplingRow sampling_row(const Sequence& s) const;
  // Prompt logprobs from this step's logits rows [first_row, ...), in the order of `rows`.
  void score_prompts(const backend::Tensor& logits, int64_t first_row,
                     const std::vector<std::pair<Sequence*, Sequence::LogitRows>>& rows);

  model::Ernie45& model_;
  std::shared_ptr<const tokenizer::Tokenizer> tok_;
  EngineConfig cfg_;
  int64_t max_model_len_ = 0;
  KvCacheManager kv_;
  Scheduler sched_;
  std::map<std::string, std::unique_ptr<Request>> requests_;
  std::vector<int32_t> eos_ids_;
  uint64_t next_arrival_ = 0;
  std::mt19937_64 seed_rng_;
  int64_t prompt_tokens_ = 0, generation_tokens_ = 0, steps_ = 0;
  double step_build_ms_ = 0.0, step_device_ms_ = 0.0, step_output_ms_ = 0.0;
  backend::StageProfile host_profile_;  // profile_stages: the engine's host time per stage
  std::vector<std::string> aborted_;    // reported by the next step
  std::optional<InFlight> in_flight_;
  bool async_ = false;  // cfg_.async_scheduling, unless profiling
};

// Runs prompts to completion through an engine (offline generation, tests).
struct GenerateResult {
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<backend::SampledToken> logprobs;
  std::vector<backend::SampledToken> prompt_logprobs;  // first output only: prompt tokens 1..
  std::string finish_reason;
};
std::vector<std::vector<GenerateResult>> generate(Engine& engine,
                                                  const std::vector<std::vector<int32_t>>& prompts,
                                                  const std::vector<SamplingParams>& params);

// KV blocks that fit in `bytes` for this model on this backend's cache layout.
int64_t kv_blocks_for_memory(const model::ModelConfig& c, int block_size, int64_t bytes,
                             size_t bytes_per_element);

}  // namespace ernie::runtime
