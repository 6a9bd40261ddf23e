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
  deliver_thread_ = std::thread([this] { deliver_loop(); });
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
  // Where a step's wall time goes (VLLM_LOGGING_LEVEL=DEBUG): the GPU idles through all but
  // the device part.
  if (const int64_t steps = st.steps - logged_steps_.steps;
      steps > 0 && log::level() <= log::Level::kDebug) {
    char line[256];
    std::snprintf(
        line, sizeof line,
        "Step times over %lld steps (ms per step): build %.3f, device + sampling %.3f, "
        "outputs %.3f, between steps %.3f; %lld preemptions",
        static_cast<long long>(steps), (st.step_build_ms - logged_steps_.step_build_ms) / steps,
        (st.step_device_ms - logged_steps_.step_device_ms) / steps,
        (st.step_output_ms - logged_steps_.step_output_ms) / steps, between_steps_ms_ / steps,
        static_cast<long long>(st.preemptions - logged_steps_.preemptions));
    log::debug(line);
  }
  logged_steps_ = st;
  between_steps_ms_ = 0.0;
  logged_prompt_ = st.prompt_tokens;
  logged_generation_ = st.generation_tokens;
  last_log_ = now;
}

void AsyncEngine::deliver(Delivery d) {
  {
    std::lock_guard lock(deliver_mu_);
    deliveries_.push_back(std::move(d));
  }
  deliver_cv_.notify_one();
}

void AsyncEngine::deliver_loop() {
  while (true) {
    std::deque<Delivery> batch;
    {
      std::unique_lock lock(deliver_mu_);
      deliver_cv_.wait(lock, [this] { return deliver_stop_ || !deliveries_.empty(); });
      if (deliveries_.empty()) return;  // stopping, everything handed out
      batch.swap(deliveries_);
    }
    for (Delivery& d : batch) {
      for (auto& [id, live] : d.adds) live_[id] = std::move(live);
      for (auto& o : d.outputs) {
        auto it = live_.find(o.request_id);
        if (it == live_.end()) continue;
        Live& l = it->second;
        bool new_tokens = false;
        for (const auto& out : o.outputs) new_tokens |= !out.token_ids.empty();
        if (new_tokens) {
          if (!l.first_token) {
            l.first_token = d.stamp;
            metrics_.observe_ttft(std::chrono::duration<double>(d.stamp - l.arrival).count());
          } else {
            metrics_.observe_itl(std::chrono::duration<double>(d.stamp - *l.last_token).count());
          }
          l.last_token = d.stamp;
        }
        if (o.finished) {
          int64_t out_tokens = 0;
          std::string reason = "stop";
          for (const auto& out : o.outputs) {
            out_tokens = std::max(out_tokens, out.num_output_tokens);
            if (out.finish_reason) reason = *out.finish_reason;
          }
          const double e2e = std::chrono::duration<double>(d.stamp - l.arrival).count();
          const double tpot =
              l.first_token && out_tokens > 1
                  ? std::chrono::duration<double>(d.stamp - *l.first_token).count() /
                        (out_tokens - 1)
                  : 0.0;
          metrics_.observe_e2e(e2e, tpot, reason);
        }
        auto stream = l.stream;
        if (o.finished) live_.erase(it);
        stream->push(std::move(o));
      }
      if (d.fail_all) {
        for (auto& [id, live] : live_) live.stream->fail(*d.fail_all);
        live_.clear();
      }
    }
  }
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
    Delivery d;
    for (auto& p : adds) {
      try {
        engine_.add_request(p.id, std::move(p.prompt), std::move(p.params));
        live_ids_.insert(p.id);
        d.adds.push_back({p.id, Live{p.stream, p.arrival, std::nullopt, std::nullopt}});
      } catch (const std::exception& e) {
        p.stream->fail(e.what());
      }
    }
    for (const auto& id : aborts) engine_.abort_request(id);
    if (stopping) {
      for (const auto& id : live_ids_) engine_.abort_request(id);
    }
    if (engine_.has_unfinished()) {
      const auto begin = Clock::now();
      if (last_step_end_)
        between_steps_ms_ +=
            std::chrono::duration<double, std::milli>(begin - *last_step_end_).count();
      try {
        d.outputs = engine_.step();
      } catch (const std::exception& e) {
        // A failed step cannot be retried safely: fail every live request, keep serving.
        log::error("engine step failed: ", e.what());
        for (const auto& id : live_ids_) engine_.abort_request(id);
        live_ids_.clear();
        d.outputs.clear();
        d.fail_all = cat("internal error: ", e.what());
        try {
          while (engine_.has_unfinished()) engine_.step();
        } catch (const std::exception&) {
        }
      }
    }
    d.stamp = Clock::now();
    last_step_end_ = d.stamp;
    for (const auto& o : d.outputs) {
      if (o.finished) live_ids_.erase(o.request_id);
    }
    const bool done = stopping && !engine_.has_unfinished();
    if (done) {
      live_ids_.clear();
      d.fail_all = "the server is shutting down";
    }
    if (!d.adds.empty() || !d.outputs.empty() || d.fail_all) deliver(std::move(d));
    const auto st = engine_.stats();
    metrics_.update(st);
    {
      std::lock_guard lock(mu_);
      snapshot_ = st;
    }
    log_stats();
    if (!engine_.has_unfinished()) last_step_end_.reset();  // idle time is not a gap
    if (done) {
      {
        std::lock_guard lock(deliver_mu_);
        deliver_stop_ = true;
      }
      deliver_cv_.notify_one();
      deliver_thread_.join();
      return;
    }
  }
}

}  // namespace ernie::server
