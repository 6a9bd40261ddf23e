#include "backend/cpu/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <unordered_map>

#include "common/rng.h"

namespace ernie::backend::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int32_t argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

}  // namespace

SampledToken sample_row(std::span<const float> raw, const SamplingRow& row) {
  const int32_t vocab = static_cast<int32_t>(raw.size());
  std::vector<float> x(raw.begin(), raw.end());

  if (row.logit_bias) {
    for (const auto& [id, bias] : *row.logit_bias) {
      if (id >= 0 && id < vocab) x[id] += bias;
    }
  }
  // Penalties, as vLLM applies them: repetition over prompt and output (divide positive
  // logits, multiply negative ones), frequency and presence over the output.
  if (row.repetition_penalty != 1.0f || row.frequency_penalty != 0.0f ||
      row.presence_penalty != 0.0f) {
    std::unordered_map<int32_t, int> out_counts;
    if (row.output_tokens) {
      for (int32_t t : *row.output_tokens) ++out_counts[t];
    }
    if (row.repetition_penalty != 1.0f) {
      std::vector<char> seen(vocab, 0);
      if (row.prompt_tokens) {
        for (int32_t t : *row.prompt_tokens) {
          if (t >= 0 && t < vocab) seen[t] = 1;
        }
      }
      for (const auto& [t, c] : out_counts) {
        if (t >= 0 && t < vocab) seen[t] = 1;
      }
      for (int32_t t = 0; t < vocab; ++t) {
        if (seen[t])
          x[t] = x[t] > 0 ? x[t] / row.repetition_penalty : x[t] * row.repetition_penalty;
      }
    }
    for (const auto& [t, c] : out_counts) {
      if (t < 0 || t >= vocab) continue;
      x[t] -= row.frequency_penalty * static_cast<float>(c) + row.presence_penalty;
    }
  }
  for (int32_t t : row.banned) {
    if (t >= 0 && t < vocab) x[t] = kNegInf;
  }

  SampledToken out;
  if (row.temperature < 1e-5f) {
    out.id = argmax(x);
  } else {
    // Probabilities after temperature.
    const float mx = *std::max_element(x.begin(), x.end());
    std::vector<double> p(vocab);
    double sum = 0.0;
    for (int32_t t = 0; t < vocab; ++t) {
      p[t] = x[t] == kNegInf ? 0.0 : std::exp((static_cast<double>(x[t]) - mx) / row.temperature);
      sum += p[t];
    }
    for (auto& v : p) v /= sum;
    if (row.min_p > 0.0f) {
      const double cut = row.min_p * *std::max_element(p.begin(), p.end());
      for (auto& v : p) {
        if (v < cut) v = 0.0;
      }
    }
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    const bool need_sort = (row.top_k > 0 && row.top_k < vocab) || row.top_p < 1.0f;
    if (need_sort) {
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return p[a] > p[b]; });
      size_t keep = vocab;
      if (row.top_k > 0 && row.top_k < vocab) keep = static_cast<size_t>(row.top_k);
      if (row.top_p < 1.0f) {
        double kept_mass = 0.0;
        for (size_t i = 0; i < keep; ++i) kept_mass += p[order[i]];
        // Smallest prefix whose mass reaches top_p of the (top-k renormalised) distribution.
        double acc = 0.0;
        size_t n = 0;
        while (n < keep) {
          acc += p[order[n]];
          ++n;
          if (acc >= row.top_p * kept_mass) break;
        }
        keep = std::max<size_t>(n, 1);
      }
      for (size_t i = keep; i < order.size(); ++i) p[order[i]] = 0.0;
    }
    // The draw: a stream keyed by (seed, position), independent of the batch.
    Rng rng(row.seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(row.position + 1)));
    double total = 0.0;
    for (double v : p) total += v;
    double u = rng.uniform() * total;
    out.id = -1;
    for (int32_t t = 0; t < vocab; ++t) {
      if (p[t] <= 0.0) continue;
      out.id = t;
      if ((u -= p[t]) < 0.0) break;
    }
    if (out.id < 0) out.id = argmax(x);
  }

  // Logprobs of the raw logits (before bias, penalties and temperature).
  if (row.num_logprobs >= 0) out = score_token(raw, out.id, row.num_logprobs);
  return out;
}

}  // namespace ernie::backend::cpu
