#include "model/roofline.h"

#include <cmath>

namespace ernie::model {

double expected_experts_touched(int64_t experts, int64_t k, int64_t tokens) {
  if (experts <= 0 || tokens <= 0) return 0.0;
  const double miss = 1.0 - static_cast<double>(k) / static_cast<double>(experts);
  return static_cast<double>(experts) * (1.0 - std::pow(miss, static_cast<double>(tokens)));
}

StepCost step_cost(const ModelConfig& c, const backend::StepInput& step) {
  using backend::Stage;
  constexpr double kW = 2.0, kKv = 2.0;  // bf16 weights and KV cache
  StepCost cost{};
  auto at = [&](Stage s) -> StageCost& { return cost[static_cast<size_t>(s)]; };
  const double t = step.num_tokens(), h = static_cast<double>(c.hidden_size);
  const double q = static_cast<double>(c.q_size()), kv = static_cast<double>(c.kv_size());
  const double layers = static_cast<double>(c.num_hidden_layers);
  const double moe_layers = static_cast<double>(c.num_moe_layers());
  const double dense_layers = layers - moe_layers;
  const double rows = static_cast<double>(step.logits_indices.size());
  const double vocab = static_cast<double>(c.vocab_size);

  // Bytes are what must come from device memory: weights, the KV cache, and the f32 logits.
  // Activations are left out: a decode step's fit in L2, and prefill is bound by FLOPs.
  at(Stage::kEmbedding) = {t * h * kW, 0.0};
  at(Stage::kNorm) = {layers * 2 * h * kW, layers * 2 * 4 * t * h};
  at(Stage::kQkvProj) = {layers * (q + 2 * kv) * h * kW, layers * 2 * t * h * (q + 2 * kv)};
  at(Stage::kRopeKv) = {layers * t * 2 * kv * kKv, layers * t * 3 * (q + kv)};
  // Attention: each sequence's whole cache (K and V) once; QK and PV FLOPs over every visible
  // key of every new token.
  double cached = 0.0, visible = 0.0;
  for (int32_t ctx : step.context_lens) cached += ctx;
  for (int32_t p : step.positions) visible += p + 1.0;
  at(Stage::kAttention) = {layers * cached * 2 * kv * kKv, layers * 4 * visible * q};
  at(Stage::kOProj) = {layers * q * h * kW, layers * 2 * t * q * h};
  const double inter = static_cast<double>(c.intermediate_size);
  at(Stage::kDenseMlp) = {dense_layers * 3 * inter * h * kW, dense_layers * 6 * t * h * inter};
  const double e = static_cast<double>(c.moe_num_experts), k = static_cast<double>(c.moe_k);
  at(Stage::kMoeRouter) = {moe_layers * e * h * 4, moe_layers * 2 * t * h * e};  // f32 router
  const double ie = static_cast<double>(c.moe_intermediate_size);
  const double touched = expected_experts_touched(c.moe_num_experts, c.moe_k, step.num_tokens());
  at(Stage::kMoeExperts) = {moe_layers * touched * 3 * ie * h * kW,
                            moe_layers * 6 * t * k * h * ie};
  if (c.moe_num_shared_experts > 0) {
    const double is = static_cast<double>(c.shared_intermediate_size());
    at(Stage::kMoeShared) = {moe_layers * 3 * is * h * kW, moe_layers * 6 * t * h * is};
  }
  at(Stage::kMoeCombine) = {0.0, moe_layers * t * k * h};
  at(Stage::kLmHead) = {vocab * h * kW + rows * vocab * 4, 2 * rows * h * vocab};
  at(Stage::kSampling) = {rows * vocab * 4 * 2, rows * vocab * 4};
  return cost;
}

}  // namespace ernie::model
