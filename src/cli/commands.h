// Subcommands of the `ernie` binary: each adds its options to the app and runs.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
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
  bool skip_special_tokens = true;
  int max_tokens = 16;
  float temperature = 1.0f;
  uint64_t seed = 0;
  int logprobs = 0;
  bool json = false;
  bool ignore_eos = false;
  int block_size = 16;
  int max_num_batched_tokens = 8192;
  std::string device = "cpu";
};
CLI::App* add_generate(CLI::App& app, GenerateArgs& args);
int run_generate(const GenerateArgs& args);

struct TokenizeArgs {
  std::string model;
  std::string chat_template;
};
CLI::App* add_tokenize(CLI::App& app, TokenizeArgs& args);
int run_tokenize(const TokenizeArgs& args);

}  // namespace ernie::cli
