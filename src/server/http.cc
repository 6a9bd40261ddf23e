#include "server/http.h"

#include <boost/asio.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <variant>

#include "common/check.h"
#include "common/log.h"
#include "tokenizer/tokenizer.h"

namespace ernie::embedded {
std::string_view openapi_spec();
}

namespace ernie::server {

using embedded::openapi_spec;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using net::awaitable;
using net::use_awaitable;

struct HttpServer::Impl {
  ServerConfig cfg;
  ApiContext& ctx;
  AsyncEngine& engine;
  Metrics& metrics;
  net::io_context ioc;
  std::unique_ptr<tcp::acceptor> acceptor;
  std::atomic<int> bound_port{0};
  std::atomic<bool> stopping{false};
  std::thread shutdown_thread;

  Impl(ServerConfig c, ApiContext& x, AsyncEngine& e, Metrics& m)
      : cfg(std::move(c)), ctx(x), engine(e), metrics(m), ioc(cfg.threads) {}

  net::steady_timer::duration idle() const {
    return std::chrono::duration_cast<net::steady_timer::duration>(
        std::chrono::duration<double>(cfg.idle_timeout_s));
  }

  using Request = http::request<http::string_body>;
  using Response = http::response<http::string_body>;

  static Response make(const Request& req, http::status status, std::string body,
                       const char* type) {
    Response res{status, req.version()};
    res.set(http::field::server, "ernie");
    res.set(http::field::content_type, type);
    res.keep_alive(req.keep_alive());
    res.body() = std::move(body);
    res.prepare_payload();
    return res;
  }
  static Response json(const Request& req, int status, const ojson& body) {
    return make(req, static_cast<http::status>(status),
                body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace),
                "application/json");
  }
  static Response error(const Request& req, const ApiError& e) {
    return json(req, e.status, e.body());
  }

  // GCC 12 can destroy temporaries of a co_await expression twice: every co_await here takes
  // named objects only.
  awaitable<void> send(beast::tcp_stream& stream, Response& res) {
    stream.expires_after(idle());
    co_await http::async_write(stream, res, use_awaitable);
  }

  bool authorized(const Request& req) const {
    if (cfg.api_key.empty()) return true;
    const std::string target(req.target());
    if (target.rfind("/v1", 0) != 0) return true;  // as vLLM: only /v1 routes need the key
    auto it = req.find(http::field::authorization);
    return it != req.end() && it->value() == "Bearer " + cfg.api_key;
  }

  // Parses the JSON body; malformed JSON and invalid UTF-8 are 400s.
  static ojson parse_body(const Request& req) {
    const std::string& b = req.body();
    if (!tokenizer::is_valid_utf8(b))
      throw ApiError{400, "The request body is not valid UTF-8.", std::nullopt};
    ojson j = ojson::parse(b, nullptr, false);
    if (j.is_discarded()) throw ApiError{400, "The request body is not valid JSON.", std::nullopt};
    return j;
  }

