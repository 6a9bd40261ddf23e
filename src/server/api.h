// The OpenAI-compatible API as vLLM serves it: request parsing and validation, response and
// stream-chunk shapes, error bodies. Transport-free: the HTTP layer calls these.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/engine.h"
#include "tokenizer/chat.h"
#include "tokenizer/tokenizer.h"

namespace ernie::server {

using ojson = nlohmann::ordered_json;

// An error returned to the client: {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int status = 400;
  std::string message;
  std::optional<std::string> param;
  std::string type() const;
  ojson body() const;
};

// Request defaults from a generation config (vLLM's --generation-config auto): the sampling
// fields a request leaves unset take these; max_tokens also caps what a request asks for.
struct SamplingDefaults {
  std::optional<double> temperature, top_p, min_p, repetition_penalty;
  std::optional<int> top_k;
  std::optional<int64_t> max_tokens;  // the config's max_new_tokens
  ojson to_json() const;              // the fields set, with vLLM's names
  // Sets p's sampling fields (and max_tokens when `with_max_tokens`) to the defaults given.
  void apply(runtime::SamplingParams& p, bool with_max_tokens) const;
};
// vLLM's get_diff_sampling_param: the generation config's values that differ from transformers'
// GenerationConfig defaults (temperature 1, top_k 50, top_p 1, repetition_penalty 1), then
// `overrides` (--override-generation-config) on top whatever their value. Throws Error for a
// field of the wrong type.
SamplingDefaults sampling_defaults(const ojson& generation_config, const ojson& overrides);

// What the API layer needs to know about the served model.
struct ApiContext {
  std::vector<std::string> served_names;  // the first is reported in responses
  std::string model_path;
  int64_t max_model_len = 0;
  int max_logprobs = 20;
  bool prompt_tokens_details = false;  // --enable-prompt-tokens-details: usage's cached tokens
  SamplingDefaults defaults;
  std::shared_ptr<const tokenizer::Tokenizer> tok;
  std::shared_ptr<const tokenizer::ChatTemplate> chat_template;  // may be null
  const runtime::Engine* engine = nullptr;                       // validate_request only
  int64_t created = 0;                                           // unix time of startup
};

// A parsed /v1/completions or /v1/chat/completions request.
struct Job {
  bool chat = false;
  std::string id;     // cmpl-... / chatcmpl-...
  std::string model;  // as echoed in responses
  int64_t created = 0;
  bool stream = false;
  bool include_usage = false;
  bool continuous_usage = false;
  bool echo = false;
  bool echo_only = false;         // completions: echo with max_tokens 0 (one token drawn, unsent)
  bool tokens_as_ids = false;     // return_tokens_as_token_ids: logprobs name tokens "token_id:N"
  bool return_token_ids = false;  // the prompt's and the output's ids beside the text
  int completion_logprobs = -1;   // completions: logprobs=k
  bool chat_logprobs = false;     // chat: logprobs=true
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> prompt_texts;  // for echo
  std::string chat_echo;  // chat echo: the last message's content when it is the assistant's
  runtime::SamplingParams params;
};

Job parse_completion(const ojson& body, const ApiContext& ctx);
Job parse_chat(const ojson& body, const ApiContext& ctx);
// Checks the "model" field against the served names (404 when unknown).
std::string check_model(const ojson& body, const ApiContext& ctx);

// Accumulates engine outputs for one job and renders responses and stream chunks.
class JobResult {
 public:
  JobResult(const Job& job, const ApiContext& ctx);
  // Applies one engine output of prompt `prompt_index`; returns the SSE chunks it produces
  // (empty for non-streaming jobs).
  std::vector<ojson> apply(size_t prompt_index, const runtime::RequestOutput& out);
  // Chunks to send before any output (chat: the assistant role; a completions echo goes out
  // with the first output, as vLLM sends it).
  std::vector<ojson> start_chunks();
  // The final usage chunk (stream_options.include_usage), or null.
  std::optional<ojson> usage_chunk() const;
  ojson response() const;
  bool finished() const;

 private:
  struct Choice {
    std::string text;
    std::vector<int32_t> token_ids;
    std::vector<backend::SampledToken> logprobs;
    std::optional<std::string> finish_reason;
    ojson stop_reason = nullptr;
    // Streaming: a chunk of this choice went out (the first carries the echo and the prompt's
    // ids); outputs held until the prompt logprobs the echo shows arrive; the text offset of
    // the next completions logprobs entry.
    bool started = false;
    std::vector<runtime::CompletionDelta> held;
    size_t stream_offset = 0;
  };
  ojson usage() const;
  ojson chunk_base() const;
  // Chat logprobs of generated tokens.
  ojson chat_logprobs_json(const std::vector<backend::SampledToken>& lps) const;
  // Completions logprobs of the tokens `ids` with their scores (null: none, as for a prompt's
  // first token); text offsets from `offset`, which moves past them.
  ojson completion_logprobs_json(const std::vector<int32_t>& ids,
                                 const std::vector<const backend::SampledToken*>& scores,
                                 size_t& offset) const;
  // Adds prompt `prompt_index`'s tokens and scores (echo with logprobs) to the lists.
  void add_prompt_entries(size_t prompt_index, std::vector<int32_t>& ids,
                          std::vector<const backend::SampledToken*>& scores) const;
  // vLLM's prompt_logprobs field: null for the first token, then {id: {logprob, rank,
  // decoded_token}} with the prompt's own token first; null when the job did not ask.
  ojson prompt_logprobs_json(size_t prompt_index) const;
  // The stream chunk of one output of choice `ci` (none when it has nothing to show).
  std::optional<ojson> stream_chunk(size_t ci, const runtime::CompletionDelta& d);
  std::string token_text(int32_t id) const;
  std::string logprob_token(int32_t id) const;  // token_text, or "token_id:N" when asked

  const Job& job_;
  const ApiContext& ctx_;
  std::vector<Choice> choices_;  // prompt_index * n + index
  int64_t prompt_tokens_ = 0;
  int64_t cached_tokens_ = 0;  // the last prompt's, as vLLM reports them
  // Per prompt, once they arrive (SamplingParams::prompt_logprobs).
  std::vector<std::optional<std::vector<backend::SampledToken>>> prompt_logprobs_;
};

// Responses of the simple endpoints.
ojson models_response(const ApiContext& ctx);
ojson tokenize_response(const ojson& body, const ApiContext& ctx);
ojson detokenize_response(const ojson& body, const ApiContext& ctx);

// Random request ids ("cmpl-" + 32 hex digits).
std::string random_id(const std::string& prefix);

}  // namespace ernie::server
