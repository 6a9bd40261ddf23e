#include "server/api.h"

#include <chrono>
#include <random>

#include "common/check.h"
#include "tokenizer/jinja/value.h"

namespace ernie::server {
namespace {

[[noreturn]] void bad(const std::string& param, const std::string& message) {
  throw ApiError{400, message, param};
}

const ojson* field(const ojson& b, const char* key) {
  auto it = b.find(key);
  if (it == b.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<int64_t> get_int(const ojson& b, const char* key) {
  const ojson* v = field(b, key);
  if (!v) return std::nullopt;
  if (v->is_number_integer()) return v->get<int64_t>();
  if (v->is_number_unsigned()) {
    const uint64_t u = v->get<uint64_t>();
    if (u > static_cast<uint64_t>(INT64_MAX)) bad(key, cat("'", key, "' is too large"));
    return static_cast<int64_t>(u);
  }
  if (v->is_number_float()) {
    const double d = v->get<double>();
    if (d == static_cast<double>(static_cast<int64_t>(d)) && std::abs(d) < 9e18)
      return static_cast<int64_t>(d);
  }
  bad(key, cat("'", key, "' must be an integer, got ", v->dump()));
}

std::optional<double> get_number(const ojson& b, const char* key) {
  const ojson* v = field(b, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) bad(key, cat("'", key, "' must be a number, got ", v->dump()));
  return v->get<double>();
}

std::optional<bool> get_bool(const ojson& b, const char* key) {
  const ojson* v = field(b, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) bad(key, cat("'", key, "' must be a boolean, got ", v->dump()));
  return v->get<bool>();
}

std::optional<std::string> get_string(const ojson& b, const char* key) {
  const ojson* v = field(b, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) bad(key, cat("'", key, "' must be a string, got ", v->dump()));
  return v->get<std::string>();
}

int clamp_int(int64_t v, const char* key, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) bad(key, cat("'", key, "' must be between ", lo, " and ", hi, ", got ", v));
  return static_cast<int>(v);
}

std::vector<int32_t> token_list(const ojson& arr, const char* key) {
  std::vector<int32_t> out;
  for (const auto& t : arr) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX) {
      bad(key, cat("'", key, "' token ids must be non-negative integers, got ", t.dump()));
    }
    out.push_back(static_cast<int32_t>(t.get<int64_t>()));
  }
  return out;
}

// The sampling fields shared by both endpoints (OpenAI's and vLLM's extras), over the
// model's defaults.
void parse_sampling(const ojson& b, runtime::SamplingParams& p, const ApiContext& ctx) {
  ctx.defaults.apply(p, false);  // max_tokens: each endpoint caps its own
  if (auto v = get_int(b, "n")) p.n = clamp_int(*v, "n", 1, 128);
  if (auto v = get_number(b, "temperature")) p.temperature = static_cast<float>(*v);
  if (auto v = get_number(b, "top_p")) p.top_p = static_cast<float>(*v);
  if (auto v = get_int(b, "top_k")) p.top_k = clamp_int(*v, "top_k", -1, INT32_MAX);
  if (auto v = get_number(b, "min_p")) p.min_p = static_cast<float>(*v);
  if (auto v = get_number(b, "presence_penalty")) p.presence_penalty = static_cast<float>(*v);
  if (auto v = get_number(b, "frequency_penalty")) p.frequency_penalty = static_cast<float>(*v);
  if (auto v = get_number(b, "repetition_penalty")) p.repetition_penalty = static_cast<float>(*v);
  if (auto v = get_int(b, "seed")) p.seed = static_cast<uint64_t>(*v);
  if (auto v = get_bool(b, "ignore_eos")) p.ignore_eos = *v;
  if (auto v = get_int(b, "min_tokens")) p.min_tokens = clamp_int(*v, "min_tokens", 0, INT32_MAX);
  if (auto v = get_bool(b, "skip_special_tokens")) p.skip_special_tokens = *v;
  if (auto v = get_bool(b, "include_stop_str_in_output")) p.include_stop_str_in_output = *v;
  if (const ojson* s = field(b, "stop")) {
    if (s->is_string()) {
      p.stop = {s->get<std::string>()};
    } else if (s->is_array()) {
      for (const auto& e : *s) {
        if (!e.is_string()) bad("stop", "'stop' must be a string or a list of strings");
        p.stop.push_back(e.get<std::string>());
      }
    } else {
      bad("stop", "'stop' must be a string or a list of strings");
    }
  }
  if (const ojson* s = field(b, "stop_token_ids")) {
    if (!s->is_array()) bad("stop_token_ids", "'stop_token_ids' must be a list of integers");
    p.stop_token_ids = token_list(*s, "stop_token_ids");
  }
  if (const ojson* lb = field(b, "logit_bias")) {
    if (!lb->is_object())
      bad("logit_bias", "'logit_bias' must be an object mapping token ids to biases");
    const int64_t vocab = ctx.tok ? std::max<int64_t>(ctx.tok->vocab_size(), 1) : INT32_MAX;
    for (auto it = lb->begin(); it != lb->end(); ++it) {
      int64_t id = -1;
      try {
        size_t used = 0;
        id = std::stoll(it.key(), &used);
        if (used != it.key().size()) id = -1;
      } catch (const std::exception&) {
      }
      if (id < 0 || id >= vocab)
        bad("logit_bias",
            cat("logit_bias key '", it.key(), "' is not a token id in the vocabulary"));
      if (!it.value().is_number()) bad("logit_bias", "logit_bias values must be numbers");
      const double bias = it.value().get<double>();
      if (bias < -100 || bias > 100)
        bad("logit_bias", cat("logit_bias values must be in [-100, 100], got ", bias));
      p.logit_bias.emplace_back(static_cast<int32_t>(id), static_cast<float>(bias));
    }
  }
  if (const ojson* so = field(b, "stream_options")) {
    if (!so->is_object()) bad("stream_options", "'stream_options' must be an object");
  }
}

void parse_stream(const ojson& b, Job& job) {
  job.stream = get_bool(b, "stream").value_or(false);
  if (const ojson* so = field(b, "stream_options")) {
    if (!job.stream)
      bad("stream_options", "Stream options can only be defined when `stream=True`.");
    job.include_usage = get_bool(*so, "include_usage").value_or(false);
    job.continuous_usage = get_bool(*so, "continuous_usage_stats").value_or(false);
  }
}

// Fields vLLM serves that this version does not have: refused plainly, never ignored (a client
// asking for JSON output must not get free text).
void refuse_unbuilt(const ojson& b) {
  auto unbuilt = [](const char* key, const std::string& what) {
    bad(key, cat(what, " is not built yet in this version of ernie"));
  };
  if (const ojson* rf = field(b, "response_format")) {
    if (!rf->is_object() || !rf->contains("type") || !(*rf)["type"].is_string())
      bad("response_format", "'response_format' must be an object with a string 'type'");
    const std::string type = (*rf)["type"].get<std::string>();
    if (type != "text")
      unbuilt("response_format", cat("response_format '", type, "' (structured outputs)"));
  }
  for (const char* key : {"guided_json", "guided_regex", "guided_choice", "guided_grammar",
                          "structured_outputs", "structural_tag"}) {
    if (field(b, key)) unbuilt(key, cat("'", key, "' (structured outputs)"));
  }
  if (get_bool(b, "use_beam_search").value_or(false)) unbuilt("use_beam_search", "Beam search");
  if (const auto p = get_int(b, "priority"); p && *p != 0)
    bad("priority", cat("Got priority ", *p, " but Priority scheduling is not enabled."));
  for (const char* key : {"allowed_token_ids", "bad_words", "logits_processors", "prompt_embeds"}) {
    const ojson* v = field(b, key);
    if (v && !(v->is_array() && v->empty())) unbuilt(key, cat("'", key, "'"));
  }
}

// vLLM's truncate_prompt_tokens: keep each prompt's last k tokens (-1: max_model_len).
void truncate_prompts(const ojson& b, Job& job, const ApiContext& ctx) {
  const auto v = get_int(b, "truncate_prompt_tokens");
  if (!v) return;
  if (*v < -1) bad("truncate_prompt_tokens", "'truncate_prompt_tokens' must be -1 or at least 0");
  const int64_t k = *v == -1 ? ctx.max_model_len : *v;
  if (k > ctx.max_model_len) {
    bad("truncate_prompt_tokens",
        cat("truncate_prompt_tokens value (", k, ") is greater than max_model_len (",
            ctx.max_model_len, "). Please, select a smaller truncation size."));
  }
  for (size_t i = 0; i < job.prompts.size(); ++i) {
    auto& p = job.prompts[i];
    if (static_cast<int64_t>(p.size()) <= k) continue;
    p.erase(p.begin(), p.end() - k);
    job.prompt_texts[i] = ctx.tok ? ctx.tok->decode(p) : "";
  }
}

// vLLM's prompt_logprobs (both endpoints): k top logprobs per prompt token, -1 for all.
void parse_prompt_logprobs(const ojson& b, Job& job) {
  const auto v = get_int(b, "prompt_logprobs");
  if (!v) return;
  if (*v < -1) bad("prompt_logprobs", "`prompt_logprobs` must be a positive value or -1.");
  if (job.stream && *v != 0)
    bad("prompt_logprobs", "`prompt_logprobs` are not available when `stream=True`.");
  job.params.prompt_logprobs = clamp_int(*v, "prompt_logprobs", -1, INT32_MAX);
}

void validate_with_engine(const Job& job, const ApiContext& ctx) {
  for (const auto& p : job.prompts) {
    try {
      ctx.engine->validate_request(p, job.params);
    } catch (const runtime::ParamError& e) {
      bad(e.param(), e.what());
    }
  }
}

std::string join_text_parts(const ojson& content, size_t message_index) {
  std::string out;
  bool first = true;
  for (const auto& part : content) {
    if (!part.is_object())
      bad("messages", cat("messages[", message_index, "].content parts must be objects"));
    const std::string type =
        part.contains("type") && part["type"].is_string() ? part["type"].get<std::string>() : "";
    if (type != "text") {
      bad("messages", cat("messages[", message_index, "]: content part type '", type,
                          "' is not supported by this text-only model"));
    }
    if (!part.contains("text") || !part["text"].is_string()) {
      bad("messages", cat("messages[", message_index, "]: a text part needs a string 'text'"));
    }
    if (!first) out += "\n";
    out += part["text"].get<std::string>();
    first = false;
  }
  return out;
}

}  // namespace

