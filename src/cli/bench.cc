// `ernie bench serve`: a load generator that measures exactly as `vllm bench serve` does.
// The client is asynchronous (one Asio thread, one coroutine and one connection per request in
// flight) and timestamps each SSE chunk as it is parsed.
#include <utility>

#include <boost/asio.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <chrono>
#include <cmath>
#include <ctime>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>
#include <tuple>

#include "bench/bench.h"
#include "cli/commands.h"
#include "common/check.h"
#include "common/log.h"
#include "model/checkpoint.h"
#include "tokenizer/chat.h"
#include "tokenizer/tokenizer.h"

namespace ernie::cli {
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using ojson = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

namespace {

struct Url {
  std::string host, port, base_path;
};

Url parse_base(const BenchArgs& a) {
  Url u{a.host, std::to_string(a.port), ""};
  if (!a.base_url.empty()) {
    std::string s = a.base_url;
    if (s.rfind("http://", 0) != 0)
      throw Error("--base-url must start with http:// (https is not supported)");
    s = s.substr(7);
    const size_t slash = s.find('/');
    std::string hostport = s.substr(0, slash);
    u.base_path = slash == std::string::npos ? "" : s.substr(slash);
    while (!u.base_path.empty() && u.base_path.back() == '/') u.base_path.pop_back();
    const size_t colon = hostport.rfind(':');
    u.host = hostport.substr(0, colon);
    u.port = colon == std::string::npos ? "80" : hostport.substr(colon + 1);
  }
  return u;
}

// A blocking request for the set-up calls (/v1/models, /tokenize, /detokenize).
std::pair<int, std::string> blocking_request(const Url& u, http::verb verb, const std::string& path,
                                             const std::string& body) {
  net::io_context ioc;
  tcp::resolver resolver(ioc);
  beast::tcp_stream stream(ioc);
  stream.expires_after(std::chrono::seconds(60));
  stream.connect(resolver.resolve(u.host, u.port));
  http::request<http::string_body> req{verb, u.base_path + path, 11};
  req.set(http::field::host, u.host);
  req.set(http::field::content_type, "application/json");
  if (const char* key = std::getenv("OPENAI_API_KEY"))
    req.set(http::field::authorization, cat("Bearer ", key));
  req.body() = body;
  req.prepare_payload();
  http::write(stream, req);
  beast::flat_buffer buf;
  http::response_parser<http::string_body> parser;
  parser.body_limit(1ull << 30);
  http::read(stream, buf, parser);
  return {static_cast<int>(parser.get().result_int()), parser.get().body()};
}

struct Job {
  size_t index;
  const bench::SampleRequest* req;
  double send_at;
};

class Runner {
 public:
  Runner(const BenchArgs& a, const Url& u, std::string model_name, ojson extra)
      : a_(a), u_(u), model_(std::move(model_name)), extra_(std::move(extra)) {}

  std::vector<bench::RequestOutput> run(const std::vector<bench::SampleRequest>& reqs,
                                        const std::vector<double>& send_at, bool progress,
                                        double& duration) {
    outputs_.assign(reqs.size(), {});
    progress_ = progress;
    total_ = reqs.size();
    start_ = Clock::now();
    for (size_t i = 0; i < reqs.size(); ++i) {
      net::co_spawn(ioc_, one(i, reqs[i], send_at[i]), net::detached);
    }
    ioc_.run();
    duration = std::chrono::duration<double>(last_done_ - start_).count();
    if (progress_) std::fprintf(stderr, "\n");
    return std::move(outputs_);
  }

 private:
  double now() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

  std::string payload(const bench::SampleRequest& r) const {
    ojson p;
    p["model"] = model_;
    if (a_.backend == "openai-chat") {
      p["messages"] = ojson::array({{{"role", "user"}, {"content", r.prompt}}});
      p["max_completion_tokens"] = r.expected_output_len;
    } else {
      p["prompt"] = r.prompt;
      p["repetition_penalty"] = 1.0;
      p["max_tokens"] = r.expected_output_len;
      p["logprobs"] = a_.logprobs >= 0 ? ojson(a_.logprobs) : ojson(nullptr);
    }
    p["stream"] = true;
    p["stream_options"] = {{"include_usage", true}};
    if (a_.ignore_eos) p["ignore_eos"] = true;
    for (const auto& [k, v] : extra_.items()) p[k] = v;
    return p.dump();
  }

