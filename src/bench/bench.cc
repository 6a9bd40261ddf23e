#include "bench/bench.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <set>
#include <sstream>

#include "common/check.h"

namespace ernie::bench {

void PyRandom::reseed(uint64_t seed) {
  std::vector<uint32_t> key;
  do {
    key.push_back(static_cast<uint32_t>(seed));
    seed >>= 32;
  } while (seed != 0);
  mt_[0] = 19650218u;
  for (uint32_t i = 1; i < 624; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + i;
  uint32_t i = 1, j = 0;
  for (size_t k = std::max<size_t>(624, key.size()); k > 0; --k) {
    mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1664525u)) + key[j] + j;
    ++i;
    ++j;
    if (i >= 624) {
      mt_[0] = mt_[623];
      i = 1;
    }
    if (j >= key.size()) j = 0;
  }
  for (size_t k = 623; k > 0; --k) {
    mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1566083941u)) - i;
    ++i;
    if (i >= 624) {
      mt_[0] = mt_[623];
      i = 1;
    }
  }
  mt_[0] = 0x80000000u;
  index_ = 624;
}

uint32_t PyRandom::next32() {
  if (index_ >= 624) {
    for (int k = 0; k < 624; ++k) {
      const uint32_t y = (mt_[k] & 0x80000000u) | (mt_[(k + 1) % 624] & 0x7fffffffu);
      mt_[k] = mt_[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    index_ = 0;
  }
  uint32_t y = mt_[index_++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

uint64_t PyRandom::randbelow(uint64_t n) {
  require(n > 0 && n < (uint64_t{1} << 32), "randbelow: n must be in [1, 2^32)");
  int bits = 0;
  while ((n >> bits) != 0) ++bits;  // n.bit_length(): getrandbits(bits) is one word's top bits
  for (;;) {
    const uint64_t r = next32() >> (32 - bits);
    if (r < n) return r;
  }
}

namespace {

// What vLLM's is_valid_sequence passes over (its defaults).
bool valid_lengths(int64_t prompt_len, int64_t output_len, bool check_output) {
  return prompt_len >= 4 && (!check_output || output_len >= 4) && prompt_len <= 1024 &&
         prompt_len + output_len <= 2048;
}

// vLLM's maybe_oversample_requests: too few samples are topped up with random.choice after
// random.seed(seed).
void oversample(std::vector<SampleRequest>& samples, const FileDatasetArgs& a) {
  if (a.no_oversample || static_cast<int>(samples.size()) >= a.num_prompts) return;
  if (samples.empty()) throw Error(cat(a.path, ": no usable samples in the dataset"));
  PyRandom rng(a.seed);
  const size_t have = samples.size();
  while (static_cast<int>(samples.size()) < a.num_prompts)
    samples.push_back(samples[rng.randbelow(have)]);
}

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(cat("cannot read the dataset ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded()) throw Error(cat(path, " is not valid JSON"));
  return j;
}

}  // namespace

std::vector<SampleRequest> sharegpt_dataset(
    const FileDatasetArgs& a,
    const std::function<std::vector<int32_t>(const std::string&)>& encode) {
  if (a.output_len && *a.output_len < 1) throw Error("--sharegpt-output-len must be at least 1");
  const nlohmann::json data = read_json_file(a.path);
  if (!data.is_array()) throw Error(cat(a.path, ": a ShareGPT dataset is a JSON list"));
  std::vector<const nlohmann::json*> entries;
  for (const auto& e : data) {
    if (e.is_object() && e.contains("conversations") && e["conversations"].is_array() &&
        e["conversations"].size() >= 2)
      entries.push_back(&e);
  }
  PyRandom rng(a.seed);
  if (!a.disable_shuffle) rng.shuffle(entries);
  std::vector<SampleRequest> out;
  for (const nlohmann::json* e : entries) {
    if (static_cast<int>(out.size()) >= a.num_prompts) break;
    const auto& turns = (*e)["conversations"];
    auto text = [&](int t) {
      if (!turns[t].is_object() || !turns[t].contains("value") || !turns[t]["value"].is_string())
        throw Error(cat(a.path, ": a conversation turn without a string \"value\""));
      return turns[t]["value"].get<std::string>();
    };
    SampleRequest r;
    r.prompt = text(0);
    r.prompt_len = static_cast<int64_t>(encode(r.prompt).size());
    r.expected_output_len =
        a.output_len ? *a.output_len : static_cast<int64_t>(encode(text(1)).size());
    if (!valid_lengths(r.prompt_len, r.expected_output_len, !a.output_len)) continue;
    out.push_back(std::move(r));
  }
  oversample(out, a);
  return out;
}

std::vector<SampleRequest> custom_dataset(
    const FileDatasetArgs& a, const std::function<std::vector<int32_t>(const std::string&)>& encode,
    const std::function<std::string(const std::string&)>& chat) {
  if (a.path.size() < 6 || a.path.substr(a.path.size() - 6) != ".jsonl")
    throw Error("Only JSONL format is supported for CustomDataset.");
  require(a.output_len.has_value(), "custom_dataset: an output length (or -1)");
  if (*a.output_len == 0 || *a.output_len < -1)
    throw Error("--custom-output-len must be at least 1, or -1");
  std::ifstream in(a.path);
  if (!in) throw Error(cat("cannot read the dataset ", a.path));
  std::vector<nlohmann::json> rows;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("prompt") || !j["prompt"].is_string())
      throw Error(
          cat(a.path, ":", n, ": each line must be a JSON object with a string \"prompt\""));
    if (*a.output_len < 0 && !(j.contains("output_tokens") &&
                               j["output_tokens"].is_number_integer() && j["output_tokens"] >= 1))
      throw Error(cat(a.path, ":", n,
                      ": --custom-output-len -1 takes each line's \"output_tokens\" (at least 1)"));
    rows.push_back(std::move(j));
  }
  PyRandom rng(a.seed);
  if (!a.disable_shuffle) rng.shuffle(rows);
  std::vector<SampleRequest> out;
  for (const auto& row : rows) {
    if (static_cast<int>(out.size()) >= a.num_prompts) break;
    SampleRequest r;
    r.prompt = chat(row["prompt"].get<std::string>());
    r.prompt_len = static_cast<int64_t>(encode(r.prompt).size());
    r.expected_output_len =
        *a.output_len >= 0 ? *a.output_len : row["output_tokens"].get<int64_t>();
    out.push_back(std::move(r));
  }
  oversample(out, a);
  return out;
}

std::vector<SampleRequest> random_dataset(const TokenizerOps& tok, const RandomDatasetArgs& a,
                                          int64_t* mismatch) {
  if (!(a.range_ratio >= 0.0 && a.range_ratio < 1.0))
    throw Error("--random-range-ratio must be in [0, 1)");
  if (a.input_len < 0 || a.output_len < 1 || a.prefix_len < 0) {
    throw Error(
        "--random-input-len and --random-prefix-len must be >= 0 and --random-output-len >= 1");
  }
  if (a.num_prompts < 1) throw Error("--num-prompts must be at least 1");
  const int64_t in_low = static_cast<int64_t>(std::floor(a.input_len * (1 - a.range_ratio)));
  const int64_t in_high = static_cast<int64_t>(std::ceil(a.input_len * (1 + a.range_ratio)));
  const int64_t out_low =
      std::max<int64_t>(1, static_cast<int64_t>(std::floor(a.output_len * (1 - a.range_ratio))));
  const int64_t out_high =
      std::max<int64_t>(1, static_cast<int64_t>(std::ceil(a.output_len * (1 + a.range_ratio))));
  if (a.prefix_len + in_low < 1) {
    throw Error(
        "--random-input-len is too small: the shortest prompt would have no tokens; raise it or "
        "--random-prefix-len, or lower --random-range-ratio");
  }
  std::set<int32_t> special(tok.special_ids.begin(), tok.special_ids.end());
  std::vector<int32_t> allowed;
  for (int64_t t = 0; t < tok.vocab_size; ++t) {
    if (!special.count(static_cast<int32_t>(t))) allowed.push_back(static_cast<int32_t>(t));
  }
  if (allowed.empty()) throw Error("the tokenizer has no ordinary tokens to build prompts from");
  std::mt19937_64 rng(a.seed);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  std::vector<int64_t> in_lens, out_lens, offsets;
  for (int i = 0; i < a.num_prompts; ++i) in_lens.push_back(uniform(in_low, in_high));
  for (int i = 0; i < a.num_prompts; ++i) out_lens.push_back(uniform(out_low, out_high));
  for (int i = 0; i < a.num_prompts; ++i) offsets.push_back(uniform(0, tok.vocab_size - 1));
  std::vector<int32_t> prefix;
  for (int64_t i = 0; i < a.prefix_len; ++i)
    prefix.push_back(allowed[uniform(0, static_cast<int64_t>(allowed.size()) - 1)]);
  std::vector<SampleRequest> out;
  int64_t total_mismatch = 0;
  const int64_t n_allowed = static_cast<int64_t>(allowed.size());
  for (int i = 0; i < a.num_prompts; ++i) {
    std::vector<int32_t> seq = prefix;
    for (int64_t k = 0; k < in_lens[i]; ++k)
      seq.push_back(allowed[(offsets[i] + i + k) % n_allowed]);
    const int64_t target = a.prefix_len + in_lens[i];
    // Decode, re-encode, and pad or truncate until the token count is right (10 tries).
    std::string prompt;
    int tries = 10;
    while (true) {
      prompt = tok.decode(seq);
      seq = tok.encode(prompt);
      const int64_t n = static_cast<int64_t>(seq.size());
      if (tries <= 0) {
        total_mismatch += n - target;
        break;
      }
      if (n == target) break;
      if (n < target) {
        for (int64_t k = n; k < target; ++k)
          seq.push_back(static_cast<int32_t>(uniform(0, tok.vocab_size - 1)));
      } else {
        seq.resize(target);
      }
      --tries;
    }
    out.push_back({prompt, static_cast<int64_t>(seq.size()), out_lens[i]});
  }
  if (mismatch) *mismatch = total_mismatch;
  return out;
}

std::vector<double> arrival_times(int num, double rate, double burstiness, uint64_t seed) {
  require(burstiness > 0, "--burstiness must be positive");
  require(rate > 0, "--request-rate must be positive");
  std::vector<double> t(num, 0.0);
  if (std::isinf(rate)) return t;
  std::mt19937_64 rng(seed);
  for (int i = 0; i < num; ++i) {
    double d;
    if (std::isinf(burstiness)) {
      d = 1.0 / rate;
    } else {
      std::gamma_distribution<double> g(burstiness, 1.0 / (rate * burstiness));
      d = g(rng);
    }
    t[i] = (i ? t[i - 1] : 0.0) + d;
  }
  if (num > 0 && t.back() > 0) {
    const double scale = (num / rate) / t.back();
    for (auto& x : t) x *= scale;
  }
  return t;
}

namespace {

double percentile(std::vector<double> v, double p) {
  // numpy's default "linear" method.
  std::sort(v.begin(), v.end());
  const double pos = (static_cast<double>(v.size()) - 1) * p / 100.0;
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

}  // namespace

MetricSummary summarize(const std::vector<double>& seconds,
                        const std::vector<double>& percentiles) {
  MetricSummary s;
  std::vector<double> v = seconds.empty() ? std::vector<double>{0.0} : seconds;
  const double n = static_cast<double>(v.size());
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  s.mean = mean * 1000;
  s.stddev = std::sqrt(var / n) * 1000;
  s.median = percentile(v, 50) * 1000;
  for (double p : percentiles) s.percentiles.emplace_back(p, percentile(v, p) * 1000);
  return s;
}

BenchmarkMetrics calculate_metrics(const std::vector<RequestOutput>& outputs, double duration,
                                   const std::vector<double>& percentiles,
                                   const std::map<std::string, double>& goodput) {
  BenchmarkMetrics m;
  m.duration = duration;
  std::vector<double> ttfts, tpots, all_tpots, itls, e2els;
  for (const auto& o : outputs) {
    if (!o.success) {
      m.output_lens.push_back(0);
      ++m.failed;
      continue;
    }
    const int64_t out = o.output_tokens > 0 ? o.output_tokens : 1;
    m.output_lens.push_back(out);
    m.total_input += o.prompt_len;
    double tpot = 0;
    if (out > 1) {
      tpot = (o.latency - o.ttft) / static_cast<double>(out - 1);
      tpots.push_back(tpot);
    }
    all_tpots.push_back(tpot);
    itls.insert(itls.end(), o.itl.begin(), o.itl.end());
    ttfts.push_back(o.ttft);
    e2els.push_back(o.latency);
    ++m.completed;
  }
  int good = 0;
  if (!goodput.empty()) {
    for (size_t i = 0; i < ttfts.size(); ++i) {
      bool ok = true;
      if (auto it = goodput.find("ttft"); it != goodput.end()) ok &= it->second / 1000 >= ttfts[i];
      if (auto it = goodput.find("tpot"); it != goodput.end())
        ok &= it->second / 1000 >= all_tpots[i];
      if (auto it = goodput.find("e2el"); it != goodput.end()) ok &= it->second / 1000 >= e2els[i];
      good += ok;
    }
  }
  for (int64_t n : m.output_lens) m.total_output += n;
  m.request_throughput = m.completed / duration;
  m.request_goodput = good / duration;
  m.output_throughput = m.total_output / duration;
  m.total_token_throughput = (m.total_input + m.total_output) / duration;
  m.ttft = summarize(ttfts, percentiles);
  m.tpot = summarize(tpots, percentiles);
  m.itl = summarize(itls, percentiles);
  m.e2el = summarize(e2els, percentiles);
  // Peak output tokens and peak concurrent requests per one-second bucket, as the released
  // vLLM (0.33) computes them: a request counts in every second from its start to its end,
  // both included.
  double t0 = std::numeric_limits<double>::infinity(), t1 = 0;
  for (const auto& o : outputs) {
    if (!o.success) continue;
    t0 = std::min(t0, o.start_time);
    t1 = std::max(t1, o.start_time + o.latency);
  }
  if (m.completed > 0) {
    const size_t buckets = static_cast<size_t>(std::ceil(t1 - t0)) + 1;
    std::vector<double> tokens(buckets, 0.0), concurrent(buckets, 0.0);
    for (const auto& o : outputs) {
      if (!o.success) continue;
      double t = o.start_time + o.ttft;
      auto add = [&](double ts) {
        const long b = static_cast<long>(ts - t0);
        if (b >= 0 && static_cast<size_t>(b) < buckets) tokens[b] += 1;
      };
      add(t);
      for (double d : o.itl) add(t += d);
      const long first = static_cast<long>(o.start_time - t0),
                 last = static_cast<long>(o.start_time + o.latency - t0);
      for (long sec = first; sec <= last && static_cast<size_t>(sec) < buckets; ++sec)
        concurrent[sec] += 1;
    }
    m.max_output_tokens_per_s = *std::max_element(tokens.begin(), tokens.end());
    m.max_concurrent_requests =
        static_cast<int>(*std::max_element(concurrent.begin(), concurrent.end()));
  }
  return m;
}

namespace {

std::string line(const std::string& label, const std::string& value) {
  char b[256];
  std::snprintf(b, sizeof b, "%-40s %-10s\n", label.c_str(), value.c_str());
  return b;
}
std::string f2(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.2f", v);
  return b;
}
std::string banner(const std::string& s, char fill) {
  const size_t n = 50;
  if (s.size() >= n) return s + "\n";
  const size_t left = (n - s.size()) / 2, right = n - s.size() - left;
  return std::string(left, fill) + s + std::string(right, fill) + "\n";
}
std::string pword(double p) {
  if (p == std::floor(p)) return std::to_string(static_cast<long long>(p));
  char b[32];
  std::snprintf(b, sizeof b, "%g", p);
  return b;
}

}  // namespace

std::string format_result(const BenchmarkMetrics& m, const PrintOptions& o,
                          nlohmann::ordered_json& result) {
  std::string out = banner(" Serving Benchmark Result ", '=');
  out += line("Successful requests:", std::to_string(m.completed));
  out += line("Failed requests:", std::to_string(m.failed));
  if (o.max_concurrency)
    out += line("Maximum request concurrency:", std::to_string(*o.max_concurrency));
  if (!std::isinf(o.request_rate))
    out += line("Request rate configured (RPS):", f2(o.request_rate));
  out += line("Benchmark duration (s):", f2(m.duration));
  out += line("Total input tokens:", std::to_string(m.total_input));
  out += line("Total generated tokens:", std::to_string(m.total_output));
  out += line("Request throughput (req/s):", f2(m.request_throughput));
  if (o.goodput) out += line("Request goodput (req/s):", f2(m.request_goodput));
  out += line("Output token throughput (tok/s):", f2(m.output_throughput));
  out += line("Peak output token throughput (tok/s):", f2(m.max_output_tokens_per_s));
  out += line("Peak concurrent requests:", f2(m.max_concurrent_requests));
  out += line("Total token throughput (tok/s):", f2(m.total_token_throughput));
  result["duration"] = m.duration;
  result["completed"] = m.completed;
  result["failed"] = m.failed;
  result["total_input_tokens"] = m.total_input;
  result["total_output_tokens"] = m.total_output;
  result["request_throughput"] = m.request_throughput;
  result["request_goodput"] =
      o.goodput ? nlohmann::ordered_json(m.request_goodput) : nlohmann::ordered_json(nullptr);
  result["output_throughput"] = m.output_throughput;
  result["total_token_throughput"] = m.total_token_throughput;
  result["max_output_tokens_per_s"] = m.max_output_tokens_per_s;
  result["max_concurrent_requests"] = m.max_concurrent_requests;
  auto metric = [&](const char* key, const char* name, const char* header, const MetricSummary& s) {
    if (std::find(o.percentile_metrics.begin(), o.percentile_metrics.end(), key) ==
        o.percentile_metrics.end())
      return;
    out += banner(header, '-');
    out += line(cat("Mean ", name, " (ms):"), f2(s.mean));
    out += line(cat("Median ", name, " (ms):"), f2(s.median));
    result[cat("mean_", key, "_ms")] = s.mean;
    result[cat("median_", key, "_ms")] = s.median;
    result[cat("std_", key, "_ms")] = s.stddev;
    for (const auto& [p, v] : s.percentiles) {
      out += line(cat("P", pword(p), " ", name, " (ms):"), f2(v));
      result[cat("p", pword(p), "_", key, "_ms")] = v;
    }
  };
  metric("ttft", "TTFT", "Time to First Token", m.ttft);
  metric("tpot", "TPOT", "Time per Output Token (excl. 1st token)", m.tpot);
  metric("itl", "ITL", "Inter-token Latency", m.itl);
  metric("e2el", "E2EL", "End-to-end Latency", m.e2el);
  out += std::string(50, '=') + "\n";
  return out;
}

}  // namespace ernie::bench
