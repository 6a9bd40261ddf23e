// What a step must move and compute, stage by stage, from the model's shapes: every weight it
// uses read once (bf16; the router in f32), the KV cache of every sequence it attends over and
// the f32 logits (activations are left out: a decode step's stay in L2); FLOPs of the matrix
// products and of attention. Routed experts count as
// touched by expectation under uniform routing, E (1 - (1 - k/E)^T). These are the floors the
// stage profile compares its times with.
#pragma once

#include <array>

#include "backend/backend.h"
#include "model/config.h"

namespace ernie::model {

struct StageCost {
  double bytes = 0.0;
  double flops = 0.0;
};
using StepCost = std::array<StageCost, static_cast<size_t>(backend::Stage::kCount)>;

// Experts of E touched by T tokens choosing k each, in expectation (uniform routing).
double expected_experts_touched(int64_t experts, int64_t k, int64_t tokens);

StepCost step_cost(const ModelConfig& c, const backend::StepInput& step);

}  // namespace ernie::model