SamplingDefaults sampling_defaults(const ojson& generation_config, const ojson& overrides) {
  SamplingDefaults d;
  auto number = [](const ojson& v, const char* key) {
    if (!v.is_number()) throw Error(cat("generation config: '", key, "' must be a number"));
    return v.get<double>();
  };
  auto integer = [](const ojson& v, const char* key) {
    if (!v.is_number_integer())
      throw Error(cat("generation config: '", key, "' must be an integer"));
    return v.get<int64_t>();
  };
  // transformers' GenerationConfig defaults: a value equal to one is not the model's choice.
  const std::pair<const char*, double> neutral[] = {
      {"temperature", 1.0}, {"top_k", 50.0}, {"top_p", 1.0}, {"repetition_penalty", 1.0}};
  auto take = [&](const ojson& src, bool keep_neutral) {
    if (!src.is_object()) return;
    for (const char* key :
         {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens"}) {
      auto it = src.find(key);
      if (it == src.end() || it->is_null()) continue;
      bool is_neutral = false;
      for (const auto& [name, value] : neutral)
        is_neutral |= std::string(name) == key && it->is_number() && it->get<double>() == value;
      if (is_neutral && !keep_neutral) continue;
      const std::string k = key;
      if (k == "temperature") d.temperature = number(*it, key);
      if (k == "top_p") d.top_p = number(*it, key);
      if (k == "min_p") d.min_p = number(*it, key);
      if (k == "repetition_penalty") d.repetition_penalty = number(*it, key);
      if (k == "top_k") d.top_k = static_cast<int>(integer(*it, key));
      if (k == "max_new_tokens") d.max_tokens = integer(*it, key);
    }
  };
  take(generation_config, false);
  take(overrides, true);
  return d;
}

void SamplingDefaults::apply(runtime::SamplingParams& p, bool with_max_tokens) const {
  if (temperature) p.temperature = static_cast<float>(*temperature);
  if (top_p) p.top_p = static_cast<float>(*top_p);
  if (top_k) p.top_k = *top_k;
  if (min_p) p.min_p = static_cast<float>(*min_p);
  if (repetition_penalty) p.repetition_penalty = static_cast<float>(*repetition_penalty);
  if (with_max_tokens && max_tokens) p.max_tokens = static_cast<int>(*max_tokens);
}

ojson SamplingDefaults::to_json() const {
  ojson j = ojson::object();
  if (repetition_penalty) j["repetition_penalty"] = *repetition_penalty;
  if (temperature) j["temperature"] = *temperature;
  if (top_k) j["top_k"] = *top_k;
  if (top_p) j["top_p"] = *top_p;
  if (min_p) j["min_p"] = *min_p;
  if (max_tokens) j["max_tokens"] = *max_tokens;
  return j;
}

std::string ApiError::type() const {
  switch (status) {
    case 401:
      return "AuthenticationError";
    case 404:
      return "NotFoundError";
    case 413:
      return "BadRequestError";
    case 500:
      return "InternalServerError";
    case 503:
      return "ServiceUnavailableError";
    default:
      return "BadRequestError";
  }
}

ojson ApiError::body() const {
  ojson e = ojson::object();
  e["message"] = message;
  e["type"] = type();
  e["param"] = param ? ojson(*param) : ojson(nullptr);
  e["code"] = status;
  return {{"error", e}};
}

std::string random_id(const std::string& prefix) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  char buf[40];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng()));
  return prefix + buf;
}

