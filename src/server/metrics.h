// Prometheus metrics with vLLM's names (vllm:...), rendered as text for GET /metrics.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/engine.h"

namespace ernie::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds)
      : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double v);
  void render(std::string& out, const std::string& name, const std::string& labels) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t count_ = 0;
};

class Metrics {
 public:
  explicit Metrics(std::string model_name);
  // The delivery thread (observe_*) and the engine thread (update); any thread may render.
  void observe_ttft(double s);
  void observe_itl(double s);
  void observe_e2e(double s, double tpot, const std::string& finish_reason);
  void update(const runtime::EngineStats& st);
  std::string render() const;

 private:
  mutable std::mutex mu_;
  std::string labels_;
  runtime::EngineStats stats_;
  Histogram ttft_, itl_, e2e_, tpot_;
  std::map<std::string, uint64_t> success_;
};

}  // namespace ernie::server
