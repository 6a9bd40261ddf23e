// The reference sampler, checked statistically with fixed seeds.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "backend/cpu/sampler.h"
#include "common/rng.h"

namespace ernie::backend::cpu {
namespace {

std::vector<float> random_logits(Rng& rng, int n, double scale) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.normal());
  return v;
}

std::vector<double> softmax(const std::vector<float>& x, double t) {
  double mx = *std::max_element(x.begin(), x.end()), s = 0;
  std::vector<double> p(x.size());
  for (size_t i = 0; i < x.size(); ++i) s += p[i] = std::exp((x[i] - mx) / t);
  for (auto& v : p) v /= s;
  return p;
}

// Empirical frequencies of `draws` samples at positions 0..draws-1 of one seed.
std::vector<double> frequencies(const std::vector<float>& logits, SamplingRow row, int draws) {
  std::vector<double> f(logits.size(), 0.0);
  for (int i = 0; i < draws; ++i) {
    row.position = i;
    ++f[sample_row(logits, row).id];
  }
  for (auto& v : f) v /= draws;
  return f;
}

TEST(Sampler, MatchesTheTemperatureDistribution) {
  Rng rng(std::random_device{}());
  const auto logits = random_logits(rng, 12, 1.5);
  for (float t : {0.5f, 1.0f, 2.0f}) {
    SamplingRow row;
    row.temperature = t;
    row.seed = 1234;
    const auto f = frequencies(logits, row, 40000);
    const auto p = softmax(logits, t);
    for (size_t i = 0; i < p.size(); ++i) {
      // 5 standard deviations of a binomial proportion.
      EXPECT_NEAR(f[i], p[i], 5 * std::sqrt(p[i] * (1 - p[i]) / 40000) + 1e-4)
          << "t=" << t << " id " << i;
    }
  }
}

TEST(Sampler, TopKTopPMinPRestrictTheSupport) {
  Rng rng(std::random_device{}());
  const auto logits = random_logits(rng, 30, 1.0);
  const auto p = softmax(logits, 1.0);
  std::vector<int> order(p.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
  SamplingRow row;
  row.seed = 99;
  row.top_k = 3;
  auto f = frequencies(logits, row, 20000);
  double mass = p[order[0]] + p[order[1]] + p[order[2]];
  for (int r = 0; r < 30; ++r) {
    const int id = order[r];
    if (r < 3)
      EXPECT_NEAR(f[id], p[id] / mass, 0.02);
    else
      EXPECT_EQ(f[id], 0.0) << "rank " << r;
  }
  row.top_k = 0;
  row.top_p = 0.5f;
  f = frequencies(logits, row, 20000);
  double acc = 0;
  for (int r = 0; r < 30; ++r) {
    const int id = order[r];
    const bool inside = acc < 0.5;  // the nucleus: smallest prefix reaching 0.5
    acc += p[id];
    if (!inside)
      EXPECT_EQ(f[id], 0.0) << "rank " << r << " outside the nucleus";
    else
      EXPECT_GT(f[id], 0.0) << "rank " << r << " inside the nucleus";
  }
  row.top_p = 1.0f;
  row.min_p = 0.3f;
  f = frequencies(logits, row, 20000);
  for (size_t id = 0; id < p.size(); ++id) {
    if (p[id] < 0.3 * p[order[0]]) {
      EXPECT_EQ(f[id], 0.0) << id;
    }
  }
}

TEST(Sampler, GreedyBiasBannedPenaltiesAndLogprobs) {
  Rng rng(std::random_device{}());
  const auto logits = random_logits(rng, 20, 2.0);
  const int best =
      static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  SamplingRow row;
  row.temperature = 0.0f;
  row.num_logprobs = 3;
  auto t = sample_row(logits, row);
  EXPECT_EQ(t.id, best);
  EXPECT_EQ(t.rank, 1);
  const auto p = softmax(logits, 1.0);
  EXPECT_NEAR(t.logprob, std::log(p[best]), 1e-5);
  ASSERT_EQ(t.top.size(), 3u);
  EXPECT_EQ(t.top[0].id, best);
  EXPECT_GE(t.top[0].logprob, t.top[1].logprob);
  // Logit bias moves the choice; logprobs stay those of the raw logits.
  const int other = (best + 1) % 20;
  std::vector<std::pair<int32_t, float>> bias = {{other, 100.0f}};
  row.logit_bias = &bias;
  t = sample_row(logits, row);
  EXPECT_EQ(t.id, other);
  EXPECT_NEAR(t.logprob, std::log(p[other]), 1e-5);
  EXPECT_GT(t.rank, 1);
  row.logit_bias = nullptr;
  row.banned = {best};
  EXPECT_NE(sample_row(logits, row).id, best);
  row.banned.clear();
  // A repetition penalty on the best token's history moves greedy away from it.
  std::vector<int32_t> history(1, best);
  row.output_tokens = &history;
  row.repetition_penalty = 1e4f;
  if (logits[best] > 0) {
    EXPECT_NE(sample_row(logits, row).id, best);
  }
  row.repetition_penalty = 1.0f;
  row.frequency_penalty = 2.0f;
  std::vector<int32_t> many(1000, best);
  row.output_tokens = &many;
  EXPECT_NE(sample_row(logits, row).id, best);
}

TEST(Sampler, DrawsDependOnlyOnSeedAndPosition) {
  Rng rng(std::random_device{}());
  const auto logits = random_logits(rng, 50, 0.5);
  SamplingRow a;
  a.seed = 5;
  a.position = 17;
  const int32_t first = sample_row(logits, a).id;
  for (int i = 0; i < 5; ++i) EXPECT_EQ(sample_row(logits, a).id, first);
  int differs = 0;
  for (int pos = 0; pos < 50; ++pos) {
    a.position = pos;
    differs += sample_row(logits, a).id != first;
  }
  EXPECT_GT(differs, 0);
}

}  // namespace
}  // namespace ernie::backend::cpu