std::string check_model(const ojson& body, const ApiContext& ctx) {
  auto name = get_string(body, "model");
  if (!name) return ctx.served_names.front();
  for (const auto& n : ctx.served_names) {
    if (n == *name) return n;
  }
  throw ApiError{404, cat("The model `", *name, "` does not exist."), std::string("model")};
}

Job parse_completion(const ojson& b, const ApiContext& ctx) {
  if (!b.is_object()) bad("body", "the request body must be a JSON object");
  Job job;
  job.id = random_id("cmpl-");
  job.created = std::time(nullptr);
  job.model = check_model(b, ctx);
  parse_stream(b, job);
  parse_sampling(b, job.params, ctx);
  refuse_unbuilt(b);
  job.tokens_as_ids = get_bool(b, "return_tokens_as_token_ids").value_or(false);
  job.return_token_ids = get_bool(b, "return_token_ids").value_or(false);
  job.echo = get_bool(b, "echo").value_or(false);
  if (auto v = get_int(b, "max_tokens")) {
    job.echo_only = job.echo && *v == 0;  // the prompt alone: one token is drawn, not returned
    job.params.max_tokens = job.echo_only ? 1 : clamp_int(*v, "max_tokens", 1, INT32_MAX);
  }
  if (ctx.defaults.max_tokens && !job.echo_only) {
    job.params.max_tokens =
        static_cast<int>(std::min<int64_t>(job.params.max_tokens, *ctx.defaults.max_tokens));
  }
  if (auto v = get_int(b, "logprobs"))
    job.completion_logprobs = clamp_int(*v, "logprobs", 0, ctx.max_logprobs);
  if (job.completion_logprobs >= 0) job.params.logprobs = job.completion_logprobs;
  parse_prompt_logprobs(b, job);
  // An echo with logprobs shows the prompt's tokens with theirs.
  if (job.echo && job.completion_logprobs >= 0 && !job.params.prompt_logprobs)
    job.params.prompt_logprobs = job.completion_logprobs;
  if (field(b, "suffix")) bad("suffix", "suffix is not supported");
  if (auto best_of = get_int(b, "best_of"); best_of && *best_of != job.params.n) {
    bad("best_of", "best_of is not supported (it must equal n)");
  }
  const bool add_special = get_bool(b, "add_special_tokens").value_or(true);
  const ojson* prompt = field(b, "prompt");
  if (!prompt) bad("prompt", "'prompt' is required");
  auto add_text = [&](const std::string& text) {
    if (!ctx.tok) bad("prompt", "this model has no tokenizer: send token ids");
    job.prompts.push_back(ctx.tok->encode(text, add_special));
    job.prompt_texts.push_back(text);
  };
  auto add_ids = [&](const ojson& arr) {
    job.prompts.push_back(token_list(arr, "prompt"));
    job.prompt_texts.push_back(ctx.tok ? ctx.tok->decode(job.prompts.back()) : "");
  };
  if (prompt->is_string()) {
    add_text(prompt->get<std::string>());
  } else if (prompt->is_array() && !prompt->empty()) {
    if ((*prompt)[0].is_number()) {
      add_ids(*prompt);
    } else {
      for (const auto& e : *prompt) {
        if (e.is_string())
          add_text(e.get<std::string>());
        else if (e.is_array())
          add_ids(e);
        else
          bad("prompt", "'prompt' must be a string, a list of strings, or token ids");
      }
    }
  } else {
    bad("prompt", "'prompt' must be a non-empty string, list of strings, or list of token ids");
  }
  if (job.prompts.size() * static_cast<size_t>(job.params.n) > 1024) {
    bad("prompt", "at most 1024 outputs (prompts x n) per request");
  }
  truncate_prompts(b, job, ctx);
  validate_with_engine(job, ctx);
  return job;
}