  net::awaitable<void> acquire() {
    if (!a_.max_concurrency) co_return;
    while (in_flight_ >= *a_.max_concurrency) {
      auto t = std::make_shared<net::steady_timer>(ioc_, net::steady_timer::time_point::max());
      waiters_.push_back(t);
      boost::system::error_code ec;
      co_await t->async_wait(net::redirect_error(net::use_awaitable, ec));
    }
    ++in_flight_;
  }
  void release() {
    if (!a_.max_concurrency) return;
    --in_flight_;
    if (!waiters_.empty()) {
      waiters_.front()->cancel();
      waiters_.pop_front();
    }
  }

  net::awaitable<void> one(size_t i, const bench::SampleRequest& r, double send_at) {
    net::steady_timer timer(ioc_, start_ + std::chrono::duration_cast<Clock::duration>(
                                               std::chrono::duration<double>(send_at)));
    if (send_at > 0) co_await timer.async_wait(net::use_awaitable);
    co_await acquire();
    bench::RequestOutput& o = outputs_[i];
    o.prompt_len = r.prompt_len;
    const std::string body = payload(r);
    const double st = now();
    o.start_time = st;
    double last = st;
    bool first = false;
    try {
      tcp::resolver resolver(ioc_);
      beast::tcp_stream stream(ioc_);
      stream.expires_never();
      auto endpoints = co_await resolver.async_resolve(u_.host, u_.port, net::use_awaitable);
      co_await stream.async_connect(endpoints, net::use_awaitable);
      http::request<http::string_body> req{http::verb::post, u_.base_path + a_.endpoint, 11};
      req.set(http::field::host, u_.host);
      req.set(http::field::content_type, "application/json");
      if (const char* key = std::getenv("OPENAI_API_KEY"))
        req.set(http::field::authorization, cat("Bearer ", key));
      req.body() = body;
      req.prepare_payload();
      co_await http::async_write(stream, req, net::use_awaitable);
      beast::flat_buffer buf;
      http::response_parser<http::buffer_body> parser;
      parser.body_limit(boost::none);
      co_await http::async_read_header(stream, buf, parser, net::use_awaitable);
      const int status = static_cast<int>(parser.get().result_int());
      std::string sse;
      char chunk[65536];
      while (!parser.is_done()) {
        parser.get().body().data = chunk;
        parser.get().body().size = sizeof chunk;
        boost::system::error_code ec;
        co_await http::async_read_some(stream, buf, parser,
                                       net::redirect_error(net::use_awaitable, ec));
        if (ec && ec != http::error::need_buffer) throw boost::system::system_error(ec);
        sse.append(chunk, sizeof chunk - parser.get().body().size);
        if (status != 200) continue;
        // Complete SSE events, timestamped as they are parsed.
        size_t pos;
        while ((pos = sse.find("\n\n")) != std::string::npos) {
          std::string msg = sse.substr(0, pos);
          sse.erase(0, pos + 2);
          while (!msg.empty() && (msg.back() == '\r' || msg.back() == ' ')) msg.pop_back();
          if (msg.empty() || msg[0] == ':' || msg.rfind("data: ", 0) != 0) continue;
          const std::string data = msg.substr(6);
          if (data == "[DONE]") continue;
          const double ts = now();
          auto j = ojson::parse(data, nullptr, false);
          if (j.is_discarded()) continue;
          auto ch = j.find("choices");
          if (ch != j.end() && ch->is_array() && !ch->empty()) {
            const ojson& c0 = (*ch)[0];
            std::string text;
            if (c0.contains("text") && c0["text"].is_string()) text = c0["text"];
            if (c0.contains("delta") && c0["delta"].is_object() &&
                c0["delta"].contains("content") && c0["delta"]["content"].is_string()) {
              text = c0["delta"]["content"];
            }
            if (!first) {
              first = true;
              o.ttft = ts - st;
            } else {
              o.itl.push_back(ts - last);
            }
            last = ts;
            o.generated_text += text;
          } else if (auto us = j.find("usage"); us != j.end() && us->is_object()) {
            if (us->contains("completion_tokens") &&
                (*us)["completion_tokens"].is_number_integer()) {
              o.output_tokens = (*us)["completion_tokens"];
            }
            if (us->contains("prompt_tokens") && (*us)["prompt_tokens"].is_number_integer()) {
              o.prompt_len = (*us)["prompt_tokens"];
            }
          }
        }
      }
      if (status != 200) {
        o.error = cat("HTTP ", status, ": ", sse.substr(0, 500));
      } else if (!first) {
        o.error =
            "Never received a valid chunk to calculate TTFT. This response will be marked as "
            "failed!";
      } else {
        o.success = true;
      }
      o.latency = last - st;
      boost::system::error_code ignored;
      stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
    } catch (const std::exception& e) {
      o.success = false;
      o.error = e.what();
    }
    release();
    last_done_ = Clock::now();
    ++done_;
    if (progress_) {
      const int width = 40;
      const int fill = static_cast<int>(width * done_ / std::max<size_t>(total_, 1));
      std::fprintf(stderr, "\r%3d%%|%s%s| %zu/%zu [%.1fs]",
                   static_cast<int>(100 * done_ / std::max<size_t>(total_, 1)),
                   std::string(fill, '#').c_str(), std::string(width - fill, ' ').c_str(), done_,
                   total_, now());
    }
  }

