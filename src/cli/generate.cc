#include <nlohmann/json.hpp>

#include <charconv>
#include <chrono>
#include <filesystem>
#include <iostream>

#include "backend/backend.h"
#include "cli/commands.h"
#include "common/check.h"
#include "common/log.h"
#include "model/ernie45.h"
#include "runtime/offline.h"
#include "tokenizer/chat.h"
#include "tokenizer/detokenizer.h"
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

}  // namespace

CLI::App* add_generate(CLI::App& app, GenerateArgs& a) {
  CLI::App* c = app.add_subcommand("generate", "Generate offline from prompts (greedy or sampled)");
  c->add_option("--model", a.model, "Model directory")->required();
  c->add_option("--prompt-token-ids", a.prompt_token_ids,
                "A prompt as comma-separated token ids; repeat for several prompts");
  c->add_option("--prompt", a.prompts, "A text prompt; repeat for several prompts");
  c->add_option("--chat", a.chats, "A user message, rendered with the chat template; repeatable");
  c->add_option("--system", a.system, "A system message for --chat");
  c->add_option("--chat-template", a.chat_template, "A chat template file instead of the model's");
  c->add_option("--chat-template-kwargs", a.chat_template_kwargs,
                "JSON object of extra variables for the chat template");
  c->add_option("--skip-special-tokens", a.skip_special_tokens,
                "Leave special tokens out of the output text")
      ->capture_default_str();
  c->add_option("--max-tokens", a.max_tokens, "Tokens to generate per prompt")
      ->check(CLI::Range(1, 1 << 30))
      ->capture_default_str();
  c->add_option("--temperature", a.temperature, "0 means greedy")
      ->check(CLI::Range(0.0f, 100.0f))
      ->capture_default_str();
  c->add_option("--seed", a.seed, "Sampling seed")->capture_default_str();
  c->add_option("--logprobs", a.logprobs, "Top logprobs to return per generated token")
      ->check(CLI::Range(0, 20))
      ->capture_default_str();
  c->add_flag("--json", a.json, "Print one JSON object per prompt");
  c->add_flag("--ignore-eos", a.ignore_eos, "Keep generating after an end-of-sequence token");
  c->add_option("--block-size", a.block_size, "KV cache block size")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  c->add_option("--max-num-batched-tokens", a.max_num_batched_tokens, "Token budget per step")
      ->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  c->add_option("--device", a.device, "Where to run")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  return c;
}

int run_generate(const GenerateArgs& a) {
  if (a.prompt_token_ids.empty() && a.prompts.empty() && a.chats.empty()) {
    throw Error("give at least one --prompt, --chat or --prompt-token-ids");
  }
  if (a.device != "cpu") throw Error("--device cuda is not built yet; use --device cpu");
  nlohmann::ordered_json kwargs = nlohmann::ordered_json::object();
  if (!a.chat_template_kwargs.empty()) {
    kwargs = nlohmann::ordered_json::parse(a.chat_template_kwargs, nullptr, false);
    if (!kwargs.is_object()) throw Error("--chat-template-kwargs must be a JSON object");
  }
  // Text needs the tokenizer; token-id prompts work without one.
  std::shared_ptr<const tokenizer::Tokenizer> tok;
  if (!a.prompts.empty() || !a.chats.empty() ||
      std::filesystem::exists(std::filesystem::path(a.model) / "tokenizer.model")) {
    tok = tokenizer::Tokenizer::load(a.model);
  }
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& p : a.prompt_token_ids) prompts.push_back(parse_ids(p));
  for (const auto& p : a.prompts) prompts.push_back(tok->encode(p, /*add_special_tokens=*/true));
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
  std::vector<runtime::GenerateRequest> reqs;
  for (auto& p : prompts) {
    runtime::GenerateRequest r;
    r.prompt = std::move(p);
    if (tok && !a.ignore_eos) r.stop_token_ids = tok->eos_token_ids();
    r.max_tokens = a.max_tokens;
    r.temperature = a.temperature;
    r.seed = a.seed;
    r.logprobs = a.logprobs;
    r.ignore_eos = a.ignore_eos;
    reqs.push_back(std::move(r));
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto cfg = model::load_config(a.model);
  model::Checkpoint ckpt(a.model);
  auto be = backend::make_cpu_backend();
  model::Ernie45 m(cfg, model::load_weights(cfg, ckpt, *be), *be);
  const auto t1 = std::chrono::steady_clock::now();
  log::info("loaded ", a.model, " on ", be->name(), " in ",
            std::chrono::duration<double>(t1 - t0).count(), " s");
  runtime::OfflineOptions opts;
  opts.block_size = a.block_size;
  opts.max_num_batched_tokens = a.max_num_batched_tokens;
  const auto results = runtime::generate(m, *be, reqs, opts);
  const auto t2 = std::chrono::steady_clock::now();
  size_t generated = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    generated += r.tokens.size();
    std::string text;
    if (tok) {
      tokenizer::IncrementalDetokenizer detok(tok, a.skip_special_tokens);
      for (int32_t id : r.tokens) text += detok.add(id);
      text += detok.finish();
    }
    if (a.json) {
      nlohmann::json j;
      j["token_ids"] = r.tokens;
      if (tok) j["text"] = text;
      j["finish_reason"] = r.finish_reason;
      if (a.logprobs > 0) {
        nlohmann::json lps = nlohmann::json::array();
        for (const auto& step : r.logprobs) {
          nlohmann::json s = nlohmann::json::array();
          for (const auto& t : step) s.push_back({{"id", t.id}, {"logprob", t.logprob}});
          lps.push_back(s);
        }
        j["logprobs"] = lps;
      }
      std::cout << j.dump() << "\n";
    } else {
      std::cout << "--- prompt " << i << " (" << r.tokens.size() << " tokens, " << r.finish_reason
                << ")\n";
      if (tok) {
        std::cout << text << "\n";
      } else {
        for (size_t k = 0; k < r.tokens.size(); ++k) std::cout << (k ? "," : "") << r.tokens[k];
        std::cout << "\n";
      }
    }
  }
  const double secs = std::chrono::duration<double>(t2 - t1).count();
  log::info("generated ", generated, " tokens for ", results.size(), " prompts in ", secs, " s (",
            generated / std::max(secs, 1e-9), " tok/s)");
  return 0;
}

}  // namespace ernie::cli
