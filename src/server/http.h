// The HTTP front end: Boost.Beast on Asio I/O threads, one coroutine per connection (on its
// own strand), routes for the OpenAI-compatible API, SSE streaming, API-key checks, and a
// graceful shutdown on SIGINT/SIGTERM.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "server/api.h"
#include "server/async_engine.h"
#include "server/metrics.h"

namespace ernie::server {

struct ServerConfig {
  std::string host = "0.0.0.0";
  int port = 8000;
  int threads = 4;
  std::string api_key;                  // empty: no authentication
  size_t max_body_bytes = 64ull << 20;  // larger bodies get 413
  double idle_timeout_s = 60.0;         // a stalled client is dropped after this
  std::string version;
  bool log_requests = false;
};

class HttpServer {
 public:
  HttpServer(ServerConfig cfg, ApiContext& ctx, AsyncEngine& engine, Metrics& metrics);
  ~HttpServer();
  // Binds (throws ernie::Error when the port is taken), serves until SIGINT/SIGTERM or stop().
  void run();
  void stop();
  // The bound port (after run() started listening); useful with port 0.
  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ernie::server
