// `ernie serve MODEL`: the OpenAI-compatible server, with vLLM's flag names and defaults.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "cli/backend_select.h"
#include "cli/commands.h"
#include "common/check.h"
#include "common/log.h"
#include "model/checkpoint.h"
#include "model/ernie45.h"
#include "runtime/engine.h"
#include "server/api.h"
#include "server/async_engine.h"
#include "server/http.h"
#include "server/metrics.h"
#include "tokenizer/chat.h"
#include "tokenizer/tokenizer.h"

namespace ernie::cli {

CLI::App* add_serve(CLI::App& app, ServeArgs& a) {
  CLI::App* c =
      app.add_subcommand("serve", "Serve a model with an OpenAI-compatible API (like vllm serve)");
  c->add_option("model", a.model,
                "Model directory or Hugging Face id (e.g. baidu/ERNIE-4.5-21B-A3B-PT)")
      ->required();
  c->add_option("--host", a.host, "Address to listen on")->capture_default_str();
  c->add_option("--port", a.port, "Port to listen on")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  c->add_option("--served-model-name", a.served_model_name,
                "Name(s) the API answers to (default: the model argument)");
  c->add_option("--api-key", a.api_key,
                "Require 'Authorization: Bearer KEY' on /v1 routes (or VLLM_API_KEY)");
  c->add_option("--chat-template", a.chat_template, "Chat template file instead of the model's");
  c->add_option("--device", a.device, "cpu, cuda, or auto")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  c->add_option("--tensor-parallel-size", a.tensor_parallel_size, "GPUs to shard over")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  c->add_option("--gpu-memory-utilization", a.gpu_memory_utilization,
                "Fraction of GPU memory to use")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  c->add_option("--quantization,-q", a.quantization, "Weight quantization (fp8)");
  c->add_option("--speculative-config", a.speculative_config,
                "JSON, e.g. {\"method\": \"ernie_mtp\", \"num_speculative_tokens\": 1}");
  c->add_option("--pipeline-parallel-size", a.pipeline_parallel_size, "Pipeline stages")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  c->add_option("--data-parallel-size", a.data_parallel_size, "Data-parallel replicas")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  c->add_option("--cpu-offload-gb", a.cpu_offload_gb, "GiB of weights kept in CPU memory")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c->add_option("--kv-cache-dtype", a.kv_cache_dtype, "KV cache element type (auto: the model's)")
      ->check(CLI::IsMember({"auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"}))
      ->capture_default_str();
  c->add_option("--tool-call-parser", a.tool_call_parser, "Tool-call parser (not built yet)");
  c->add_flag("--enable-auto-tool-choice", a.enable_auto_tool_choice,
              "tool_choice auto (not built yet)");
  c->add_option("--reasoning-parser", a.reasoning_parser, "Reasoning parser (not built yet)");
  c->add_option("--max-model-len", a.max_model_len, "Context length (default: the model's)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  c->add_option("--max-num-seqs", a.max_num_seqs,
                "Sequences per step (default: vLLM's, 1024 on GPUs of 70 GiB or more other "
                "than the A100, 256 on smaller ones; 256 on the CPU)")
      ->check(CLI::Range(1, 1 << 20));
  c->add_option("--max-num-batched-tokens", a.max_num_batched_tokens,
                "Tokens per step (default: vLLM's, 8192 on GPUs of 70 GiB or more other than "
                "the A100, 2048 on smaller ones; 8192 on the CPU)")
      ->check(CLI::Range(1, 1 << 24));
  c->add_flag("--enable-prefix-caching,!--no-enable-prefix-caching", a.enable_prefix_caching,
              "Prefix caching (on by default)");
  c->add_option("--load-format", a.load_format, "auto, safetensors, or dummy (random weights)")
      ->check(CLI::IsMember({"auto", "safetensors", "dummy"}))
      ->capture_default_str();
  c->add_flag("--enforce-eager", a.enforce_eager, "Do not capture CUDA graphs");
  c->add_flag("--async-scheduling,!--no-async-scheduling", a.async_scheduling,
              "Schedule and launch each step before the last step's tokens reach the host "
              "(the host's work overlaps the device's; on by default)");
  c->add_flag("--profile-stages", a.profile_stages,
              "Time every stage of every step (CUDA events on the GPU, graphs off) and log a "
              "breakdown with the periodic stats");
  c->add_option("--block-size", a.block_size, "KV cache block size (tokens)")
      ->check(CLI::IsMember({1, 8, 16, 32, 64, 128}))
      ->capture_default_str();
  c->add_option("--seed", a.seed, "Seed for requests without their own")->capture_default_str();
  c->add_option("--num-gpu-blocks-override", a.num_gpu_blocks_override,
                "Exact number of KV cache blocks")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  c->add_option("--kv-cache-memory", a.kv_cache_memory,
                "KV cache size in bytes (CPU default: 4 GiB)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 50));
  c->add_option("--max-logprobs", a.max_logprobs,
                "Largest logprobs / top_logprobs a request may ask for")
      ->check(CLI::Range(0, 1000))
      ->capture_default_str();
  c->add_option("--generation-config", a.generation_config,
                "Request defaults from generation_config.json: auto (the model's), vllm "
                "(none), or a folder holding one")
      ->capture_default_str();
  c->add_option("--override-generation-config", a.override_generation_config,
                "A JSON object of generation config fields over --generation-config's, e.g. "
                "'{\"temperature\": 0.5}'");
  c->add_option("--dtype", a.dtype, "Model dtype (auto or bfloat16)")
      ->check(CLI::IsMember({"auto", "bfloat16", "bf16"}))
      ->capture_default_str();
  c->add_option("--tokenizer", a.tokenizer, "Tokenizer directory (default: the model's)");
  c->add_option("--download-dir", a.download_dir,
                "Where to download models (default: the Hugging Face cache)");
  c->add_option("--revision", a.revision, "Model revision on the Hugging Face hub")
      ->capture_default_str();
  c->add_flag("--enable-log-requests", a.log_requests, "Log every request");
  c->add_flag("--enable-prompt-tokens-details", a.prompt_tokens_details,
              "Report the prompt's tokens found in the prefix cache in usage");
  c->add_option("--api-server-count,--threads", a.threads, "HTTP I/O threads")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  // Accepted for compatibility with vLLM command lines; they change nothing here.
  for (const char* f : {"--trust-remote-code", "--disable-log-requests", "--disable-log-stats",
                        "--disable-uvicorn-access-log", "--disable-frontend-multiprocessing",
                        "--enable-chunked-prefill", "--enable-expert-parallel",
                        "--disable-custom-all-reduce", "--disable-fastapi-docs"}) {
    c->add_flag(
         f, [&a, f](int64_t) { a.ignored.push_back(f); },
         "Accepted for vLLM compatibility (no effect)")
        ->group("Compatibility");
  }
  for (const char* f : {"--uvicorn-log-level", "--swap-space", "--distributed-executor-backend",
                        "--max-seq-len-to-capture", "--max-log-len"}) {
    c->add_option_function<std::string>(
         f, [&a, f](const std::string&) { a.ignored.push_back(f); },
         "Accepted for vLLM compatibility (no effect)")
        ->group("Compatibility");
  }
  return c;
}

namespace {

// The request defaults vLLM takes from the generation config (--generation-config,
// --override-generation-config), checked as a request's would be.
server::SamplingDefaults generation_defaults(const ServeArgs& a,
                                             const std::filesystem::path& model_dir) {
  nlohmann::ordered_json overrides = nlohmann::ordered_json::object();
  if (!a.override_generation_config.empty()) {
    overrides = nlohmann::ordered_json::parse(a.override_generation_config, nullptr, false);
    if (!overrides.is_object()) throw Error("--override-generation-config must be a JSON object");
  }
  nlohmann::ordered_json config = nlohmann::ordered_json::object();
  if (a.generation_config != "vllm") {
    const std::filesystem::path folder =
        a.generation_config == "auto" ? model_dir : std::filesystem::path(a.generation_config);
    if (!std::filesystem::is_directory(folder))
      throw Error(cat("--generation-config: ", folder.string(), " is not a directory"));
    const auto file = folder / "generation_config.json";
    if (std::filesystem::exists(file)) {
      std::ifstream in(file);
      std::stringstream ss;
      ss << in.rdbuf();
      config = nlohmann::ordered_json::parse(ss.str(), nullptr, false);
      if (!config.is_object()) throw Error(cat(file.string(), " is not a JSON object"));
    }
  }
  const server::SamplingDefaults d = server::sampling_defaults(config, overrides);
  runtime::SamplingParams check;
  d.apply(check, true);
  try {
    check.validate();
  } catch (const Error& e) {
    throw Error(cat("generation config: ", e.what()));
  }
  const auto j = d.to_json();
  if (!j.empty()) {
    log::warn(
        "Default sampling parameters have been overridden by the model's Hugging Face "
        "generation config recommended from the model creator. If this is not intended, "
        "please relaunch with `--generation-config vllm`.");
    log::info("Using default sampling params from the generation config: ", j.dump());
  }
  return d;
}

}  // namespace

int run_serve(const ServeArgs& a) {
  // Refuse what is not built, before loading anything.
  auto not_built = [](const std::string& what) {
    throw Error(cat(what, " is not built yet in this version of ernie"));
  };
  if (a.tensor_parallel_size > 1) not_built("--tensor-parallel-size > 1 (tensor parallelism)");
  if (a.pipeline_parallel_size > 1) not_built("--pipeline-parallel-size > 1");
  if (a.data_parallel_size > 1) not_built("--data-parallel-size > 1");
  if (a.cpu_offload_gb > 0) not_built("--cpu-offload-gb (weights in CPU memory)");
  if (a.kv_cache_dtype.rfind("fp8", 0) == 0) not_built("--kv-cache-dtype fp8");
  if (a.enable_auto_tool_choice || !a.tool_call_parser.empty())
    not_built("Tool calling (--enable-auto-tool-choice, --tool-call-parser)");
  if (!a.reasoning_parser.empty()) not_built("--reasoning-parser");
  if (!a.quantization.empty()) {
    if (a.quantization != "fp8")
      throw Error(cat("--quantization '", a.quantization, "' is not supported (choose fp8)"));
    not_built("--quantization fp8");
  }
  if (!a.speculative_config.empty()) {
    auto spec = nlohmann::json::parse(a.speculative_config, nullptr, false);
    if (!spec.is_object()) throw Error("--speculative-config must be a JSON object");
    not_built("--speculative-config (MTP speculative decoding)");
  }
  require(a.gpu_memory_utilization > 0.0 && a.gpu_memory_utilization <= 1.0,
          cat("--gpu-memory-utilization must be in (0, 1], got ", a.gpu_memory_utilization));
  if (!a.tokenizer.empty() && a.tokenizer != a.model)
    not_built("--tokenizer other than the model's");
  for (const auto& f : a.ignored)
    log::info("note: ", f, " is accepted for vLLM compatibility and has no effect");
  std::string api_key = a.api_key;
  if (api_key.empty()) {
    if (const char* env = std::getenv("VLLM_API_KEY")) api_key = env;
  }

  const auto dir = model::resolve_model(a.model, {a.revision, a.download_dir});
  auto cfg = model::load_config(dir);
  const server::SamplingDefaults defaults_sampling = generation_defaults(a, dir);
  log::info("Loading ", a.model, " from ", dir.string(), " (", cfg.num_hidden_layers, " layers, ",
            cfg.num_moe_layers(), " MoE, ", cfg.moe_num_experts, " experts top-", cfg.moe_k,
            ", hidden ", cfg.hidden_size, ")");
  auto tok = tokenizer::Tokenizer::load(dir);
  std::shared_ptr<const tokenizer::ChatTemplate> chat;
  if (!a.chat_template.empty() || !tok->chat_template().empty()) {
    chat = tokenizer::ChatTemplate::for_model(*tok, a.chat_template);
  } else {
    log::warn("the model has no chat template: /v1/chat/completions will refuse requests");
  }
  auto be = make_backend(a.device);
  const auto t0 = std::chrono::steady_clock::now();
  const bool dummy = a.load_format == "dummy";
  model::Ernie45 m(cfg,
                   dummy ? model::dummy_weights(cfg, *be, a.seed)
                         : model::load_weights(cfg, model::Checkpoint(dir), *be),
                   *be);
  log::info(dummy ? "Random (dummy) weights made on " : "Model weights loaded on ", be->name(),
            " in ", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
            " s: ", be->weight_bytes() / 1e9, " GB, activations in ",
            dtype_name(be->activation_dtype()));
  const backend::DeviceSpec spec = be->device_spec();
  const runtime::SchedulingLimits defaults = runtime::serving_defaults(spec);
  runtime::EngineConfig ec;
  ec.block_size = a.block_size;
  ec.max_num_seqs = a.max_num_seqs > 0 ? a.max_num_seqs : defaults.max_num_seqs;
  ec.max_num_batched_tokens =
      a.max_num_batched_tokens > 0 ? a.max_num_batched_tokens : defaults.max_num_batched_tokens;
  ec.max_model_len = a.max_model_len;
  ec.enable_prefix_caching = a.enable_prefix_caching;
  ec.num_blocks_override = a.num_gpu_blocks_override;
  ec.kv_cache_memory = a.kv_cache_memory > 0 ? a.kv_cache_memory : (4ll << 30);
  // An explicit --kv-cache-memory wins over --gpu-memory-utilization, as in vLLM.
  ec.gpu_memory_utilization = a.kv_cache_memory > 0 ? 0.0 : a.gpu_memory_utilization;
  ec.max_logprobs = a.max_logprobs;
  ec.seed = a.seed;
  ec.enforce_eager = a.enforce_eager;
  ec.async_scheduling = a.async_scheduling;
  ec.profile_stages = a.profile_stages;
  runtime::Engine engine(m, tok, ec);
  log::info("KV cache: ", engine.num_kv_blocks(), " blocks of ", ec.block_size, " tokens (",
            engine.kv_capacity_tokens(), " tokens); maximum concurrency for ",
            engine.max_model_len(), " tokens per request: ",
            static_cast<double>(engine.kv_capacity_tokens()) /
                static_cast<double>(engine.max_model_len()),
            "x");
  const bool defaulted = a.max_num_seqs <= 0 || a.max_num_batched_tokens <= 0;
  log::info("max_model_len ", engine.max_model_len(), ", max_num_seqs ", ec.max_num_seqs,
            ", max_num_batched_tokens ", ec.max_num_batched_tokens,
            defaulted && spec.total_memory > 0
                ? cat(" (defaults for ", spec.name, ", ",
                      static_cast<double>(spec.total_memory) / (1ll << 30), " GiB)")
                : std::string(),
            ", prefix caching ", ec.enable_prefix_caching ? "on" : "off");

  server::ApiContext ctx;
  ctx.served_names =
      a.served_model_name.empty() ? std::vector<std::string>{a.model} : a.served_model_name;
  ctx.model_path = dir.string();
  ctx.max_model_len = engine.max_model_len();
  ctx.max_logprobs = a.max_logprobs;
  ctx.defaults = defaults_sampling;
  ctx.prompt_tokens_details = a.prompt_tokens_details;
  ctx.tok = tok;
  ctx.chat_template = chat;
  ctx.engine = &engine;
  ctx.created = std::time(nullptr);
  server::Metrics metrics(ctx.served_names.front());
  server::AsyncEngine async(engine, metrics);
  server::ServerConfig sc;
  sc.host = a.host;
  sc.port = a.port;
  sc.api_key = api_key;
  sc.threads = a.threads;
  sc.version = ERNIE_VERSION;
  sc.log_requests = a.log_requests;
  server::HttpServer http(sc, ctx, async, metrics);
  http.run();
  async.shutdown();
  log::info("server stopped");
  return 0;
}

}  // namespace ernie::cli
