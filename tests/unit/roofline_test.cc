// The per-stage cost model against the floors in docs (bytes a decode step must move for the
// 21B model at several batch sizes and contexts) and against FLOP counts done by hand.
#include <gtest/gtest.h>

#include <numeric>

#include "model/roofline.h"
#include "model/synthetic.h"

namespace ernie::model {
namespace {

backend::StepInput decode_step(int seqs, int context) {
  backend::StepInput s;
  s.query_start = {0};
  for (int i = 0; i < seqs; ++i) {
    s.token_ids.push_back(1);
    s.positions.push_back(context - 1);
    s.query_start.push_back(i + 1);
    s.context_lens.push_back(context);
    s.logits_indices.push_back(i);
  }
  return s;
}

double total_bytes(const StepCost& c) {
  return std::accumulate(c.begin(), c.end(), 0.0,
                         [](double a, const StageCost& s) { return a + s.bytes; });
}

TEST(Roofline, DecodeBytesMatchTheDocumentedFloors) {
  const ModelConfig c = parse_config(preset_config("21b-a3b"));
  struct Row {
    int seqs, context;
    double gb;  // docs/performance.md (weights touched + KV cache)
  };
  for (const Row& r : {Row{1, 1000, 6.8}, Row{16, 8500, 43.0}, Row{16, 1500, 36.6},
                       Row{64, 1500, 49.1}, Row{256, 1500, 65.7}, Row{512, 1500, 87.7}}) {
    const double gb = total_bytes(step_cost(c, decode_step(r.seqs, r.context))) / 1e9;
    EXPECT_NEAR(gb, r.gb, 0.02 * r.gb) << r.seqs << " x " << r.context;
  }
  EXPECT_NEAR(expected_experts_touched(64, 6, 16), 50.8, 0.05);
  EXPECT_NEAR(expected_experts_touched(64, 6, 1), 6.0, 1e-9);
}

TEST(Roofline, PrefillFlopsByHand) {
  const ModelConfig c = parse_config(preset_config("21b-a3b"));
  backend::StepInput s;
  const int n = 1000;
  s.query_start = {0, n};
  for (int i = 0; i < n; ++i) {
    s.token_ids.push_back(1);
    s.positions.push_back(i);
  }
  s.context_lens = {n};
  s.logits_indices = {n - 1};
  const StepCost cost = step_cost(c, s);
  auto flops = [&](backend::Stage st) { return cost[static_cast<size_t>(st)].flops; };
  const double h = 2560, layers = 28, q = 20 * 128, kv = 4 * 128;
  EXPECT_DOUBLE_EQ(flops(backend::Stage::kQkvProj), layers * 2 * n * h * (q + 2 * kv));
  // Keys visible to token i: i + 1, so sum = n (n + 1) / 2.
  EXPECT_DOUBLE_EQ(flops(backend::Stage::kAttention), layers * 4 * (n * (n + 1) / 2.0) * q);
  EXPECT_DOUBLE_EQ(flops(backend::Stage::kMoeExperts), 27 * 6.0 * n * 6 * h * 1536);
  EXPECT_DOUBLE_EQ(flops(backend::Stage::kLmHead), 2.0 * h * 103424);
}

}  // namespace
}  // namespace ernie::model
