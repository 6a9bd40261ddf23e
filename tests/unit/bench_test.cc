// The bench's metric definitions against hand-computed numpy values, its arrival process, and
// its prompt construction.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "bench/bench.h"
#include "common/check.h"
#include "test_util.h"
#include "tokenizer/synthetic.h"
#include "tokenizer/tokenizer.h"

namespace ernie::bench {
namespace {

TEST(Bench, SummaryMatchesNumpy) {
  // numpy: mean 2.5, median 2.5, std (ddof 0) sqrt(1.25), percentile(99) = 3.97, (25) = 1.75.
  const auto s = summarize({0.001, 0.002, 0.003, 0.004}, {25, 99});
  EXPECT_NEAR(s.mean, 2.5, 1e-9);
  EXPECT_NEAR(s.median, 2.5, 1e-9);
  EXPECT_NEAR(s.stddev, std::sqrt(1.25), 1e-9);
  EXPECT_NEAR(s.percentiles[0].second, 1.75, 1e-9);
  EXPECT_NEAR(s.percentiles[1].second, 3.97, 1e-9);
  const auto empty = summarize({}, {99});
  EXPECT_EQ(empty.mean, 0.0);
  EXPECT_EQ(empty.percentiles[0].second, 0.0);
}

TEST(Bench, MetricsFollowVllmDefinitions) {
  std::vector<RequestOutput> outs(3);
  outs[0] = {true, "", "", 10, 5, 0.0, 0.1, {0.02, 0.02, 0.02, 0.02}, 0.18};
  outs[1] = {true, "", "", 20, 1, 0.5, 0.2, {}, 0.2};  // one token: no TPOT
  outs[2].success = false;
  const auto m = calculate_metrics(outs, 2.0, {50}, {{"ttft", 150}});
  EXPECT_EQ(m.completed, 2);
  EXPECT_EQ(m.failed, 1);
  EXPECT_EQ(m.total_input, 30);
  EXPECT_EQ(m.total_output, 6);
  EXPECT_NEAR(m.request_throughput, 1.0, 1e-12);
  EXPECT_NEAR(m.output_throughput, 3.0, 1e-12);
  EXPECT_NEAR(m.total_token_throughput, 18.0, 1e-12);
  EXPECT_NEAR(m.ttft.mean, 150.0, 1e-9);
  EXPECT_NEAR(m.tpot.mean, 20.0, 1e-9);  // (0.18 - 0.1) / (5 - 1)
  EXPECT_NEAR(m.itl.mean, 20.0, 1e-9);
  EXPECT_NEAR(m.e2el.mean, 190.0, 1e-9);
  EXPECT_NEAR(m.request_goodput, 0.5, 1e-12);  // only the first meets TTFT <= 150 ms
  EXPECT_EQ(m.max_concurrent_requests, 2);  // both are active during second 0 (vLLM 0.33's buckets)
  EXPECT_EQ(m.max_output_tokens_per_s, 6.0);  // all six tokens fall in second 0
  EXPECT_EQ(m.output_lens, (std::vector<int64_t>{5, 1, 0}));
  nlohmann::ordered_json result;
  const std::string block = format_result(m, PrintOptions{}, result);
  EXPECT_NE(block.find("============ Serving Benchmark Result ============"), std::string::npos);
  EXPECT_NE(block.find("Mean TPOT (ms):                          20.00"), std::string::npos)
      << block;
  EXPECT_EQ(result["completed"], 2);
  EXPECT_NEAR(result["p50_ttft_ms"].get<double>(), 150.0, 1e-9);
}

TEST(Bench, ArrivalsAreRescaledToTheRate) {
  for (double burst : {0.5, 1.0, 4.0}) {
    const auto t = arrival_times(50, 10.0, burst, std::random_device{}());
    EXPECT_NEAR(t.back(), 5.0, 1e-9);
    for (size_t i = 1; i < t.size(); ++i) EXPECT_GE(t[i], t[i - 1]);
  }
  const auto all = arrival_times(5, std::numeric_limits<double>::infinity(), 1.0, 0);
  EXPECT_EQ(all, std::vector<double>(5, 0.0));
  EXPECT_THROW(arrival_times(5, 1.0, 0.0, 0), Error);
}

TEST(Bench, PromptsHaveTheRequestedTokenCounts) {
  testing::TempDir d;
  tokenizer::write_synthetic_tokenizer(d.path());
  auto tok = tokenizer::Tokenizer::load(d.path());
  TokenizerOps ops;
  ops.vocab_size = tok->base_vocab_size();
  for (int32_t id = 0; id < tok->vocab_size(); ++id) {
    if (tok->is_special(id)) ops.special_ids.push_back(id);
  }
  ops.decode = [&](const std::vector<int32_t>& ids) { return tok->decode(ids, false); };
  ops.encode = [&](const std::string& s) { return tok->encode(s, false); };
  RandomDatasetArgs a;
  a.input_len = 97;
  a.output_len = 33;
  a.range_ratio = 0.25;
  a.prefix_len = 5;
  a.num_prompts = 20;
  a.seed = std::random_device{}();
  int64_t mismatch = 0;
  const auto reqs = random_dataset(ops, a, &mismatch);
  ASSERT_EQ(reqs.size(), 20u);
  // As in vLLM, a prompt whose decode/re-encode does not settle in 10 tries keeps its length
  // and the mismatch is reported; the reported length is always the real one.
  int in_range = 0;
  for (const auto& r : reqs) {
    EXPECT_EQ(static_cast<int64_t>(tok->encode(r.prompt, false).size()), r.prompt_len);
    in_range += r.prompt_len >= 5 + 72 && r.prompt_len <= 5 + 122;
    EXPECT_GE(r.expected_output_len, 24);
    EXPECT_LE(r.expected_output_len, 42);
  }
  EXPECT_GE(in_range, 14) << "mismatch " << mismatch;
  a.input_len = 0;
  a.prefix_len = 0;
  EXPECT_THROW(random_dataset(ops, a, nullptr), Error);
}

// Reference outputs of CPython's random module (3.11), printed by:
//   random.seed(0); [random.getrandbits(32) for _ in range(3)]
//   random.seed(12345678901); [random.getrandbits(32) for _ in range(2)]
//   random.seed(7); x = list(range(10)); random.shuffle(x)
//   random.seed(3); [random.choice(range(5)) for _ in range(6)]
TEST(Bench, PyRandomFollowsCPython) {
  PyRandom a(0);
  EXPECT_EQ(a.next32(), 3626764237u);
  EXPECT_EQ(a.next32(), 1654615998u);
  EXPECT_EQ(a.next32(), 3255389356u);
  PyRandom b(12345678901ull);  // a seed of two 32-bit words
  EXPECT_EQ(b.next32(), 4063089813u);
  EXPECT_EQ(b.next32(), 2562312935u);
  PyRandom c(7);
  std::vector<int> x = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  c.shuffle(x);
  EXPECT_EQ(x, (std::vector<int>{8, 3, 1, 4, 7, 0, 9, 6, 2, 5}));
  PyRandom d(3);
  std::vector<uint64_t> picks;
  for (int i = 0; i < 6; ++i) picks.push_back(d.randbelow(5));
  EXPECT_EQ(picks, (std::vector<uint64_t>{1, 4, 4, 1, 2, 4}));
}

}  // namespace
}  // namespace ernie::bench
