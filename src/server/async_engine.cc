#include "server/async_engine.h"

#include <cstdio>

#include "common/check.h"
#include "common/log.h"

namespace ernie::server {

using Clock = std::chrono::steady_clock;

void RequestStream::push(runtime::RequestOutput o) {
  {
    std::lock_guard lock(mu_);
    if (o.finished) finished_ = true;
    queue_.push_back(std::move(o));
  }
  notify_();
}

void RequestStream::fail(std::string message) {
  {
    std::lock_guard lock(mu_);
    error_ = std::move(message);
    finished_ = true;
  }
  notify_();
}

std::vector<runtime::RequestOutput> RequestStream::drain(bool* finished) {
  std::lock_guard lock(mu_);
  std::vector<runtime::RequestOutput> out;
  out.swap(queue_);
  if (finished) *finished = finished_;
  return out;
}

bool RequestStream::finished() const {
  std::lock_guard lock(mu_);
  return finished_;
}

std::optional<std::string> RequestStream::error() const {
  std::lock_guard lock(mu_);
  return error_;
}

AsyncEngine::AsyncEngine(runtime::Engine& engine, Metrics& metrics, double log_interval_s)
    : engine_(engine), metrics_(metrics), log_interval_s_(log_interval_s), last_log_(Clock::now()) {
  snapshot_ = engine_.stats();
  thread_ = std::thread([this] { loop(); });
}

AsyncEngine::~AsyncEngine() {
  shutdown();
}

void AsyncEngine::submit(const std::string& id, std::vector<int32_t> prompt,
                         runtime::SamplingParams params, std::shared_ptr<RequestStream> stream) {
  {
    std::lock_guard lock(mu_);
    if (stop_) {
      stream->fail("the server is shutting down");
      return;
    }
    adds_.push_back({id, std::move(prompt), std::move(params), std::move(stream), Clock::now()});
  }
  cv_.notify_one();
}

void AsyncEngine::abort(const std::string& id) {
  {
    std::lock_guard lock(mu_);
    aborts_.push_back(id);
  }
  cv_.notify_one();
}

void AsyncEngine::shutdown() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_one();
  std::call_once(joined_, [this] { thread_.join(); });
}

runtime::EngineStats AsyncEngine::stats() const {
  std::lock_guard lock(mu_);
  return snapshot_;
}

void AsyncEngine::log_stats() {
  const auto now = Clock::now();
  const double dt = std::chrono::duration<double>(now - last_log_).count();
  if (dt < log_interval_s_) return;
  const auto st = engine_.stats();
  const int64_t dp = st.prompt_tokens - logged_prompt_,
                dg = st.generation_tokens - logged_generation_;
  if (dp > 0 || dg > 0 || st.running > 0 || st.waiting > 0) {
    char line[512];
    std::snprintf(line, sizeof line,
                  "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                  "Running: %zu "
                  "reqs, Waiting: %zu reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                  dp / dt, dg / dt, st.running, st.waiting, 100.0 * st.kv_usage,
                  st.prefix_queries ? 100.0 * st.prefix_hits / st.prefix_queries : 0.0);
    log::info(line);
  }
  if (engine_.profiling()) {
    const backend::StageProfile p = engine_.take_stage_profile();
    if (p.steps > 0) {
      double total = 0.0;
      for (double ms : p.ms) total += ms;
      // Per stage: ms per step, share of the step, and the rates its floor implies (bytes
      // that must move and FLOPs that must be done, over the time it took).
      std::string line =
          cat("Stage profile over ", p.steps, " steps (ms per step, share, TB/s, TFLOP/s):");
      for (int s = 0; s < static_cast<int>(backend::Stage::kCount); ++s) {
        if (p.ms[s] <= 0.0) continue;
        const double sec = p.ms[s] / 1e3;
        char part[128];
        std::snprintf(part, sizeof part, " %s %.3f %.1f%% %.2f %.1f;",
                      backend::stage_name(static_cast<backend::Stage>(s)), p.ms[s] / p.steps,
                      100.0 * p.ms[s] / total, p.bytes[s] / sec / 1e12, p.flops[s] / sec / 1e12);
        line += part;
      }
      char end[64];
      std::snprintf(end, sizeof end, " total %.3f", total / p.steps);
      log::info(line + end);
    }
  }
  logged_prompt_ = st.prompt_tokens;
  logged_generation_ = st.generation_tokens;
  last_log_ = now;
}

void AsyncEngine::loop() {
  while (true) {
    std::vector<Pending> adds;
    std::vector<std::string> aborts;
    bool stopping;
    {
      std::unique_lock lock(mu_);
      if (adds_.empty() && aborts_.empty() && !stop_ && !engine_.has_unfinished()) {
        cv_.wait_for(lock, std::chrono::duration<double>(log_interval_s_));
      }
      adds.swap(adds_);
      aborts.swap(aborts_);
      stopping = stop_;
    }
    for (auto& p : adds) {
      try {
        engine_.add_request(p.id, std::move(p.prompt), std::move(p.params));
        live_[p.id] = {p.stream, p.arrival, std::nullopt, std::nullopt};
      } catch (const std::exception& e) {
        p.stream->fail(e.what());
      }
    }
    for (const auto& id : aborts) engine_.abort_request(id);
    if (stopping) {
      for (auto& [id, live] : live_) engine_.abort_request(id);
    }
    std::vector<runtime::RequestOutput> outputs;
    if (engine_.has_unfinished()) {
      try {
        outputs = engine_.step();
      } catch (const std::exception& e) {
        // A failed step cannot be retried safely: fail every live request, keep serving.
        log::error("engine step failed: ", e.what());
        for (auto& [id, live] : live_) {
          engine_.abort_request(id);
          live.stream->fail(cat("internal error: ", e.what()));
        }
        live_.clear();
        try {
          while (engine_.has_unfinished()) engine_.step();
        } catch (const std::exception&) {
        }
      }
    }
    const auto now = Clock::now();
    for (auto& o : outputs) {
      auto it = live_.find(o.request_id);
      if (it == live_.end()) continue;
      Live& l = it->second;
      bool new_tokens = false;
      for (const auto& d : o.outputs) new_tokens |= !d.token_ids.empty();
      if (new_tokens) {
        if (!l.first_token) {
          l.first_token = now;
          metrics_.observe_ttft(std::chrono::duration<double>(now - l.arrival).count());
        } else {
          metrics_.observe_itl(std::chrono::duration<double>(now - *l.last_token).count());
        }
        l.last_token = now;
      }
      if (o.finished) {
        int64_t out_tokens = 0;
        std::string reason = "stop";
        for (const auto& d : o.outputs) {
          out_tokens = std::max(out_tokens, d.num_output_tokens);
          if (d.finish_reason) reason = *d.finish_reason;
        }
        const double e2e = std::chrono::duration<double>(now - l.arrival).count();
        const double tpot =
            l.first_token && out_tokens > 1
                ? std::chrono::duration<double>(now - *l.first_token).count() / (out_tokens - 1)
                : 0.0;
        metrics_.observe_e2e(e2e, tpot, reason);
      }
      auto stream = l.stream;
      if (o.finished) live_.erase(it);
      stream->push(std::move(o));
    }
    const auto st = engine_.stats();
    metrics_.update(st);
    {
      std::lock_guard lock(mu_);
      snapshot_ = st;
    }
    log_stats();
    if (stopping && !engine_.has_unfinished()) {
      for (auto& [id, live] : live_) live.stream->fail("the server is shutting down");
      live_.clear();
      return;
    }
  }
}

}  // namespace ernie::server
