// The engine on its own thread: HTTP handlers submit requests and aborts from any thread and
// receive outputs through a RequestStream; the engine thread owns the engine (and through it
// the model and the device), steps while there is work, and logs periodic stats. A second
// thread hands each step's outputs to the requests' streams (and records TTFT, ITL and E2E
// latency), so that the engine thread goes on to the next step at once: at 256 sequences the
// hand-off took ~0.6 ms a step, time the GPU sat idle.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
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
  // One batch of work for the delivery thread, in the engine thread's order: streams to
  // register, outputs to hand out (stamped when their step ended), then, when set, a failure
  // for every registered stream.
  struct Delivery {
    std::vector<std::pair<std::string, Live>> adds;
    std::vector<runtime::RequestOutput> outputs;
    std::chrono::steady_clock::time_point stamp;
    std::optional<std::string> fail_all;
  };
  void loop();
  void deliver_loop();
  void deliver(Delivery d);  // engine thread: queue for the delivery thread
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
  std::set<std::string> live_ids_;    // engine thread only: registered, not finished
  std::map<std::string, Live> live_;  // delivery thread only
  std::mutex deliver_mu_;
  std::condition_variable deliver_cv_;
  std::deque<Delivery> deliveries_;
  bool deliver_stop_ = false;
  std::thread deliver_thread_;
  std::chrono::steady_clock::time_point last_log_;
  int64_t logged_prompt_ = 0, logged_generation_ = 0;
  // Engine-thread time from the end of one step to the start of the next while requests ran
  // (handing out the outputs, taking new requests, stats), and the engine's step times at the
  // last log: the step-time debug line's intervals.
  std::optional<std::chrono::steady_clock::time_point> last_step_end_;
  double between_steps_ms_ = 0.0;
  runtime::EngineStats logged_steps_;
  std::thread thread_;
  std::once_flag joined_;  // shutdown() may be called from several threads
};

}  // namespace ernie::server
