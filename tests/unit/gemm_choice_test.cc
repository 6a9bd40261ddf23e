// The tuned GEMMs' choice among timed algorithms (cuda::choose_gemm), on the host.
#include <gtest/gtest.h>

#include <limits>
#include <random>
#include <vector>

#include "backend/cuda/gemm_choice.h"

namespace ernie::cuda {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(GemmChoice, KeepsTheDefaultUnlessBeatenByTheMargin) {
  EXPECT_EQ(choose_gemm(10.0, {}, 0.03), -1);
  EXPECT_EQ(choose_gemm(10.0, {kInf, kInf}, 0.03), -1);
  EXPECT_EQ(choose_gemm(10.0, {9.8, 9.75}, 0.03), -1);  // 2.5% is within the margin
  EXPECT_EQ(choose_gemm(10.0, {9.8, 9.6}, 0.03), 1);
  EXPECT_EQ(choose_gemm(10.0, {9.71, 9.8}, 0.03), -1);  // 2.9% is not enough
  EXPECT_EQ(choose_gemm(10.0, {9.69, 9.8}, 0.03), 0);
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

TEST(GemmChoice, IsTheOldRule) {
  std::mt19937 gen(std::random_device{}());
  std::uniform_real_distribution<double> u(0.85, 1.1);
  std::uniform_int_distribution<int> n(0, 16), refused(0, 5);
  for (int i = 0; i < 5000; ++i) {
    std::vector<double> t(n(gen));
    for (double& v : t) v = refused(gen) == 0 ? kInf : 10.0 * u(gen);
    // Exact repeats too: the first of equal times wins in both.
    if (t.size() >= 2 && i % 7 == 0) t.back() = t.front();
    ASSERT_EQ(choose_gemm(10.0, t, 0.03), sequential_choice(10.0, t)) << "case " << i;
  }
}

}  // namespace
}  // namespace ernie::cuda