  awaitable<void> generate(beast::tcp_stream& stream, const Request& req, Job job,
                           bool& keep_alive) {
    auto exec = co_await net::this_coro::executor;
    auto timer = std::make_shared<net::steady_timer>(exec, net::steady_timer::time_point::max());
    auto pending = std::make_shared<std::atomic<bool>>(false);
    auto notify = [timer, pending, exec] {
      pending->store(true);
      net::post(exec, [timer] { timer->cancel(); });
    };
    std::vector<std::shared_ptr<RequestStream>> streams;
    std::vector<std::string> ids;
    for (size_t i = 0; i < job.prompts.size(); ++i) {
      streams.push_back(std::make_shared<RequestStream>(notify));
      ids.push_back(cat(job.id, "-", i));
      engine.submit(ids.back(), job.prompts[i], job.params, streams.back());
    }
    JobResult result(job, ctx);
    auto abort_all = [&] {
      for (size_t i = 0; i < ids.size(); ++i) {
        if (!streams[i]->finished()) engine.abort(ids[i]);
      }
    };
    std::optional<std::string> failure;
    // Waits for engine outputs; returns false when everything is finished.
    auto collect = [&](std::vector<ojson>& chunks) {
      pending->store(false);
      bool all_done = true;
      for (size_t i = 0; i < streams.size(); ++i) {
        // Drained together with the finished flag: an output pushed after the drain (the
        // last one, say) is never mistaken for delivered.
        bool finished = false;
        for (auto& o : streams[i]->drain(&finished)) {
          auto c = result.apply(i, o);
          chunks.insert(chunks.end(), std::make_move_iterator(c.begin()),
                        std::make_move_iterator(c.end()));
        }
        if (auto e = streams[i]->error()) failure = e;
        all_done &= finished;
      }
      return !all_done;
    };
    if (!job.stream) {
      // Watch the socket while waiting: a client that hangs up gets its request aborted.
      auto gone = std::make_shared<std::atomic<bool>>(false);
      net::co_spawn(
          exec,
          [&sock = stream.socket(), gone, timer]() -> awaitable<void> {
            // Readiness can be reported spuriously (edge-triggered epoll after a drained read):
            // only a peek that returns 0 bytes, or an error, means the client has gone.
            while (true) {
              boost::system::error_code ec;
              co_await sock.async_wait(tcp::socket::wait_read,
                                       net::redirect_error(use_awaitable, ec));
              if (ec == net::error::operation_aborted) co_return;
              if (!ec) {
                char byte;
                const ssize_t n = ::recv(sock.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
                if (n > 0) co_return;  // a pipelined request, not a hang-up
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
              }
              gone->store(true);
              timer->cancel();
              co_return;
            }
          },
          net::detached);
      std::vector<ojson> ignored;
      while (collect(ignored)) {
        if (gone->load()) {
          abort_all();
          keep_alive = false;
          co_return;
        }
        if (!pending->load()) {
          boost::system::error_code ec;
          co_await timer->async_wait(net::redirect_error(use_awaitable, ec));
          timer->expires_at(net::steady_timer::time_point::max());
        }
      }
      Response res = failure ? error(req, ApiError{500, *failure, std::nullopt})
                             : json(req, 200, result.response());
      if (failure) abort_all();
      boost::system::error_code cancelled;
      stream.socket().cancel(cancelled);  // ends the watcher before the response is written
      co_await send(stream, res);
      co_return;
    }
    // Server-sent events over a chunked response.
    http::response<http::empty_body> head{http::status::ok, req.version()};
    head.set(http::field::server, "ernie");
    head.set(http::field::content_type, "text/event-stream; charset=utf-8");
    head.set(http::field::cache_control, "no-cache");
    head.keep_alive(req.keep_alive());
    head.chunked(true);
    http::response_serializer<http::empty_body> sr{head};
    bool client_gone = false;
    std::string event;
    auto set_event = [&](const std::string& data) { event = "data: " + data + "\n\n"; };
    auto dump = [](const ojson& j) {
      return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    };
    try {
      stream.expires_after(idle());
      co_await http::async_write_header(stream, sr, use_awaitable);
      std::vector<ojson> first = result.start_chunks();
      for (const auto& c : first) {
        set_event(dump(c));
        auto chunk = http::make_chunk(net::buffer(event));
        stream.expires_after(idle());
        co_await net::async_write(stream, chunk, use_awaitable);
      }
      bool more = true;
      while (more) {
        std::vector<ojson> chunks;
        more = collect(chunks);
        for (const auto& c : chunks) {
          set_event(dump(c));
          auto chunk = http::make_chunk(net::buffer(event));
          stream.expires_after(idle());
          co_await net::async_write(stream, chunk, use_awaitable);
        }
        if (more && chunks.empty() && !pending->load()) {
          boost::system::error_code ec;
          co_await timer->async_wait(net::redirect_error(use_awaitable, ec));
          timer->expires_at(net::steady_timer::time_point::max());
        }
      }
      std::string tail;
      if (failure) {
        set_event(dump(ApiError{500, *failure, std::nullopt}.body()));
        tail += event;
      } else if (auto u = result.usage_chunk()) {
        set_event(dump(*u));
        tail += event;
      }
      set_event("[DONE]");
      tail += event;
      auto last = http::make_chunk(net::buffer(tail));
      stream.expires_after(idle());
      co_await net::async_write(stream, last, use_awaitable);
      auto end = http::make_chunk_last();
      co_await net::async_write(stream, end, use_awaitable);
    } catch (const boost::system::system_error&) {
      client_gone = true;  // the client went away or stalled: free its KV blocks
    }
    if (client_gone) {
      abort_all();
      keep_alive = false;
    }
  }

  // Everything but generation answers synchronously: a response, or a parsed job to run.
  std::variant<Response, Job> route(const Request& req) {
    const std::string target(req.target());
    const std::string path = target.substr(0, target.find('?'));
    const auto method = req.method();
    bool wrong_method = false;
    auto route_is = [&](const char* p, http::verb v) {
      if (path != p) return false;
      if (method != v) wrong_method = true;
      return method == v;
    };
    try {
      if (!authorized(req)) return json(req, 401, ojson{{"error", "Unauthorized"}});
      if (route_is("/health", http::verb::get))
        return make(req, http::status::ok, "", "application/json");
      if (path == "/ping" && (method == http::verb::get || method == http::verb::post))
        return make(req, http::status::ok, "", "application/json");  // vLLM's, as /health
      if (route_is("/version", http::verb::get))
        return json(req, 200, ojson{{"version", cfg.version}});
      if (route_is("/v1/models", http::verb::get)) return json(req, 200, models_response(ctx));
      if (route_is("/metrics", http::verb::get)) {
        return make(req, http::status::ok, metrics.render(),
                    "text/plain; version=0.0.4; charset=utf-8");
      }
      if (route_is("/openapi.json", http::verb::get)) {
        return make(req, http::status::ok, std::string(openapi_spec()), "application/json");
      }
      if (route_is("/tokenize", http::verb::post))
        return json(req, 200, tokenize_response(parse_body(req), ctx));
      if (route_is("/detokenize", http::verb::post))
        return json(req, 200, detokenize_response(parse_body(req), ctx));
      if (route_is("/v1/completions", http::verb::post))
        return parse_completion(parse_body(req), ctx);
      if (route_is("/v1/chat/completions", http::verb::post))
        return parse_chat(parse_body(req), ctx);
      if (wrong_method) return json(req, 405, ojson{{"detail", "Method Not Allowed"}});
      return json(req, 404, ojson{{"detail", "Not Found"}});
    } catch (const ApiError& e) {
      return error(req, e);
    } catch (const std::exception& e) {
      return error(req, ApiError{500, cat("internal error: ", e.what()), std::nullopt});
    }
  }

  awaitable<bool> handle(beast::tcp_stream& stream, Request& req) {
    bool keep_alive = req.keep_alive();
    auto routed = route(req);
    if (auto* res = std::get_if<Response>(&routed)) {
      co_await send(stream, *res);
      co_return keep_alive;
    }
    Job job = std::move(std::get<Job>(routed));
    if (cfg.log_requests)
      log::info("request ", job.id, ": ", job.prompts.size(), " prompt(s), n=", job.params.n);
    co_await generate(stream, req, std::move(job), keep_alive);
    co_return keep_alive;
  }

  awaitable<void> session(tcp::socket socket) {
    beast::tcp_stream stream(std::move(socket));
    beast::flat_buffer buffer;
    try {
      while (!stopping) {
        http::request_parser<http::string_body> parser;
        parser.body_limit(cfg.max_body_bytes);
        parser.header_limit(64 * 1024);
        stream.expires_after(idle());
        boost::system::error_code ec;
        co_await http::async_read(stream, buffer, parser, net::redirect_error(use_awaitable, ec));
        if (ec == http::error::end_of_stream || ec == net::error::eof) break;
        if (ec) {
          // Oversized or malformed requests get an answer when the socket still works.
          Request stub;
          stub.version(11);
          stub.keep_alive(false);
          if (ec != beast::error::timeout && ec != net::error::connection_reset) {
            Response res =
                ec == http::error::body_limit
                    ? error(stub, ApiError{413,
                                           cat("The request body exceeds ", cfg.max_body_bytes,
                                               " bytes."),
                                           std::nullopt})
                    : error(stub, ApiError{400, cat("Malformed HTTP request: ", ec.message()),
                                           std::nullopt});
            co_await send(stream, res);
          }
          break;
        }
        Request req = parser.release();
        const bool keep = co_await handle(stream, req);
        if (!keep) break;
      }
    } catch (const std::exception& e) {
      log::debug("connection closed: ", e.what());
    }
    boost::system::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
  }

  awaitable<void> listen() {
    while (!stopping) {
      boost::system::error_code ec;
      tcp::socket socket = co_await acceptor->async_accept(net::make_strand(ioc),
                                                           net::redirect_error(use_awaitable, ec));
      if (ec) {
        if (stopping) break;
        continue;
      }
      net::co_spawn(socket.get_executor(), session(std::move(socket)), net::detached);
    }
  }
};

HttpServer::HttpServer(ServerConfig cfg, ApiContext& ctx, AsyncEngine& engine, Metrics& metrics)
    : impl_(std::make_unique<Impl>(std::move(cfg), ctx, engine, metrics)) {}

HttpServer::~HttpServer() = default;

int HttpServer::port() const {
  return impl_->bound_port;
}

void HttpServer::stop() {
  Impl& s = *impl_;
  if (s.stopping.exchange(true)) return;
  net::post(s.ioc, [&s] {
    boost::system::error_code ec;
    if (s.acceptor) s.acceptor->close(ec);
  });
  // Finish in-flight requests as aborted, give their last chunks a moment, then stop the I/O
  // threads. run() joins this thread.
  s.shutdown_thread = std::thread([&s] {
    s.engine.shutdown();
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    s.ioc.stop();
  });
}

void HttpServer::run() {
  Impl& s = *impl_;
  boost::system::error_code ec;
  auto addr = net::ip::make_address(s.cfg.host, ec);
  if (ec) throw Error(cat("--host '", s.cfg.host, "' is not an IP address"));
  tcp::endpoint ep{addr, static_cast<unsigned short>(s.cfg.port)};
  s.acceptor = std::make_unique<tcp::acceptor>(s.ioc);
  s.acceptor->open(ep.protocol(), ec);
  if (!ec) s.acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) s.acceptor->bind(ep, ec);
  if (!ec) s.acceptor->listen(net::socket_base::max_listen_connections, ec);
  if (ec) throw Error(cat("cannot listen on ", s.cfg.host, ":", s.cfg.port, ": ", ec.message()));
  s.bound_port = s.acceptor->local_endpoint().port();
  net::signal_set signals(s.ioc, SIGINT, SIGTERM);
  signals.async_wait([this](const boost::system::error_code& e, int sig) {
    if (e) return;
    log::info("received signal ", sig, ": shutting down");
    stop();
  });
  net::co_spawn(s.ioc, s.listen(), net::detached);
  log::info("Starting server on http://", s.cfg.host, ":", s.bound_port.load());
  std::vector<std::thread> threads;
  for (int i = 1; i < s.cfg.threads; ++i) threads.emplace_back([&s] { s.ioc.run(); });
  s.ioc.run();
  for (auto& t : threads) t.join();
  if (s.shutdown_thread.joinable()) s.shutdown_thread.join();
}

}  // namespace ernie::server
