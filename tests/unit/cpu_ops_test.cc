#include <gtest/gtest.h>

#include <random>

#include <cmath>
#include <numeric>

#include "backend/cpu/ops.h"
#include "common/dtype.h"
#include "common/rng.h"

namespace ernie::backend::cpu {
namespace {

std::vector<float> randn(Rng& rng, size_t n, double scale = 1.0) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.normal());
  return v;
}

TEST(CpuOps, GemmMatchesDoubleReference) {
  Rng rng(std::random_device{}());
  for (auto [m, n, k] : {std::tuple{1, 1, 1}, {3, 7, 5}, {9, 33, 130}, {17, 64, 257}}) {
    auto x = randn(rng, m * k), w = randn(rng, n * k);
    std::vector<float> out(m * n, std::nanf(""));
    gemm_xwt(out.data(), x.data(), w.data(), m, n, k);
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < n; ++j) {
        double ref = 0;
        for (int t = 0; t < k; ++t) ref += static_cast<double>(x[i * k + t]) * w[j * k + t];
        EXPECT_NEAR(out[i * n + j], ref, 1e-5 * std::sqrt(k) * 4) << m << "x" << n << "x" << k;
      }
    }
  }
}

TEST(CpuOps, RmsNorm) {
  Rng rng(std::random_device{}());
  const int rows = 3, h = 37;
  auto x = randn(rng, rows * h, 3.0), w = randn(rng, h);
  std::vector<float> out(rows * h, std::nanf(""));
  rms_norm(out.data(), x.data(), w.data(), rows, h, 1e-5f);
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    for (int i = 0; i < h; ++i) ss += double(x[r * h + i]) * x[r * h + i];
    const double inv = 1.0 / std::sqrt(ss / h + 1e-5);
    for (int i = 0; i < h; ++i) EXPECT_NEAR(out[r * h + i], w[i] * x[r * h + i] * inv, 1e-5);
  }
}

TEST(CpuOps, SiluMul) {
  Rng rng(std::random_device{}());
  const int rows = 2, inter = 5;
  auto gu = randn(rng, rows * 2 * inter, 2.0);
  std::vector<float> out(rows * inter, std::nanf(""));
  silu_mul(out.data(), gu.data(), rows, inter);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < inter; ++i) {
      const double g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
      EXPECT_NEAR(out[r * inter + i], g / (1 + std::exp(-g)) * u, 1e-5);
    }
  }
}

// Interleaved pairs (GPT-J style), not the NeoX half split.
TEST(CpuOps, RopeRotatesInterleavedPairs) {
  Rng rng(std::random_device{}());
  const int heads = 2, d = 8;
  const double theta = 500000.0;
  auto x = randn(rng, heads * d);
  auto y = x;
  const int64_t pos = 37;
  rope_interleaved(y.data(), heads, d, pos, theta);
  for (int h = 0; h < heads; ++h) {
    for (int j = 0; j < d / 2; ++j) {
      const double a = pos * std::pow(theta, -2.0 * j / d);
      const double x0 = x[h * d + 2 * j], x1 = x[h * d + 2 * j + 1];
      EXPECT_NEAR(y[h * d + 2 * j], x0 * std::cos(a) - x1 * std::sin(a), 1e-4);
      EXPECT_NEAR(y[h * d + 2 * j + 1], x1 * std::cos(a) + x0 * std::sin(a), 1e-4);
    }
  }
  auto z = x;
  rope_interleaved(z.data(), heads, d, 0, theta);
  EXPECT_EQ(z, x);  // position 0 is the identity
}

TEST(CpuOps, RouteTokenBiasSelectsButDoesNotWeigh) {
  Rng rng(std::random_device{}());
  const int e = 12, k = 3;
  auto logits = randn(rng, e, 2.0);
  std::vector<float> bias(e, 0.0f);
  // Push the least likely expert into the selection with the bias.
  const int low = static_cast<int>(std::min_element(logits.begin(), logits.end()) - logits.begin());
  bias[low] = 10.0f;
  std::vector<int32_t> ids(k);
  std::vector<float> w(k);
  route_token(logits.data(), bias.data(), e, k, 1e-12f, ids.data(), w.data());
  EXPECT_EQ(ids[0], low);
  // Weights: unbiased softmax probabilities of the chosen experts, renormalised.
  double z = 0;
  for (float l : logits) z += std::exp(double(l));
  double chosen = 0;
  for (int i = 0; i < k; ++i) chosen += std::exp(double(logits[ids[i]])) / z;
  for (int i = 0; i < k; ++i)
    EXPECT_NEAR(w[i], std::exp(double(logits[ids[i]])) / z / chosen, 1e-6);
  EXPECT_NEAR(std::accumulate(w.begin(), w.end(), 0.0), 1.0, 1e-6);
  // The other two are the top-2 of the unbiased scores among the rest.
  std::vector<int> order(e);
  std::iota(order.begin(), order.end(), 0);
  order.erase(order.begin() + low);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  EXPECT_EQ(ids[1], order[0]);
  EXPECT_EQ(ids[2], order[1]);
}

TEST(CpuOps, RouteTokenNormMinClampsTheDenominator) {
  std::vector<float> logits = {0.0f, 0.0f, 0.0f, 0.0f};
  std::vector<float> bias(4, 0.0f);
  std::vector<int32_t> ids(2);
  std::vector<float> w(2);
  route_token(logits.data(), bias.data(), 4, 2, 0.9f, ids.data(), w.data());
  EXPECT_FLOAT_EQ(w[0], 0.25f / 0.9f);  // sum 0.5 < norm_min 0.9
}

TEST(Dtype, Conversions) {
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(float_to_bf16(1.00390625f), 0x3f80);  // tie rounds to even
  EXPECT_EQ(float_to_bf16(1.01171875f), 0x3f82);  // tie rounds to even (up)
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  EXPECT_EQ(f16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_float(0xc000), -2.0f);
  EXPECT_EQ(f16_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(fp8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0x7f)));
  EXPECT_EQ(fp8_e4m3_to_float(0xb8), -1.0f);
}

}  // namespace
}  // namespace ernie::backend::cpu