  const BenchArgs& a_;
  Url u_;
  std::string model_;
  ojson extra_;  // merged into every request body
  net::io_context ioc_{1};
  std::vector<bench::RequestOutput> outputs_;
  Clock::time_point start_, last_done_;
  int in_flight_ = 0;
  std::deque<std::shared_ptr<net::steady_timer>> waiters_;
  size_t done_ = 0, total_ = 0;
  bool progress_ = true;
};

// What every request carries besides the prompt, as vllm bench serve sends it: the sampling
// parameters given (temperature 0, greedy decoding, when none is), then --extra-body over them.
ojson request_extras(const BenchArgs& a) {
  ojson e = ojson::object();
  if (a.top_p) e["top_p"] = *a.top_p;
  if (a.top_k) e["top_k"] = *a.top_k;
  if (a.min_p) e["min_p"] = *a.min_p;
  e["temperature"] = a.temperature ? *a.temperature : 0.0;
  if (a.frequency_penalty) e["frequency_penalty"] = *a.frequency_penalty;
  if (a.presence_penalty) e["presence_penalty"] = *a.presence_penalty;
  if (a.repetition_penalty) e["repetition_penalty"] = *a.repetition_penalty;
  if (!a.extra_body.empty()) {
    const ojson body = ojson::parse(a.extra_body, nullptr, false);
    if (body.is_discarded() || !body.is_object())
      throw Error(cat("--extra-body: '", a.extra_body, "' is not a JSON object"));
    for (const auto& [k, v] : body.items()) e[k] = v;
  }
  return e;
}

std::vector<double> parse_list(const std::string& s) {
  std::vector<double> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      out.push_back(std::stod(item));
    } catch (const std::exception&) {
      throw Error(cat("--metric-percentiles: '", item, "' is not a number"));
    }
  }
  return out;
}

}  // namespace

