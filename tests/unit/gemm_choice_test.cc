// The tuned GEMMs' choice among timed algorithms (cuda::choose_gemm), on the host.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <random>
#include <vector>

#include "backend/cuda/gemm_choice.h"

namespace ernie::cuda {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(GemmChoice, KeepsTheDefaultUnlessBeatenByTheMargin) {
  EXPECT_EQ(choose_gemm(10.0, {}, 0.03, 0.0), -1);
  EXPECT_EQ(choose_gemm(10.0, {kInf, kInf}, 0.03, 0.0), -1);
  EXPECT_EQ(choose_gemm(10.0, {9.8, 9.75}, 0.03, 0.0), -1);  // 2.5% is within the margin
  EXPECT_EQ(choose_gemm(10.0, {9.8, 9.6}, 0.03, 0.0), 1);
  EXPECT_EQ(choose_gemm(10.0, {9.71, 9.8}, 0.03, 0.0), -1);  // 2.9% is not enough
  EXPECT_EQ(choose_gemm(10.0, {9.69, 9.8}, 0.03, 0.0), 0);
}

TEST(GemmChoice, NearTiesGoToTheHeuristicsFirst) {
  // Without a tie band the fastest wins by any amount; with 1% the first within 1% of it.
  const std::vector<double> t = {8.05, kInf, 8.0, 8.2};
  EXPECT_EQ(choose_gemm(10.0, t, 0.03, 0.0), 2);
  EXPECT_EQ(choose_gemm(10.0, t, 0.03, 0.01), 0);
  EXPECT_EQ(choose_gemm(10.0, t, 0.03, 0.005), 2);
  EXPECT_EQ(choose_gemm(10.0, t, 0.03, 0.03), 0);
}

// The old rule, as the tuner applied it candidate by candidate before choose_gemm: a candidate
// replaced the default when 3% faster, an earlier candidate when faster at all.
int sequential_choice(double default_ms, const std::vector<double>& times) {
  double best = default_ms;
  int chosen = -1;
  for (size_t c = 0; c < times.size(); ++c) {
    if (times[c] < best * (chosen < 0 ? 0.97 : 1.0)) {
      best = times[c];
      chosen = static_cast<int>(c);
    }
  }
  return chosen;
}

TEST(GemmChoice, WithoutATieBandItIsTheOldRule) {
  std::mt19937 gen(std::random_device{}());
  std::uniform_real_distribution<double> u(0.85, 1.1);
  std::uniform_int_distribution<int> n(0, 16), refused(0, 5);
  for (int i = 0; i < 5000; ++i) {
    std::vector<double> t(n(gen));
    for (double& v : t) v = refused(gen) == 0 ? kInf : 10.0 * u(gen);
    // Exact repeats too: the first of equal times wins in both.
    if (t.size() >= 2 && i % 7 == 0) t.back() = t.front();
    ASSERT_EQ(choose_gemm(10.0, t, 0.03, 0.0), sequential_choice(10.0, t)) << "case " << i;
  }
}

TEST(GemmChoice, TheKeptCandidateIsWithinTheBandOfTheFastest) {
  std::mt19937 gen(std::random_device{}());
  std::uniform_real_distribution<double> u(0.8, 1.05);
  for (int i = 0; i < 2000; ++i) {
    std::vector<double> t(1 + i % 16);
    for (double& v : t) v = 10.0 * u(gen);
    const double tie = 0.001 * (i % 30);
    const int c = choose_gemm(10.0, t, 0.03, tie);
    double best = kInf;
    for (double v : t) best = std::min(best, v);
    if (best >= 9.7) {
      ASSERT_EQ(c, -1);
      continue;
    }
    ASSERT_GE(c, 0);
    ASSERT_LE(t[c], best * (1.0 + tie));
    for (int j = 0; j < c; ++j) ASSERT_GT(t[j], best * (1.0 + tie)) << "an earlier one is tied";
  }
}

}  // namespace
}  // namespace ernie::cuda
