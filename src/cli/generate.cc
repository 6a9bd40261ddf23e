// `ernie generate`: offline generation through the engine, many prompts at once.
#include <nlohmann/json.hpp>

#include <charconv>
#include <chrono>
#include <filesystem>
#include <iostream>

#include "backend/backend.h"
#include "cli/backend_select.h"
#include "cli/commands.h"
#include "common/check.h"
#include "common/log.h"
#include "model/ernie45.h"
#include "runtime/engine.h"
#include "tokenizer/chat.h"
#include "tokenizer/tokenizer.h"

namespace ernie::cli {
namespace {

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i <= text.size()) {
    size_t j = text.find(',', i);
    if (j == std::string::npos) j = text.size();
    std::string part = text.substr(i, j - i);
    while (!part.empty() && part.front() == ' ') part.erase(part.begin());
    while (!part.empty() && part.back() == ' ') part.pop_back();
    int32_t v = 0;
    auto [p, ec] = std::from_chars(part.data(), part.data() + part.size(), v);
    require(
        ec == std::errc() && p == part.data() + part.size() && !part.empty(),
        cat("--prompt-token-ids: '", part, "' is not an integer token id (expected e.g. 1,2,3)"));
    ids.push_back(v);
    i = j + 1;
  }
  return ids;
}

nlohmann::json logprobs_json(const std::vector<backend::SampledToken>& lps) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& t : lps) {
    nlohmann::json step = nlohmann::json::array();
    for (const auto& e : t.top) step.push_back({{"id", e.id}, {"logprob", e.logprob}});
    out.push_back(step);
  }
  return out;
}

}  // namespace

CLI::App* add_generate(CLI::App& app, GenerateArgs& a) {
  CLI::App* c = app.add_subcommand("generate", "Generate offline from prompts through the engine");
  c->add_option("--model", a.model, "Model directory")->required();
  c->add_option("--prompt-token-ids", a.prompt_token_ids,
                "A prompt as comma-separated token ids; repeat for several prompts");
  c->add_option("--prompt", a.prompts, "A text prompt; repeat for several prompts");
  c->add_option("--chat", a.chats, "A user message, rendered with the chat template; repeatable");
  c->add_option("--system", a.system, "A system message for --chat");
  c->add_option("--chat-template", a.chat_template, "A chat template file instead of the model's");
  c->add_option("--chat-template-kwargs", a.chat_template_kwargs,
                "JSON object of extra variables for the chat template");
  c->add_flag("--json", a.json, "Print one JSON object per output");
  c->add_option("--device", a.device, "Where to run")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}))
      ->capture_default_str();
  auto* s = c->add_option_group("Sampling");
  s->add_option("--n", a.n, "Outputs per prompt")->capture_default_str();
  s->add_option("--max-tokens", a.max_tokens, "Tokens to generate per output")
      ->capture_default_str();
  s->add_option("--min-tokens", a.min_tokens, "Tokens before EOS or stop ids may end it")
      ->capture_default_str();
  s->add_option("--temperature", a.temperature, "0 means greedy")->capture_default_str();
  s->add_option("--top-p", a.top_p)->capture_default_str();
  s->add_option("--top-k", a.top_k, "0 or -1: off")->capture_default_str();
  s->add_option("--min-p", a.min_p)->capture_default_str();
  s->add_option("--presence-penalty", a.presence_penalty)->capture_default_str();
  s->add_option("--frequency-penalty", a.frequency_penalty)->capture_default_str();
  s->add_option("--repetition-penalty", a.repetition_penalty)->capture_default_str();
  s->add_option("--seed", a.seed, "Sampling seed of every prompt (default: random per prompt)");
  s->add_option("--logprobs", a.logprobs, "Top logprobs to return per generated token");
  s->add_option("--prompt-logprobs", a.prompt_logprobs,
                "Top logprobs to return per prompt token after the first (-1: all)");
  s->add_flag("--ignore-eos", a.ignore_eos, "Keep generating after an end-of-sequence token");
  s->add_option("--stop", a.stop, "A stop string; repeatable");
  s->add_option("--skip-special-tokens", a.skip_special_tokens,
                "Leave special tokens out of the text")
      ->capture_default_str();
  auto* e = c->add_option_group("Engine");
  e->add_option("--block-size", a.block_size, "KV cache block size (tokens)")
      ->capture_default_str();
  e->add_option("--max-num-batched-tokens", a.max_num_batched_tokens, "Token budget per step")
      ->capture_default_str();
  e->add_option("--max-num-seqs", a.max_num_seqs, "Sequences per step")->capture_default_str();
  e->add_option("--max-model-len", a.max_model_len, "Context length (default: the model's)");
  e->add_flag("--no-enable-prefix-caching", a.no_prefix_caching, "Turn prefix caching off");
  e->add_option("--num-gpu-blocks-override", a.num_gpu_blocks_override,
                "Exact number of KV cache blocks");
  e->add_option("--kv-cache-memory-gib", a.kv_cache_memory_gib, "KV cache budget on the CPU (GiB)")
      ->capture_default_str();
  return c;
}

