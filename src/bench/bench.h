// `ernie bench serve`: the pieces that do not touch the network, so they are unit-testable:
// vLLM's random dataset, its arrival process, and its metric definitions, result block and
// result JSON.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ernie::bench {

// What a tokenizer must do for prompt generation: local (ours) or the server's /tokenize.
struct TokenizerOps {
  int64_t vocab_size = 0;            // the base vocabulary (no added tokens)
  std::vector<int32_t> special_ids;  // left out of prompts
  std::function<std::string(const std::vector<int32_t>&)> decode;
  std::function<std::vector<int32_t>(const std::string&)> encode;  // no special tokens added
  std::function<std::vector<int32_t>(const std::string&)> encode_special;  // the tokenizer's own
};

struct SampleRequest {
  std::string prompt;
  int64_t prompt_len = 0;
  int64_t expected_output_len = 0;
};

struct RandomDatasetArgs {
  int64_t input_len = 1024;
  int64_t output_len = 128;
  double range_ratio = 0.0;
  int64_t prefix_len = 0;
  int num_prompts = 1000;
  uint64_t seed = 0;
};

// vLLM's RandomDataset: per request an input length and an output length from
// [floor(x(1-r)), ceil(x(1+r))] and a vocabulary offset; tokens allowed[(offset + i + k) % n]
// after an optional shared random prefix; decoded, re-encoded and cut or padded to length
// (at most 10 tries). Throws ernie::Error for impossible arguments.
std::vector<SampleRequest> random_dataset(const TokenizerOps& tok, const RandomDatasetArgs& a,
                                          int64_t* mismatch);

// Python's `random` module (MT19937 seeded by init_by_array from the integer's 32-bit words),
// for the dataset shuffles and draws vLLM makes with it: the same seed gives the same order.
class PyRandom {
 public:
  explicit PyRandom(uint64_t seed) { reseed(seed); }
  void reseed(uint64_t seed);  // random.seed(int)
  uint32_t next32();           // genrand_uint32
  uint64_t randbelow(
      uint64_t n);  // random._randbelow (n < 2^32): getrandbits(bit_length) until < n
  template <typename T>
  void shuffle(std::vector<T>& v) {  // random.shuffle
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[randbelow(i)]);
  }

 private:
  uint32_t mt_[624];
  int index_ = 624;
};

// Datasets read from a file, as vLLM samples them (its --dataset-path options).
struct FileDatasetArgs {
  std::string path;
  int num_prompts = 1000;
  uint64_t seed = 0;
  bool disable_shuffle = false;
  bool no_oversample = false;
  std::optional<int64_t> output_len;  // sharegpt: --sharegpt-output-len; custom: required
};

// vLLM's ShareGPTDataset: a JSON list of {"conversations": [{"value": ...}, ...]} entries with
// two turns or more, shuffled (Python's random, seeded); each entry's first turn is a prompt and
// its second gives the output length (its token count, unless output_len is set); prompts under
// 4 tokens or over 1024, outputs under 4 (unless set) and totals over 2048 are passed over; too
// few left are topped up by seeded random.choice. `encode` counts tokens as
// tokenizer(text).input_ids does (special tokens added).
std::vector<SampleRequest> sharegpt_dataset(
    const FileDatasetArgs& a,
    const std::function<std::vector<int32_t>(const std::string&)>& encode);

// vLLM's CustomDataset: JSON lines with a "prompt" each, shuffled the same way; each prompt put
// through `chat` (the chat template as one user message; identity with --skip-chat-template),
// output_len tokens each (-1: the line's "output_tokens").
std::vector<SampleRequest> custom_dataset(
    const FileDatasetArgs& a, const std::function<std::vector<int32_t>(const std::string&)>& encode,
    const std::function<std::string(const std::string&)>& chat);

// Send times (seconds from the start) as vLLM computes them: 0 for an infinite rate, else gamma
// intervals (shape = burstiness, scale = 1 / (rate * burstiness); burstiness 1 is Poisson)
// accumulated and rescaled so the last request goes out at num / rate.
std::vector<double> arrival_times(int num, double rate, double burstiness, uint64_t seed);

// One request's outcome as the client measured it.
struct RequestOutput {
  bool success = false;
  std::string error;
  std::string generated_text;
  int64_t prompt_len = 0;
  int64_t output_tokens = 0;  // usage.completion_tokens
  double start_time = 0;      // seconds, client clock
  double ttft = 0;            // first chunk with choices
  std::vector<double> itl;    // between successive chunks with choices
  double latency = 0;         // to the last chunk with choices
};

struct MetricSummary {
  double mean = 0, median = 0, stddev = 0;
  std::vector<std::pair<double, double>> percentiles;  // (p, value), ms
};

struct BenchmarkMetrics {
  int completed = 0, failed = 0;
  int64_t total_input = 0, total_output = 0;
  double duration = 0;
  double request_throughput = 0, request_goodput = 0, output_throughput = 0,
         total_token_throughput = 0;
  double max_output_tokens_per_s = 0;
  int max_concurrent_requests = 0;
  MetricSummary ttft, tpot, itl, e2el;  // ms
  std::vector<int64_t> output_lens;
};

// numpy's mean, median, population std and linear-interpolation percentiles (of an empty list:
// zeros, like vLLM's `values or 0`).
MetricSummary summarize(const std::vector<double>& seconds, const std::vector<double>& percentiles);

// vLLM's calculate_metrics. goodput: SLOs in ms for "ttft", "tpot", "e2el".
BenchmarkMetrics calculate_metrics(const std::vector<RequestOutput>& outputs, double duration,
                                   const std::vector<double>& percentiles,
                                   const std::map<std::string, double>& goodput);

struct PrintOptions {
  std::optional<int> max_concurrency;
  double request_rate = std::numeric_limits<double>::infinity();
  std::vector<std::string> percentile_metrics = {"ttft", "tpot", "itl"};
  bool goodput = false;
};

// The result block, label for label as `vllm bench serve` prints it, and the result fields.
std::string format_result(const BenchmarkMetrics& m, const PrintOptions& o,
                          nlohmann::ordered_json& result);

}  // namespace ernie::bench
