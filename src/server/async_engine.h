// The engine on its own thread: HTTP handlers submit requests and aborts from any thread and
// receive outputs through a RequestStream; the engine thread owns the engine (and through it
// the model and the device), steps while there is work, and logs periodic stats.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "runtime/engine.h"
#include "server/metrics.h"

namespace ernie::server {

// A mailbox from the engine thread to one request's handler.
class RequestStream {
 public:
  explicit RequestStream(std::function<void()> notify) : notify_(std::move(notify)) {}
  void push(runtime::RequestOutput o);
  void fail(std::string message);
  // Everything that arrived since the last call.
  // Takes the queued outputs; *finished (when given) says, under the same lock, whether the
  // last output is among them or was taken before.
  std::vector<runtime::RequestOutput> drain(bool* finished = nullptr);
  bool finished() const;
  std::optional<std::string> error() const;

 private:
  mutable std::mutex mu_;
  std::function<void()> notify_;
  std::vector<runtime::RequestOutput> queue_;
  bool finished_ = false;
  std::optional<std::string> error_;
};

class AsyncEngine {
 public:
  AsyncEngine(runtime::Engine& engine, Metrics& metrics, double log_interval_s = 10.0);
  ~AsyncEngine();

  void submit(const std::string& id, std::vector<int32_t> prompt, runtime::SamplingParams params,
              std::shared_ptr<RequestStream> stream);
  void abort(const std::string& id);
  // Stops the loop: unfinished requests are aborted.
  void shutdown();
  runtime::EngineStats stats() const;

 private:
  struct Pending {
    std::string id;
    std::vector<int32_t> prompt;
    runtime::SamplingParams params;
    std::shared_ptr<RequestStream> stream;
    std::chrono::steady_clock::time_point arrival;
  };
  struct Live {
    std::shared_ptr<RequestStream> stream;
    std::chrono::steady_clock::time_point arrival;
    std::optional<std::chrono::steady_clock::time_point> first_token, last_token;
  };
  void loop();
  void log_stats();

  runtime::Engine& engine_;
  Metrics& metrics_;
  double log_interval_s_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Pending> adds_;
  std::vector<std::string> aborts_;
  bool stop_ = false;
  runtime::EngineStats snapshot_;
  std::map<std::string, Live> live_;  // engine thread only
  std::chrono::steady_clock::time_point last_log_;
  int64_t logged_prompt_ = 0, logged_generation_ = 0;
  std::thread thread_;
  std::once_flag joined_;  // shutdown() may be called from several threads
};

}  // namespace ernie::server