int run_generate(const GenerateArgs& a) {
  if (a.prompt_token_ids.empty() && a.prompts.empty() && a.chats.empty()) {
    throw Error("give at least one --prompt, --chat or --prompt-token-ids");
  }
  nlohmann::ordered_json kwargs = nlohmann::ordered_json::object();
  if (!a.chat_template_kwargs.empty()) {
    kwargs = nlohmann::ordered_json::parse(a.chat_template_kwargs, nullptr, false);
    if (!kwargs.is_object()) throw Error("--chat-template-kwargs must be a JSON object");
  }
  runtime::SamplingParams p;
  p.n = a.n;
  p.max_tokens = a.max_tokens;
  p.min_tokens = a.min_tokens;
  p.temperature = a.temperature;
  p.top_p = a.top_p;
  p.top_k = a.top_k;
  p.min_p = a.min_p;
  p.presence_penalty = a.presence_penalty;
  p.frequency_penalty = a.frequency_penalty;
  p.repetition_penalty = a.repetition_penalty;
  p.seed = a.seed;
  if (a.logprobs >= 0) p.logprobs = a.logprobs;
  if (a.prompt_logprobs != -2) p.prompt_logprobs = a.prompt_logprobs;
  p.ignore_eos = a.ignore_eos;
  p.stop = a.stop;
  p.skip_special_tokens = a.skip_special_tokens;
  try {
    p.validate();
  } catch (const runtime::ParamError& e) {
    throw Error(cat("--", e.param(), ": ", e.what()));
  }

  // Text needs the tokenizer; token-id prompts work without one.
  std::shared_ptr<const tokenizer::Tokenizer> tok;
  if (!a.prompts.empty() || !a.chats.empty() || !a.stop.empty() ||
      std::filesystem::exists(std::filesystem::path(a.model) / "tokenizer.model")) {
    tok = tokenizer::Tokenizer::load(a.model);
  }
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& s : a.prompt_token_ids) prompts.push_back(parse_ids(s));
  for (const auto& s : a.prompts) prompts.push_back(tok->encode(s, /*add_special_tokens=*/true));
  if (!a.chats.empty()) {
    auto tmpl = tokenizer::ChatTemplate::for_model(*tok, a.chat_template);
    for (const auto& text : a.chats) {
      nlohmann::ordered_json messages = nlohmann::ordered_json::array();
      if (!a.system.empty()) messages.push_back({{"role", "system"}, {"content", a.system}});
      messages.push_back({{"role", "user"}, {"content", text}});
      tokenizer::ChatOptions o;
      o.kwargs = kwargs;
      prompts.push_back(tok->encode(tmpl->render(*tok, messages, o), /*add_special_tokens=*/false));
    }
  }

  const auto t0 = std::chrono::steady_clock::now();
  auto cfg = model::load_config(a.model);
  model::Checkpoint ckpt(a.model);
  auto be = make_backend(a.device);
  model::Ernie45 m(cfg, model::load_weights(cfg, ckpt, *be), *be);
  runtime::EngineConfig ec;
  ec.block_size = a.block_size;
  ec.max_num_batched_tokens = a.max_num_batched_tokens;
  ec.max_num_seqs = a.max_num_seqs;
  ec.max_model_len = a.max_model_len;
  ec.enable_prefix_caching = !a.no_prefix_caching;
  ec.num_blocks_override = a.num_gpu_blocks_override;
  ec.kv_cache_memory = static_cast<int64_t>(a.kv_cache_memory_gib * (1ll << 30));
  runtime::Engine engine(m, tok, ec);
  const auto t1 = std::chrono::steady_clock::now();
  log::info("loaded ", a.model, " on ", be->name(), " in ",
            std::chrono::duration<double>(t1 - t0).count(), " s; KV cache ", engine.num_kv_blocks(),
            " blocks (", engine.kv_capacity_tokens(), " tokens)");

  const auto results =
      runtime::generate(engine, prompts, std::vector<runtime::SamplingParams>(prompts.size(), p));
  const auto t2 = std::chrono::steady_clock::now();
  size_t generated = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    for (size_t k = 0; k < results[i].size(); ++k) {
      const auto& r = results[i][k];
      generated += r.tokens.size();
      if (a.json) {
        nlohmann::json j;
        j["prompt"] = i;
        j["index"] = k;
        j["token_ids"] = r.tokens;
        if (tok) j["text"] = r.text;
        j["finish_reason"] = r.finish_reason;
        if (p.logprobs) j["logprobs"] = logprobs_json(r.logprobs);
        if (p.prompt_logprobs && k == 0) {
          // null for the first token, then each token's logprob, rank and the most likely.
          nlohmann::json pl = nlohmann::json::array({nullptr});
          const auto tops = logprobs_json(r.prompt_logprobs);
          for (size_t t = 0; t < r.prompt_logprobs.size(); ++t) {
            const auto& e = r.prompt_logprobs[t];
            pl.push_back(
                {{"id", e.id}, {"logprob", e.logprob}, {"rank", e.rank}, {"top", tops[t]}});
          }
          j["prompt_logprobs"] = pl;
        }
        std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      } else {
        std::cout << "--- prompt " << i << (p.n > 1 ? cat(" output ", k) : "") << " ("
                  << r.tokens.size() << " tokens, " << r.finish_reason << ")\n";
        if (tok) {
          std::cout << r.text << "\n";
        } else {
          for (size_t t = 0; t < r.tokens.size(); ++t) std::cout << (t ? "," : "") << r.tokens[t];
          std::cout << "\n";
        }
      }
    }
  }
  const double secs = std::chrono::duration<double>(t2 - t1).count();
  const auto st = engine.stats();
  log::info("generated ", generated, " tokens for ", results.size(), " prompts in ", secs, " s (",
            generated / std::max(secs, 1e-9), " tok/s); ", st.steps, " steps, ", st.preemptions,
            " preemptions, prefix cache hit rate ",
            st.prefix_queries ? 100.0 * st.prefix_hits / st.prefix_queries : 0.0, "%");
  return 0;
}

}  // namespace ernie::cli