Job parse_chat(const ojson& b, const ApiContext& ctx) {
  if (!b.is_object()) bad("body", "the request body must be a JSON object");
  Job job;
  job.chat = true;
  job.id = random_id("chatcmpl-");
  job.created = std::time(nullptr);
  job.model = check_model(b, ctx);
  parse_stream(b, job);
  parse_sampling(b, job.params, ctx);
  refuse_unbuilt(b);
  job.tokens_as_ids = get_bool(b, "return_tokens_as_token_ids").value_or(false);
  job.return_token_ids = get_bool(b, "return_token_ids").value_or(false);
  if (!ctx.tok) bad("messages", "this model has no tokenizer, so chat is not available");
  if (!ctx.chat_template) {
    bad("messages", "the model has no chat template; start the server with --chat-template");
  }
  if (field(b, "chat_template")) {
    bad("chat_template",
        "Chat template is passed with request, but --trust-request-chat-template is not set. "
        "Refused request with untrusted chat template.");
  }
  job.chat_logprobs = get_bool(b, "logprobs").value_or(false);
  if (auto tl = get_int(b, "top_logprobs")) {
    if (!job.chat_logprobs)
      bad("top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true.");
    job.params.logprobs = clamp_int(*tl, "top_logprobs", 0, ctx.max_logprobs);
  } else if (job.chat_logprobs) {
    job.params.logprobs = 0;
  }
  const ojson* msgs = field(b, "messages");
  if (!msgs || !msgs->is_array() || msgs->empty())
    bad("messages", "'messages' must be a non-empty list");
  ojson messages = ojson::array();
  for (size_t i = 0; i < msgs->size(); ++i) {
    const ojson& m = (*msgs)[i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
      bad("messages", cat("messages[", i, "] must be an object with a string 'role'"));
    }
    ojson copy = m;
    if (m.contains("content")) {
      const ojson& c = m["content"];
      if (c.is_array())
        copy["content"] = join_text_parts(c, i);
      else if (!c.is_string() && !c.is_null())
        bad("messages", cat("messages[", i, "].content must be a string or a list of parts"));
    }
    messages.push_back(std::move(copy));
  }
  tokenizer::ChatOptions opts;
  opts.add_generation_prompt = get_bool(b, "add_generation_prompt").value_or(true);
  const bool continue_final = get_bool(b, "continue_final_message").value_or(false);
  if (continue_final && opts.add_generation_prompt) {
    bad("continue_final_message",
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True.");
  }
  if (const ojson* t = field(b, "tools")) {
    if (!t->is_array()) bad("tools", "'tools' must be a list");
    opts.tools = *t;
  }
  // Tools reach the template, but no tool-call parser reads the output: as vLLM without
  // --enable-auto-tool-choice, only tool_choice "none" is served.
  std::string tool_choice = opts.tools.is_array() && !opts.tools.empty() ? "auto" : "none";
  if (const ojson* tc = field(b, "tool_choice")) {
    if (tc->is_string())
      tool_choice = tc->get<std::string>();
    else if (tc->is_object())
      tool_choice = "named";
    else
      bad("tool_choice", "'tool_choice' must be a string or an object");
  }
  if (tool_choice == "auto") {
    bad("tool_choice",
        "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set");
  }
  if (tool_choice == "required" || tool_choice == "named") {
    bad("tool_choice",
        "tool_choice 'required' or a named function (structured outputs) is not "
        "built yet in this version of ernie");
  }
  if (tool_choice != "none")
    bad("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or a named function");
  if (const ojson* d = field(b, "documents")) opts.documents = *d;
  if (const ojson* k = field(b, "chat_template_kwargs")) {
    if (!k->is_object()) bad("chat_template_kwargs", "'chat_template_kwargs' must be an object");
    opts.kwargs = *k;
  }
  std::string text;
  try {
    text = ctx.chat_template->render(*ctx.tok, messages, opts);
  } catch (const jinja::TemplateError& e) {
    bad("messages", e.what());
  }
  if (continue_final) {
    const ojson& last = messages.back();
    const std::string content = last.contains("content") && last["content"].is_string()
                                    ? last["content"].get<std::string>()
                                    : "";
    const size_t at = content.empty() ? std::string::npos : text.rfind(content);
    if (at != std::string::npos) text.resize(at + content.size());
  }
  const bool add_special = get_bool(b, "add_special_tokens").value_or(false);
  job.prompts.push_back(ctx.tok->encode(text, add_special));
  job.prompt_texts.push_back(text);
  truncate_prompts(b, job, ctx);
  auto max_tokens = get_int(b, "max_completion_tokens");
  if (!max_tokens) max_tokens = get_int(b, "max_tokens");
  const int64_t room = ctx.max_model_len - static_cast<int64_t>(job.prompts[0].size());
  job.params.max_tokens = max_tokens ? clamp_int(*max_tokens, "max_tokens", 1, INT32_MAX)
                                     : static_cast<int>(std::max<int64_t>(1, room));
  if (ctx.defaults.max_tokens) {
    job.params.max_tokens =
        static_cast<int>(std::min<int64_t>(job.params.max_tokens, *ctx.defaults.max_tokens));
  }
  job.echo = get_bool(b, "echo").value_or(false);
  // vLLM's chat echo: the reply starts with the last message when that is the assistant's
  // (the message the model continues).
  if (job.echo && messages.back().value("role", "") == "assistant" &&
      messages.back().contains("content") && messages.back()["content"].is_string()) {
    job.chat_echo = messages.back()["content"].get<std::string>();
  }
  parse_prompt_logprobs(b, job);
  validate_with_engine(job, ctx);
  return job;
}

// ---- results ----

JobResult::JobResult(const Job& job, const ApiContext& ctx) : job_(job), ctx_(ctx) {
  choices_.resize(job.prompts.size() * static_cast<size_t>(job.params.n));
  prompt_logprobs_.resize(job.prompts.size());
  for (const auto& p : job.prompts) prompt_tokens_ += static_cast<int64_t>(p.size());
  // (vLLM echoes a completions prompt as its ids alone when return_token_ids is set.)
  for (size_t i = 0; i < choices_.size() && job.echo && !(job.return_token_ids && !job.chat); ++i)
    choices_[i].text = job.chat ? job.chat_echo : job.prompt_texts[i / job.params.n];
}

std::string JobResult::token_text(int32_t id) const {
  if (!ctx_.tok) return cat("token_id:", id);
  const int32_t one[1] = {id};
  return ctx_.tok->decode(one, false);
}

std::string JobResult::logprob_token(int32_t id) const {
  return job_.tokens_as_ids ? cat("token_id:", id) : token_text(id);
}

namespace {

ojson bytes_of(const std::string& s) {
  ojson arr = ojson::array();
  for (unsigned char c : s) arr.push_back(static_cast<int>(c));
  return arr;
}

// Characters (code points) of UTF-8 text: text offsets count them, as Python's len() does.
size_t utf8_length(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xc0) != 0x80;
  return n;
}

// -inf (a token the model cannot draw) as the finite value OpenAI's clients expect.
float clamped(float logprob) {
  return std::max(logprob, -9999.0f);
}

}  // namespace