CLI::App* add_bench(CLI::App& app, BenchArgs& a) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  CLI::App* c = bench->add_subcommand(
      "serve", "Benchmark an OpenAI-compatible server (like vllm bench serve)");
  c->add_option("--backend", a.backend)
      ->check(CLI::IsMember({"openai", "openai-chat", "vllm"}))
      ->capture_default_str();
  c->add_option("--base-url", a.base_url, "Server base URL instead of --host/--port");
  c->add_option("--host", a.host)->capture_default_str();
  c->add_option("--port", a.port)->check(CLI::Range(1, 65535))->capture_default_str();
  c->add_option("--endpoint", a.endpoint,
                "API path (default /v1/completions; /v1/chat/completions for openai-chat)");
  c->add_option("--model", a.model, "Model name (default: the first of /v1/models)");
  c->add_option("--served-model-name", a.served_model_name,
                "Name sent in requests (default: --model)");
  c->add_option("--tokenizer", a.tokenizer, "Tokenizer directory (default: the model's, if local)");
  c->add_option("--dataset-name", a.dataset_name)
      ->check(CLI::IsMember({"random", "sharegpt", "custom"}))
      ->capture_default_str();
  c->add_option("--dataset-path", a.dataset_path,
                "The sharegpt dataset (a JSON file) or the custom one (JSON lines)");
  c->add_option("--sharegpt-output-len", a.sharegpt_output_len,
                "Output tokens per request, instead of the dataset's reply lengths");
  c->add_option("--custom-output-len", a.custom_output_len,
                "Output tokens per request of the custom dataset (-1: each line's "
                "\"output_tokens\")")
      ->capture_default_str();
  c->add_flag("--skip-chat-template", a.skip_chat_template,
              "Send the custom dataset's prompts without the chat template");
  c->add_flag("--disable-shuffle", a.disable_shuffle, "Take the dataset's samples in file order");
  c->add_flag("--no-oversample", a.no_oversample,
              "Do not repeat samples when the dataset has fewer than --num-prompts");
  c->add_option("--random-input-len,--input-len", a.input_len)->capture_default_str();
  c->add_option("--random-output-len,--output-len", a.output_len)->capture_default_str();
  c->add_option("--random-range-ratio", a.range_ratio)->capture_default_str();
  c->add_option("--random-prefix-len", a.prefix_len)->capture_default_str();
  c->add_option("--num-prompts", a.num_prompts)->capture_default_str();
  c->add_option("--request-rate", a.request_rate, "Requests per second (inf: all at once)")
      ->capture_default_str();
  c->add_option("--burstiness", a.burstiness, "Gamma shape of arrivals; 1 is Poisson")
      ->capture_default_str();
  c->add_option("--max-concurrency", a.max_concurrency, "Most requests in flight at once");
  c->add_flag("--ignore-eos", a.ignore_eos,
              "Send ignore_eos so every request runs to its output length (always on with the "
              "random dataset, as in vLLM)");
  c->add_option("--logprobs", a.logprobs, "logprobs sent with completions requests");
  c->add_option("--top-p", a.top_p, "Top-p sent with every request")->group("Sampling parameters");
  c->add_option("--top-k", a.top_k, "Top-k sent with every request")->group("Sampling parameters");
  c->add_option("--min-p", a.min_p, "Min-p sent with every request")->group("Sampling parameters");
  c->add_option("--temperature", a.temperature,
                "Temperature sent with every request (default 0: greedy decoding)")
      ->group("Sampling parameters");
  c->add_option("--frequency-penalty", a.frequency_penalty,
                "Frequency penalty sent with every request")
      ->group("Sampling parameters");
  c->add_option("--presence-penalty", a.presence_penalty,
                "Presence penalty sent with every request")
      ->group("Sampling parameters");
  c->add_option("--repetition-penalty", a.repetition_penalty,
                "Repetition penalty sent with every request")
      ->group("Sampling parameters");
  c->add_option("--extra-body", a.extra_body,
                "A JSON object merged into every request body (over the sampling parameters)");
  c->add_option("--percentile-metrics", a.percentile_metrics, "Comma-separated: ttft,tpot,itl,e2el")
      ->capture_default_str();
  c->add_option("--metric-percentiles", a.metric_percentiles, "Comma-separated percentiles")
      ->capture_default_str();
  c->add_option("--goodput", a.goodput, "SLOs as KEY:VALUE in ms (ttft, tpot, e2el)");
  c->add_option("--seed", a.seed)->capture_default_str();
  c->add_flag("--save-result", a.save_result, "Write the result JSON");
  c->add_flag("--save-detailed", a.save_detailed, "Include per-request detail in the result JSON");
  c->add_option("--result-dir", a.result_dir);
  c->add_option("--result-filename", a.result_filename);
  c->add_option("--metadata", a.metadata, "KEY=VALUE pairs recorded in the result JSON");
  c->add_option("--label", a.label, "Result label (default: the backend)");
  c->add_option("--num-warmups", a.num_warmups)->capture_default_str();
  c->add_flag("--disable-tqdm", a.disable_tqdm, "No progress bar");
  c->add_option("--ready-check-timeout-sec", a.ready_check_timeout_sec,
                "Seconds to wait for the server's first answer, retrying every 5 s (0: no wait)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  // Accepted for compatibility with vLLM command lines (the recipes' `--trust-remote-code`).
  c->add_flag(
       "--trust-remote-code", [&a](int64_t) { a.ignored.push_back("--trust-remote-code"); },
       "Accepted for vLLM compatibility (no effect)")
      ->group("Compatibility");
  c->add_option_function<std::string>(
       "--tokenizer-mode", [&a](const std::string&) { a.ignored.push_back("--tokenizer-mode"); },
       "Accepted for vLLM compatibility (no effect)")
      ->group("Compatibility");
  return c;
}

