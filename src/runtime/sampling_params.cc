#include "runtime/sampling_params.h"

#include <cmath>

#include "common/check.h"

namespace ernie::runtime {

void SamplingParams::validate(int max_logprobs) const {
  auto fail = [](const char* param, const std::string& msg) { throw ParamError(param, msg); };
  if (n < 1) fail("n", cat("n must be at least 1, got ", n, "."));
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f)) {
    fail("presence_penalty",
         cat("presence_penalty must be in [-2, 2], got ", presence_penalty, "."));
  }
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f)) {
    fail("frequency_penalty",
         cat("frequency_penalty must be in [-2, 2], got ", frequency_penalty, "."));
  }
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty)) {
    fail("repetition_penalty",
         cat("repetition_penalty must be greater than zero, got ", repetition_penalty, "."));
  }
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    fail("temperature", cat("temperature must be non-negative, got ", temperature, "."));
  }
  if (!(top_p > 0.0f && top_p <= 1.0f))
    fail("top_p", cat("top_p must be in (0, 1], got ", top_p, "."));
  if (top_k < -1)
    fail("top_k", cat("top_k must be -1 (disable), 0 (disable) or at least 1, got ", top_k, "."));
  if (!(min_p >= 0.0f && min_p <= 1.0f))
    fail("min_p", cat("min_p must be in [0, 1], got ", min_p, "."));
  if (max_tokens < 1)
    fail("max_tokens", cat("max_tokens must be at least 1, got ", max_tokens, "."));
  if (min_tokens < 0)
    fail("min_tokens", cat("min_tokens must be greater than or equal to 0, got ", min_tokens, "."));
  if (min_tokens > max_tokens) {
    fail("min_tokens", cat("min_tokens must be less than or equal to max_tokens=", max_tokens,
                           ", got ", min_tokens, "."));
  }
  if (logprobs && (*logprobs < 0 || *logprobs > max_logprobs)) {
    fail("logprobs", cat("Requested sample logprobs of ", *logprobs,
                         ", which is greater than max allowed: ", max_logprobs));
  }
  if (prompt_logprobs) {
    if (*prompt_logprobs < -1)
      fail("prompt_logprobs", "`prompt_logprobs` must be a positive value or -1.");
    if (*prompt_logprobs > max_logprobs) {
      fail("prompt_logprobs", cat("Requested prompt logprobs of ", *prompt_logprobs,
                                  ", which is greater than max allowed: ", max_logprobs));
    }
  }
  for (const auto& s : stop) {
    if (s.empty()) fail("stop", "stop cannot contain an empty string.");
  }
  for (const auto& [id, bias] : logit_bias) {
    if (!std::isfinite(bias))
      fail("logit_bias", cat("logit_bias for token ", id, " is not finite."));
  }
}

}  // namespace ernie::runtime