ojson JobResult::chat_logprobs_json(const std::vector<backend::SampledToken>& lps) const {
  ojson content = ojson::array();
  for (const auto& t : lps) {
    const std::string s = logprob_token(t.id);
    ojson top = ojson::array();
    for (const auto& e : t.top) {
      const std::string es = logprob_token(e.id);
      top.push_back({{"token", es}, {"logprob", clamped(e.logprob)}, {"bytes", bytes_of(es)}});
    }
    content.push_back({{"token", s},
                       {"logprob", clamped(t.logprob)},
                       {"bytes", bytes_of(s)},
                       {"top_logprobs", top}});
  }
  return {{"content", content}};
}

ojson JobResult::completion_logprobs_json(const std::vector<int32_t>& ids,
                                          const std::vector<const backend::SampledToken*>& scores,
                                          size_t& offset) const {
  ojson tokens = ojson::array(), token_logprobs = ojson::array(), top = ojson::array(),
        offsets = ojson::array();
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string s = logprob_token(ids[i]);
    tokens.push_back(s);
    offsets.push_back(offset);
    offset += utf8_length(s);
    const backend::SampledToken* t = scores[i];
    if (!t) {
      token_logprobs.push_back(nullptr);
      top.push_back(nullptr);
      continue;
    }
    token_logprobs.push_back(clamped(t->logprob));
    ojson m = ojson::object();  // the token itself first, then the most likely
    m[s] = clamped(t->logprob);
    for (const auto& e : t->top) {
      const std::string es = logprob_token(e.id);
      if (!m.contains(es)) m[es] = clamped(e.logprob);
    }
    top.push_back(m);
  }
  return {{"text_offset", offsets},
          {"token_logprobs", token_logprobs},
          {"tokens", tokens},
          {"top_logprobs", top}};
}