int run_bench(const BenchArgs& a) {
  for (const auto& f : a.ignored)
    log::info("note: ", f, " is accepted for vLLM compatibility and has no effect");
  if (a.dataset_name == "random" && !a.dataset_path.empty()) {
    throw Error(
        cat("Cannot use 'random' dataset with --dataset-path. Please specify the "
            "appropriate --dataset-name (e.g., 'sharegpt', 'custom') for your dataset "
            "file: ",
            a.dataset_path));
  }
  if (a.dataset_name != "random" && a.dataset_path.empty())
    throw Error(cat("--dataset-name ", a.dataset_name, " needs --dataset-path"));
  if (a.num_prompts < 1) throw Error("--num-prompts must be at least 1");
  if (!(a.request_rate > 0)) throw Error("--request-rate must be positive (inf: send all at once)");
  if (!(a.burstiness > 0)) throw Error("--burstiness must be positive");
  if (a.max_concurrency && *a.max_concurrency < 1)
    throw Error("--max-concurrency must be at least 1");
  const std::vector<double> percentiles = parse_list(a.metric_percentiles);
  for (double p : percentiles) {
    if (!(p >= 0 && p <= 100)) throw Error(cat("--metric-percentiles: ", p, " is not in [0, 100]"));
  }
  const ojson extra = request_extras(a);
  std::vector<std::string> metrics;
  {
    std::stringstream ss(a.percentile_metrics);
    std::string m;
    while (std::getline(ss, m, ',')) {
      if (m != "ttft" && m != "tpot" && m != "itl" && m != "e2el")
        throw Error(cat("--percentile-metrics: unknown metric '", m, "'"));
      metrics.push_back(m);
    }
  }
  std::map<std::string, double> goodput;
  for (const auto& g : a.goodput) {
    const size_t colon = g.find(':');
    if (colon == std::string::npos)
      throw Error(cat("--goodput '", g, "': expected KEY:VALUE in ms"));
    const std::string key = g.substr(0, colon);
    if (key != "ttft" && key != "tpot" && key != "e2el")
      throw Error(cat("--goodput: unknown metric '", key, "'"));
    double v;
    try {
      v = std::stod(g.substr(colon + 1));
    } catch (const std::exception&) {
      throw Error(cat("--goodput '", g, "': the value is not a number"));
    }
    if (v < 0) throw Error(cat("--goodput '", g, "': the value must be non-negative"));
    goodput[key] = v;
  }
  const Url u = parse_base(a);
  BenchArgs args = a;
  // As vllm bench serve: the random dataset's requests run to their output length.
  args.ignore_eos = args.ignore_eos || a.dataset_name == "random";
  if (args.endpoint.empty())
    args.endpoint = a.backend == "openai-chat" ? "/v1/chat/completions" : "/v1/completions";

  // The model: given, or the first the server lists.
  std::string model = a.model, root;
  {
    int status = 0;
    std::string body;
    try {
      std::tie(status, body) = blocking_request(u, http::verb::get, "/v1/models", "");
    } catch (const std::exception& e) {
      // Not up yet: with --model given, the ready check below waits for it.
      if (model.empty())
        throw Error(cat("cannot list models at ", u.host, ":", u.port, "/v1/models (", e.what(),
                        "); give --model to wait for the server"));
    }
    auto j = ojson::parse(body, nullptr, false);
    if (status != 200 || j.is_discarded() || !j.contains("data") || !j["data"].is_array() ||
        j["data"].empty()) {
      if (model.empty())
        throw Error(
            cat("cannot list models at ", u.host, ":", u.port, "/v1/models (HTTP ", status, ")"));
    } else {
      if (model.empty()) model = j["data"][0].value("id", "");
      root = j["data"][0].value("root", "");
    }
  }
  const std::string name_sent = a.served_model_name.empty() ? model : a.served_model_name;

  // The tokenizer: local when given or when the model is a local directory; else the server's.
  bench::TokenizerOps ops;
  std::string tok_dir = a.tokenizer;
  if (tok_dir.empty()) {
    for (const std::string& cand : {model, root}) {
      if (!cand.empty() &&
          std::filesystem::exists(std::filesystem::path(cand) / "tokenizer.model")) {
        tok_dir = cand;
        break;
      }
    }
  }
  if (tok_dir.empty() && !model.empty()) {
    // A Hugging Face id whose files are in the local cache (as vLLM's client loads them).
    try {
      model::ResolveOptions ro;
      ro.allow_download = false;
      const auto cached = model::resolve_model(model, ro);
      if (std::filesystem::exists(cached / "tokenizer.model")) tok_dir = cached.string();
    } catch (const std::exception&) {
    }
  }
  std::shared_ptr<const tokenizer::Tokenizer> tok;
  if (!tok_dir.empty()) {
    tok = tokenizer::Tokenizer::load(tok_dir);
    ops.vocab_size = tok->base_vocab_size();  // as transformers' tokenizer.vocab_size
    for (int32_t id = 0; id < tok->vocab_size(); ++id) {
      if (tok->is_special(id)) ops.special_ids.push_back(id);
    }
    ops.decode = [tok](const std::vector<int32_t>& ids) { return tok->decode(ids, false); };
    ops.encode = [tok](const std::string& s) { return tok->encode(s, false); };
    ops.encode_special = [tok](const std::string& s) { return tok->encode(s, true); };
  } else {
    log::info("no local tokenizer: using the server's /tokenize and /detokenize");
    auto detok = [&u, &name_sent](const std::vector<int32_t>& ids) {
      auto [status, body] = blocking_request(u, http::verb::post, "/detokenize",
                                             ojson{{"model", name_sent}, {"tokens", ids}}.dump());
      auto j = ojson::parse(body, nullptr, false);
      if (status != 200 || j.is_discarded() || !j.contains("prompt"))
        throw Error(cat("/detokenize failed: HTTP ", status));
      return j["prompt"].get<std::string>();
    };
    ops.decode = detok;
    auto server_encode = [&u, &name_sent](const std::string& s, bool special) {
      auto [status, body] = blocking_request(
          u, http::verb::post, "/tokenize",
          ojson{{"model", name_sent}, {"prompt", s}, {"add_special_tokens", special}}.dump());
      auto j = ojson::parse(body, nullptr, false);
      if (status != 200 || j.is_discarded() || !j.contains("tokens"))
        throw Error(cat("/tokenize failed: HTTP ", status));
      return j["tokens"].get<std::vector<int32_t>>();
    };
    ops.encode = [server_encode](const std::string& s) { return server_encode(s, false); };
    ops.encode_special = [server_encode](const std::string& s) { return server_encode(s, true); };
    // Vocabulary size: the first id that no longer decodes (binary search).
    int64_t lo = 1, hi = 1 << 22;
    auto known = [&](int64_t id) {
      auto [status, body] = blocking_request(u, http::verb::post, "/detokenize",
                                             ojson{{"model", name_sent}, {"tokens", {id}}}.dump());
      auto j = ojson::parse(body, nullptr, false);
      return status == 200 && !j.is_discarded() && j.contains("prompt") &&
             !j["prompt"].get<std::string>().empty();
    };
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (known(mid))
        lo = mid + 1;
      else
        hi = mid;
    }
    ops.vocab_size = lo;
  }
  std::vector<bench::SampleRequest> reqs;
  if (a.dataset_name == "random") {
    bench::RandomDatasetArgs da;
    da.input_len = a.input_len;
    da.output_len = a.output_len;
    da.range_ratio = a.range_ratio;
    da.prefix_len = a.prefix_len;
    da.num_prompts = a.num_prompts;
    da.seed = a.seed;
    int64_t mismatch = 0;
    reqs = bench::random_dataset(ops, da, &mismatch);
    if (mismatch != 0) {
      log::warn("Across all generated prompts, there were ", std::abs(mismatch),
                mismatch > 0 ? " more" : " fewer",
                " tokens than expected after decoding and re-encoding.");
    }
  } else {
    bench::FileDatasetArgs fa;
    fa.path = a.dataset_path;
    fa.num_prompts = a.num_prompts;
    fa.seed = a.seed;
    fa.disable_shuffle = a.disable_shuffle;
    fa.no_oversample = a.no_oversample;
    if (a.dataset_name == "sharegpt") {
      fa.output_len = a.sharegpt_output_len;
      reqs = bench::sharegpt_dataset(fa, ops.encode_special);
    } else {
      fa.output_len = a.custom_output_len;
      std::shared_ptr<const tokenizer::ChatTemplate> chat;
      if (!a.skip_chat_template) {
        if (!tok) {
          throw Error(
              "the custom dataset puts each prompt through the model's chat template: give "
              "--tokenizer (a local model directory) or --skip-chat-template");
        }
        chat = tokenizer::ChatTemplate::for_model(*tok, "");
      }
      reqs = bench::custom_dataset(fa, ops.encode_special, [&](const std::string& p) {
        if (!chat) return p;
        tokenizer::ChatOptions opts;
        opts.add_generation_prompt = true;
        return chat->render(*tok, ojson::array({{{"role", "user"}, {"content", p}}}), opts);
      });
    }
    if (reqs.empty()) throw Error(cat(a.dataset_path, ": no usable samples"));
    log::info("dataset ", a.dataset_name, ": ", reqs.size(), " requests from ", a.dataset_path);
  }

  std::cout << "Starting initial single prompt test run..." << std::endl;
  if (a.ready_check_timeout_sec > 0) {
    // As vLLM's wait_for_endpoint: the first request again every 5 s until it succeeds.
    std::cout << "Waiting for endpoint to become up in " << a.ready_check_timeout_sec << " seconds"
              << std::endl;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(a.ready_check_timeout_sec);
    bench::RequestOutput out;
    for (;;) {
      Runner probe(args, u, name_sent, extra);
      double d = 0;
      out = probe.run({reqs[0]}, {0.0}, false, d)[0];
      if (out.success || std::chrono::steady_clock::now() + std::chrono::seconds(5) > deadline)
        break;
      std::this_thread::sleep_for(std::chrono::seconds(5));
    }
    if (!out.success)
      throw Error(
          cat("Initial test run failed - Please make sure benchmark arguments are correctly "
              "specified. Error: ",
              out.error));
    std::cout << "Initial test run completed." << std::endl;
  } else {
    std::cout << "Skipping endpoint ready check." << std::endl;
  }
  if (a.num_warmups > 0) {
    std::cout << "Warming up with " << a.num_warmups << " requests..." << std::endl;
    Runner warm(args, u, name_sent, extra);
    double d = 0;
    warm.run(std::vector<bench::SampleRequest>(a.num_warmups, reqs[0]),
             std::vector<double>(a.num_warmups, 0.0), false, d);
    std::cout << "Warmup run completed." << std::endl;
  }
  std::cout << "Starting main benchmark run..." << std::endl;
  std::cout << "Traffic request rate: "
            << (std::isinf(a.request_rate) ? std::string("inf") : cat(a.request_rate)) << std::endl;
  std::cout << "Burstiness factor: " << a.burstiness << " ("
            << (a.burstiness == 1.0 ? "Poisson process" : "Gamma distribution") << ")" << std::endl;
  std::cout << "Maximum request concurrency: "
            << (a.max_concurrency ? std::to_string(*a.max_concurrency) : std::string("None"))
            << std::endl;
  const auto send_at = bench::arrival_times(a.num_prompts, a.request_rate, a.burstiness, a.seed);
  Runner runner(args, u, name_sent, extra);
  double duration = 0;
  const auto outputs = runner.run(reqs, send_at, !a.disable_tqdm, duration);
  const auto m = bench::calculate_metrics(outputs, duration, percentiles, goodput);
  int shown = 0;
  for (const auto& o : outputs) {
    if (!o.success && shown < 10) {
      if (shown == 0)
        std::cout << "Failed requests during benchmark run detected (capping to 10):" << std::endl;
      std::cout << "Error " << shown++ << ": " << o.error << std::endl;
    }
  }
  bench::PrintOptions po;
  po.max_concurrency = a.max_concurrency;
  po.request_rate = a.request_rate;
  po.percentile_metrics = metrics;
  po.goodput = !goodput.empty();
  ojson result = ojson::object();
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y%m%d-%H%M%S", std::localtime(&now));
  result["date"] = date;
  result["endpoint_type"] = a.backend;
  result["backend"] = a.backend;
  result["label"] = a.label.empty() ? a.backend : a.label;
  result["model_id"] = model;
  result["tokenizer_id"] = tok_dir.empty() ? model : tok_dir;
  result["num_prompts"] = a.num_prompts;
  result["request_rate"] = std::isinf(a.request_rate) ? ojson("inf") : ojson(a.request_rate);
  result["burstiness"] = a.burstiness;
  result["max_concurrency"] = a.max_concurrency ? ojson(*a.max_concurrency) : ojson(nullptr);
  for (const auto& kv : a.metadata) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) throw Error(cat("--metadata '", kv, "': expected KEY=VALUE"));
    result[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  std::cout << bench::format_result(m, po, result) << std::flush;
  if (a.save_detailed || a.save_result) {
    if (a.save_detailed) {
      ojson in = ojson::array(), outl = ojson::array(), ttfts = ojson::array(),
            itls = ojson::array(), lat = ojson::array(), starts = ojson::array(),
            texts = ojson::array(), errs = ojson::array();
      for (size_t i = 0; i < outputs.size(); ++i) {
        in.push_back(outputs[i].prompt_len);
        outl.push_back(m.output_lens[i]);
        ttfts.push_back(outputs[i].ttft);
        itls.push_back(outputs[i].itl);
        lat.push_back(outputs[i].latency);
        starts.push_back(outputs[i].start_time);
        texts.push_back(outputs[i].generated_text);
        errs.push_back(outputs[i].error);
      }
      result["input_lens"] = in;
      result["output_lens"] = outl;
      result["ttfts"] = ttfts;
      result["itls"] = itls;
      result["latencies"] = lat;
      result["start_times"] = starts;
      result["generated_texts"] = texts;
      result["errors"] = errs;
    }
    std::string base =
        model.substr(model.rfind('/') == std::string::npos ? 0 : model.rfind('/') + 1);
    std::string file =
        a.result_filename.empty()
            ? cat(a.label.empty() ? a.backend : a.label, "-",
                  std::isinf(a.request_rate) ? std::string("inf") : cat(a.request_rate), "qps",
                  a.max_concurrency ? cat("-concurrency", *a.max_concurrency) : std::string(), "-",
                  base, "-", date, ".json")
            : a.result_filename;
    if (!a.result_dir.empty()) {
      std::filesystem::create_directories(a.result_dir);
      file = (std::filesystem::path(a.result_dir) / file).string();
    }
    std::ofstream f(file);
    f << result.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    if (!f) throw Error(cat(file, ": cannot write the result"));
    log::info("result written to ", file);
  }
  return m.completed > 0 ? 0 : 1;
}

}  // namespace ernie::cli
