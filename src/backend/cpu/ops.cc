#include "backend/cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace ernie::backend::cpu {
namespace {

// 16 independent partial sums in a fixed order: deterministic and vectorisable without
// -ffast-math.
inline void dot_rows(const float* w, const float* const* xs, int nx, int64_t k, float* out) {
  constexpr int kLanes = 16;
  float acc[4][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    for (int r = 0; r < nx; ++r) {
      const float* x = xs[r] + i;
      for (int l = 0; l < kLanes; ++l) acc[r][l] += w[i + l] * x[l];
    }
  }
  for (int r = 0; r < nx; ++r) {
    float tail = 0.0f;
    for (int64_t j = i; j < k; ++j) tail += w[j] * xs[r][j];
    float s = tail;
    for (int l = 0; l < kLanes; ++l) s += acc[r][l];
    out[r] = s;
  }
}

}  // namespace

void gemm_xwt(float* out, const float* x, const float* w, int64_t m, int64_t n, int64_t k) {
#pragma omp parallel for schedule(static) if (n * m * k > (1 << 16))
  for (int64_t j = 0; j < n; ++j) {
    const float* wr = w + j * k;
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int nx = static_cast<int>(std::min<int64_t>(4, m - r0));
      const float* xs[4];
      for (int r = 0; r < nx; ++r) xs[r] = x + (r0 + r) * k;
      float res[4];
      dot_rows(wr, xs, nx, k, res);
      for (int r = 0; r < nx; ++r) out[(r0 + r) * n + j] = res[r];
    }
  }
}

void rms_norm(float* out, const float* x, const float* weight, int64_t rows, int64_t hidden,
              float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * hidden;
    double ss = 0.0;
    for (int64_t i = 0; i < hidden; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / hidden) + eps);
    float* o = out + r * hidden;
    for (int64_t i = 0; i < hidden; ++i) o[i] = weight[i] * (xr[i] * inv);
  }
}

void silu_mul(float* out, const float* gate_up, int64_t rows, int64_t inter) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * inter;
    const float* u = g + inter;
    float* o = out + r * inter;
    for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void rope_interleaved(float* x, int num_heads, int head_dim, int64_t position, double theta) {
  const int half = head_dim / 2;
  for (int j = 0; j < half; ++j) {
    // Same f32 computation as the reference implementation: inv_freq in f32, angle in f32.
    const float inv_freq = static_cast<float>(
        1.0 / std::pow(theta, static_cast<double>(2 * j) / static_cast<double>(head_dim)));
    const float angle = static_cast<float>(position) * inv_freq;
    const float c = std::cos(angle), s = std::sin(angle);
    for (int h = 0; h < num_heads; ++h) {
      float* p = x + static_cast<int64_t>(h) * head_dim + 2 * j;
      const float a = p[0], b = p[1];
      p[0] = a * c - b * s;
      p[1] = b * c + a * s;
    }
  }
}

void route_token(const float* logits, const float* bias, int num_experts, int k, float norm_min,
                 int32_t* experts, float* weights) {
  std::vector<float> p(num_experts);
  const float mx = *std::max_element(logits, logits + num_experts);
  double sum = 0.0;
  for (int e = 0; e < num_experts; ++e) sum += std::exp(static_cast<double>(logits[e] - mx));
  for (int e = 0; e < num_experts; ++e) {
    p[e] = static_cast<float>(std::exp(static_cast<double>(logits[e] - mx)) / sum);
  }
  std::vector<int32_t> order(num_experts);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
    const float sa = p[a] + bias[a], sb = p[b] + bias[b];
    return sa != sb ? sa > sb : a < b;
  });
  float total = 0.0f;
  for (int i = 0; i < k; ++i) total += p[order[i]];
  const float denom = std::max(total, norm_min);
  for (int i = 0; i < k; ++i) {
    experts[i] = order[i];
    weights[i] = p[order[i]] / denom;
  }
}

}  // namespace ernie::backend::cpu