void JobResult::add_prompt_entries(size_t prompt_index, std::vector<int32_t>& ids,
                                   std::vector<const backend::SampledToken*>& scores) const {
  const auto& prompt = job_.prompts[prompt_index];
  const auto& lps = prompt_logprobs_[prompt_index];
  for (size_t p = 0; p < prompt.size(); ++p) {
    ids.push_back(prompt[p]);
    scores.push_back(p > 0 && lps && p - 1 < lps->size() ? &(*lps)[p - 1] : nullptr);
  }
}

ojson JobResult::prompt_logprobs_json(size_t prompt_index) const {
  const auto& lps = prompt_logprobs_[prompt_index];
  if (!job_.params.prompt_logprobs || !lps) return nullptr;
  ojson out = ojson::array({nullptr});
  for (const auto& t : *lps) {
    ojson m = ojson::object();
    auto entry = [&](int32_t id, float logprob, int rank) {
      const std::string key = std::to_string(id);
      if (m.contains(key)) return;
      m[key] = {{"logprob", clamped(logprob)}, {"rank", rank}, {"decoded_token", token_text(id)}};
    };
    entry(t.id, t.logprob, t.rank);
    for (size_t k = 0; k < t.top.size(); ++k)
      entry(t.top[k].id, t.top[k].logprob, static_cast<int>(k) + 1);
    out.push_back(std::move(m));
  }
  return out;
}

