// Subcommands of the `ernie` binary: each adds its options to the app and runs.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace ernie::cli {

struct MakeModelArgs {
  std::string preset = "tiny";
  std::string out;
  uint64_t seed = 0;
  bool no_weights = false;
  std::vector<std::string> sets;
};
CLI::App* add_make_model(CLI::App& app, MakeModelArgs& args);
int run_make_model(const MakeModelArgs& args);

struct GenerateArgs {
  std::string model;
  std::vector<std::string> prompt_token_ids;  // one comma-separated list per prompt
  std::vector<std::string> prompts;
  std::vector<std::string> chats;  // one user message each
  std::string system;
  std::string chat_template;
  std::string chat_template_kwargs;
  bool json = false;
  std::string device = "cpu";
  // Sampling (vLLM's SamplingParams names).
  int n = 1;
  int max_tokens = 16;
  int min_tokens = 0;
  float temperature = 1.0f;
  float top_p = 1.0f;
  int top_k = 0;
  float min_p = 0.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  std::optional<uint64_t> seed;
  int logprobs = -1;
  int prompt_logprobs = -2;  // -2: none; else as SamplingParams::prompt_logprobs
  bool ignore_eos = false;
  std::vector<std::string> stop;
  bool skip_special_tokens = true;
  // Engine (vLLM's engine argument names).
  int block_size = 16;
  int max_num_batched_tokens = 8192;
  int max_num_seqs = 256;
  int64_t max_model_len = 0;
  bool no_prefix_caching = false;
  int64_t num_gpu_blocks_override = 0;
  double kv_cache_memory_gib = 1.0;
};
CLI::App* add_generate(CLI::App& app, GenerateArgs& args);
int run_generate(const GenerateArgs& args);

struct ServeArgs {
  std::string model;
  std::string host = "0.0.0.0";
  int port = 8000;
  std::vector<std::string> served_model_name;
  std::string api_key;
  std::string chat_template;
  std::string device = "auto";
  int tensor_parallel_size = 1;
  double gpu_memory_utilization = 0.9;
  std::string quantization;
  std::string speculative_config;
  int pipeline_parallel_size = 1;
  int data_parallel_size = 1;
  double cpu_offload_gb = 0;
  std::string kv_cache_dtype = "auto";
  std::string tool_call_parser;  // --tool-call-parser / --enable-auto-tool-choice: not built
  bool enable_auto_tool_choice = false;
  std::string reasoning_parser;
  int64_t max_model_len = 0;
  int max_num_seqs = 0;            // 0: the device's default (runtime::serving_defaults)
  int max_num_batched_tokens = 0;  // likewise
  bool enable_prefix_caching = true;
  std::string load_format = "auto";
  bool enforce_eager = false;
  bool async_scheduling = true;
  bool profile_stages = false;
  int block_size = 16;
  uint64_t seed = 0;
  int64_t num_gpu_blocks_override = 0;
  int64_t kv_cache_memory = 0;
  int max_logprobs = 20;
  std::string generation_config = "auto";  // auto: the model's; vllm: none; else a folder
  std::string override_generation_config;  // a JSON object over it
  std::string dtype = "auto";
  std::string tokenizer;
  std::string download_dir;
  std::string revision = "main";
  bool log_requests = false;
  bool prompt_tokens_details = false;
  int threads = 4;
  std::vector<std::string> ignored;
};
CLI::App* add_serve(CLI::App& app, ServeArgs& args);
int run_serve(const ServeArgs& args);

struct BenchArgs {
  std::string backend = "openai";
  std::string base_url;
  std::string host = "127.0.0.1";
  int port = 8000;
  std::string endpoint;
  std::string model;
  std::string served_model_name;
  std::string tokenizer;
  std::string dataset_name = "random";
  std::string dataset_path;  // sharegpt (JSON) and custom (JSON lines)
  std::optional<int64_t> sharegpt_output_len;
  int64_t custom_output_len = 256;  // -1: each line's "output_tokens"
  bool skip_chat_template = false;  // custom: send the prompts as they are
  bool disable_shuffle = false;
  bool no_oversample = false;
  int64_t input_len = 1024;
  int64_t output_len = 128;
  double range_ratio = 0.0;
  int64_t prefix_len = 0;
  int num_prompts = 1000;
  double request_rate = std::numeric_limits<double>::infinity();
  double burstiness = 1.0;
  std::optional<int> max_concurrency;
  bool ignore_eos = false;
  int logprobs = -1;
  // Sampling parameters sent with every request (vLLM's: temperature 0, greedy, when not given).
  std::optional<double> top_p, min_p, temperature, frequency_penalty, presence_penalty,
      repetition_penalty;
  std::optional<int> top_k;
  std::string extra_body;  // a JSON object merged into every request, over the above
  std::string percentile_metrics = "ttft,tpot,itl";
  std::string metric_percentiles = "99";
  std::vector<std::string> goodput;
  uint64_t seed = 0;
  bool save_result = false;
  bool save_detailed = false;
  std::string result_dir;
  std::string result_filename;
  std::vector<std::string> metadata;
  std::string label;
  int num_warmups = 0;
  bool disable_tqdm = false;
  int ready_check_timeout_sec = 600;  // wait this long for the server's first answer (0: none)
  std::vector<std::string> ignored;   // vLLM flags accepted with no effect
};
CLI::App* add_bench(CLI::App& app, BenchArgs& args);
int run_bench(const BenchArgs& args);

struct TokenizeArgs {
  std::string model;
  std::string chat_template;
};
CLI::App* add_tokenize(CLI::App& app, TokenizeArgs& args);
int run_tokenize(const TokenizeArgs& args);

struct RooflineArgs {
  std::string model;
  int batch = 1;
  int64_t context = 1000;
  double bandwidth = 3.1e12;  // measured streaming read on the H100
};
CLI::App* add_roofline(CLI::App& app, RooflineArgs& args);
int run_roofline(const RooflineArgs& args);

}  // namespace ernie::cli
