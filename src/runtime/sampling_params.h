// Per-request generation settings, with vLLM's names, defaults and validation.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/check.h"

namespace ernie::runtime {

struct SamplingParams {
  int n = 1;
  float temperature = 1.0f;
  float top_p = 1.0f;
  int top_k = 0;  // 0 or -1: off
  float min_p = 0.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  std::optional<uint64_t> seed;
  std::vector<std::pair<int32_t, float>> logit_bias;
  std::optional<int> logprobs;  // top logprobs per generated token (plus the sampled one)
  // Top logprobs per prompt token after the first (plus the prompt's own token); -1: the
  // whole vocabulary (within max_logprobs).
  std::optional<int> prompt_logprobs;
  int max_tokens = 16;
  int min_tokens = 0;
  bool ignore_eos = false;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool include_stop_str_in_output = false;
  bool skip_special_tokens = true;

  // Throws ernie::Error with vLLM's wording and the offending parameter's name in `param`.
  void validate(int max_logprobs = 20) const;
};

// A validation failure that names the request parameter (for the HTTP error's "param").
class ParamError : public Error {
 public:
  ParamError(std::string param, const std::string& message)
      : Error(message), param_(std::move(param)) {}
  const std::string& param() const { return param_; }

 private:
  std::string param_;
};

}  // namespace ernie::runtime