ojson JobResult::chunk_base() const {
  return {{"id", job_.id},
          {"object", job_.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", job_.created},
          {"model", job_.model}};
}

ojson JobResult::usage() const {
  int64_t completion = 0;
  for (const auto& c : choices_) completion += static_cast<int64_t>(c.token_ids.size());
  return {{"prompt_tokens", prompt_tokens_},
          {"total_tokens", prompt_tokens_ + completion},
          {"completion_tokens", completion},
          {"prompt_tokens_details", ctx_.prompt_tokens_details && cached_tokens_ > 0
                                        ? ojson{{"cached_tokens", cached_tokens_}}
                                        : ojson(nullptr)}};
}

std::vector<ojson> JobResult::start_chunks() {
  std::vector<ojson> out;
  if (!job_.stream || !job_.chat) return out;
  // The role for every choice, then the echoed message (chat echo) for every choice.
  for (int pass = 0; pass < (job_.chat_echo.empty() ? 1 : 2); ++pass) {
    for (size_t i = 0; i < choices_.size(); ++i) {
      ojson c = chunk_base();
      const ojson delta = pass == 0 ? ojson{{"role", "assistant"}, {"content", ""}}
                                    : ojson{{"content", job_.chat_echo}};
      c["choices"] = ojson::array(
          {{{"index", i}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", nullptr}}});
      if (job_.return_token_ids && pass == 0) c["prompt_token_ids"] = job_.prompts[0];
      if (job_.continuous_usage) c["usage"] = usage();
      out.push_back(std::move(c));
    }
  }
  return out;
}

std::optional<ojson> JobResult::stream_chunk(size_t ci, const runtime::CompletionDelta& d) {
  Choice& c = choices_[ci];
  const size_t prompt_index = ci / static_cast<size_t>(job_.params.n);
  const bool first_output = !c.started;
  const bool echo_now = job_.echo && !job_.chat && first_output;
  const bool show_output = !job_.echo_only;
  if (!echo_now && d.token_ids.empty() && d.text.empty() && !d.finish_reason) return std::nullopt;
  c.started = true;
  ojson lp = nullptr;
  if (job_.params.logprobs && job_.chat) {
    lp = chat_logprobs_json(d.logprobs);
  } else if (job_.params.logprobs) {
    std::vector<int32_t> ids;
    std::vector<const backend::SampledToken*> scores;
    if (echo_now) add_prompt_entries(prompt_index, ids, scores);
    if (show_output) {
      ids.insert(ids.end(), d.token_ids.begin(), d.token_ids.end());
      for (const auto& t : d.logprobs) scores.push_back(&t);
    }
    lp = completion_logprobs_json(ids, scores, c.stream_offset);
  }
  const ojson finish = d.finish_reason ? ojson(*d.finish_reason) : ojson(nullptr);
  ojson choice;
  if (job_.chat) {
    choice = {{"index", ci},
              {"delta", {{"content", d.text}}},
              {"logprobs", lp},
              {"finish_reason", finish}};
    if (d.finish_reason) choice["stop_reason"] = c.stop_reason;
  } else {
    std::string text =
        echo_now && !job_.return_token_ids ? job_.prompt_texts[prompt_index] : std::string();
    if (show_output) text += d.text;
    choice = {{"index", ci},
              {"text", text},
              {"logprobs", lp},
              {"finish_reason", finish},
              {"stop_reason", d.finish_reason ? c.stop_reason : ojson(nullptr)}};
    if (job_.return_token_ids && first_output)
      choice["prompt_token_ids"] = job_.prompts[prompt_index];
  }
  if (job_.return_token_ids)
    choice["token_ids"] = show_output ? ojson(d.token_ids) : ojson::array();
  ojson chunk = chunk_base();
  chunk["choices"] = ojson::array({choice});
  if (job_.continuous_usage) chunk["usage"] = usage();
  return chunk;
}

std::vector<ojson> JobResult::apply(size_t prompt_index, const runtime::RequestOutput& out) {
  std::vector<ojson> chunks;
  if (out.prompt_logprobs) prompt_logprobs_.at(prompt_index) = *out.prompt_logprobs;
  if (out.num_cached_tokens > 0) cached_tokens_ = out.num_cached_tokens;
  const size_t n = static_cast<size_t>(job_.params.n);
  for (const auto& d : out.outputs) {
    const size_t ci = prompt_index * n + static_cast<size_t>(d.index);
    Choice& c = choices_.at(ci);
    if (!job_.echo_only) c.text += d.text;
    c.token_ids.insert(c.token_ids.end(), d.token_ids.begin(), d.token_ids.end());
    if (job_.params.logprobs)
      c.logprobs.insert(c.logprobs.end(), d.logprobs.begin(), d.logprobs.end());
    if (d.finish_reason) {
      c.finish_reason = *d.finish_reason;
      if (auto* s = std::get_if<std::string>(&d.stop_reason))
        c.stop_reason = *s;
      else if (auto* t = std::get_if<int32_t>(&d.stop_reason))
        c.stop_reason = *t;
    }
    if (job_.stream) c.held.push_back(d);
  }
  if (!job_.stream) return chunks;
  // An echo that shows prompt logprobs waits for them (a request's other outputs may come
  // first); then every held output of the prompt goes out in order.
  const bool waits =
      job_.echo && !job_.chat && job_.params.logprobs && !prompt_logprobs_[prompt_index];
  for (size_t ci = prompt_index * n; ci < (prompt_index + 1) * n && !waits; ++ci) {
    for (const auto& d : choices_[ci].held) {
      if (auto chunk = stream_chunk(ci, d)) chunks.push_back(std::move(*chunk));
    }
    choices_[ci].held.clear();
  }
  return chunks;
}

std::optional<ojson> JobResult::usage_chunk() const {
  if (!job_.stream || !job_.include_usage) return std::nullopt;
  ojson c = chunk_base();
  c["choices"] = ojson::array();
  c["usage"] = usage();
  return c;
}

bool JobResult::finished() const {
  for (const auto& c : choices_) {
    if (!c.finish_reason) return false;
  }
  return true;
}

ojson JobResult::response() const {
  ojson r = {{"id", job_.id},
             {"object", job_.chat ? "chat.completion" : "text_completion"},
             {"created", job_.created},
             {"model", job_.model}};
  ojson choices = ojson::array();
  for (size_t i = 0; i < choices_.size(); ++i) {
    const Choice& c = choices_[i];
    const size_t prompt_index = i / static_cast<size_t>(job_.params.n);
    const ojson finish = c.finish_reason ? ojson(*c.finish_reason) : ojson(nullptr);
    if (job_.chat) {
      choices.push_back(
          {{"index", i},
           {"message",
            {{"role", "assistant"}, {"content", c.text}, {"tool_calls", ojson::array()}}},
           {"logprobs", job_.params.logprobs ? chat_logprobs_json(c.logprobs) : ojson(nullptr)},
           {"finish_reason", finish},
           {"stop_reason", c.stop_reason},
           {"token_ids", job_.return_token_ids ? ojson(c.token_ids) : ojson(nullptr)}});
      continue;
    }
    ojson lp = nullptr;
    if (job_.params.logprobs) {
      std::vector<int32_t> ids;
      std::vector<const backend::SampledToken*> scores;
      if (job_.echo) add_prompt_entries(prompt_index, ids, scores);
      if (!job_.echo_only) {
        ids.insert(ids.end(), c.token_ids.begin(), c.token_ids.end());
        for (const auto& t : c.logprobs) scores.push_back(&t);
      }
      size_t offset = 0;
      lp = completion_logprobs_json(ids, scores, offset);
    }
    const bool ids = job_.return_token_ids;
    choices.push_back(
        {{"index", i},
         {"text", c.text},
         {"logprobs", lp},
         {"finish_reason", finish},
         {"stop_reason", c.stop_reason},
         {"token_ids", ids && !job_.echo_only ? ojson(c.token_ids) : ojson(nullptr)},
         {"prompt_logprobs", prompt_logprobs_json(prompt_index)},
         {"prompt_token_ids", ids ? ojson(job_.prompts[prompt_index]) : ojson(nullptr)}});
  }
  r["choices"] = choices;
  r["usage"] = usage();
  if (job_.chat) {
    r["prompt_logprobs"] = prompt_logprobs_json(0);
    r["prompt_token_ids"] = job_.return_token_ids ? ojson(job_.prompts[0]) : ojson(nullptr);
  }
  return r;
}

ojson models_response(const ApiContext& ctx) {
  ojson data = ojson::array();
  for (const auto& name : ctx.served_names) {
    ojson perm = {{"id", random_id("modelperm-")},
                  {"object", "model_permission"},
                  {"created", ctx.created},
                  {"allow_create_engine", false},
                  {"allow_sampling", true},
                  {"allow_logprobs", true},
                  {"allow_search_indices", false},
                  {"allow_view", true},
                  {"allow_fine_tuning", false},
                  {"organization", "*"},
                  {"group", nullptr},
                  {"is_blocking", false}};
    data.push_back({{"id", name},
                    {"object", "model"},
                    {"created", ctx.created},
                    {"owned_by", "vllm"},
                    {"root", ctx.model_path},
                    {"parent", nullptr},
                    {"max_model_len", ctx.max_model_len},
                    {"permission", ojson::array({perm})}});
  }
  return {{"object", "list"}, {"data", data}};
}

ojson tokenize_response(const ojson& b, const ApiContext& ctx) {
  if (!b.is_object()) bad("body", "the request body must be a JSON object");
  check_model(b, ctx);
  if (!ctx.tok) bad("prompt", "this model has no tokenizer");
  std::vector<int32_t> ids;
  if (field(b, "messages")) {
    ojson chat = b;
    chat.erase("model");
    chat["max_tokens"] = 1;
    chat["tool_choice"] = "none";  // the template sees the tools; nothing is generated
    Job j = parse_chat(chat, ctx);
    ids = j.prompts[0];
  } else {
    auto prompt = get_string(b, "prompt");
    if (!prompt) bad("prompt", "'prompt' (a string) or 'messages' is required");
    ids = ctx.tok->encode(*prompt, get_bool(b, "add_special_tokens").value_or(true));
  }
  ojson strs = nullptr;
  if (get_bool(b, "return_token_strs").value_or(false)) {
    strs = ojson::array();
    for (int32_t id : ids) {
      const int32_t one[1] = {id};
      strs.push_back(ctx.tok->decode(one, false));
    }
  }
  return {{"count", ids.size()},
          {"max_model_len", ctx.max_model_len},
          {"tokens", ids},
          {"token_strs", strs}};
}

ojson detokenize_response(const ojson& b, const ApiContext& ctx) {
  if (!b.is_object()) bad("body", "the request body must be a JSON object");
  check_model(b, ctx);
  if (!ctx.tok) bad("tokens", "this model has no tokenizer");
  const ojson* t = field(b, "tokens");
  if (!t || !t->is_array()) bad("tokens", "'tokens' must be a list of token ids");
  const auto ids = token_list(*t, "tokens");  // ids past the tokenizer decode to nothing
  return {{"prompt", ctx.tok->decode(ids, false)}};
}

}  // namespace ernie::server
