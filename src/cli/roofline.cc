// `ernie roofline`: what a decode step of a model must move and compute (model/roofline), and
// the time that takes at a given bandwidth: the floor our measured TPOT is compared with.
// A hidden tool for benchmarks and docs; prints one JSON object.
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/commands.h"
#include "model/config.h"
#include "model/roofline.h"

namespace ernie::cli {

CLI::App* add_roofline(CLI::App& app, RooflineArgs& a) {
  CLI::App* c = app.add_subcommand(
      "roofline", "Bytes, FLOPs and the bandwidth floor of a decode step of a model");
  c->group("");
  c->add_option("--model", a.model, "Model directory (config.json)")->required();
  c->add_option("--batch", a.batch, "Sequences decoding together")->check(CLI::PositiveNumber);
  c->add_option("--context", a.context, "Tokens in each sequence's cache")
      ->check(CLI::PositiveNumber);
  c->add_option("--bandwidth", a.bandwidth, "Device memory bandwidth, bytes/s")
      ->capture_default_str();
  return c;
}

int run_roofline(const RooflineArgs& a) {
  const model::ModelConfig c = model::load_config(a.model);
  backend::StepInput s;
  s.query_start = {0};
  for (int i = 0; i < a.batch; ++i) {
    s.token_ids.push_back(0);
    s.positions.push_back(static_cast<int32_t>(a.context - 1));
    s.query_start.push_back(i + 1);
    s.context_lens.push_back(static_cast<int32_t>(a.context));
    s.logits_indices.push_back(i);
  }
  const model::StepCost cost = model::step_cost(c, s);
  nlohmann::ordered_json out, stages = nlohmann::ordered_json::object();
  double bytes = 0, flops = 0;
  for (size_t i = 0; i < cost.size(); ++i) {
    if (cost[i].bytes == 0 && cost[i].flops == 0) continue;
    stages[backend::stage_name(static_cast<backend::Stage>(i))] = {{"bytes", cost[i].bytes},
                                                                   {"flops", cost[i].flops}};
    bytes += cost[i].bytes;
    flops += cost[i].flops;
  }
  const double floor_s = bytes / a.bandwidth;
  out["batch"] = a.batch;
  out["context"] = a.context;
  out["bytes"] = bytes;
  out["flops"] = flops;
  out["floor_ms"] = floor_s * 1e3;
  out["floor_tokens_per_s"] = a.batch / floor_s;
  out["stages"] = stages;
  std::cout << out.dump() << "\n";
  return 0;
}

}  // namespace ernie::cli
