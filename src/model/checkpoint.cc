#include "model/checkpoint.h"

#include <curl/curl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/check.h"
#include "common/log.h"

namespace ernie::model {
namespace fs = std::filesystem;
namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

bool is_repo_id(const std::string& s) {
  static const std::regex re(R"(^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$)");
  return std::regex_match(s, re) && s.find("..") == std::string::npos;
}

std::string repo_folder(const std::string& repo) {
  std::string out = "models--" + repo;
  size_t p;
  while ((p = out.find('/')) != std::string::npos) out.replace(p, 1, "--");
  return out;
}

// A snapshot of the repo at `revision` already in the cache, if it has a config.json.
std::optional<fs::path> cached_snapshot(const fs::path& cache, const std::string& repo,
                                        const std::string& revision) {
  const fs::path root = cache / repo_folder(repo);
  std::string commit = revision;
  const fs::path ref = root / "refs" / revision;
  if (fs::exists(ref)) {
    std::ifstream f(ref);
    std::getline(f, commit);
  }
  const fs::path snap = root / "snapshots" / commit;
  if (fs::exists(snap / "config.json")) return snap;
  return std::nullopt;
}

// ---- downloading ----

// One GET: the handle with the options every hub request shares (auth, redirects, timeouts).
struct Curl {
  CURL* h = curl_easy_init();
  curl_slist* headers = nullptr;
  Curl(const std::string& url, curl_write_callback write, void* sink);
  ~Curl() {
    curl_slist_free_all(headers);
    if (h) curl_easy_cleanup(h);
  }
  // Performs the request; returns the curl code and the HTTP status.
  std::pair<CURLcode, long> perform() {
    const CURLcode rc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    return {rc, status};
  }
};

size_t to_string(char* p, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(p, size * n);
  return size * n;
}

struct FileSink {
  std::FILE* f;
  int64_t have, total;
  std::string name;
  std::chrono::steady_clock::time_point last;
};

size_t to_file(char* p, size_t size, size_t n, void* user) {
  auto* s = static_cast<FileSink*>(user);
  const size_t wrote = std::fwrite(p, size, n, s->f) * size;
  s->have += static_cast<int64_t>(wrote);
  const auto now = std::chrono::steady_clock::now();
  if (now - s->last > std::chrono::milliseconds(500)) {
    s->last = now;
    if (s->total > 0) {
      std::fprintf(stderr, "\r  %s: %6.1f%% (%.1f / %.1f MB)", s->name.c_str(),
                   100.0 * s->have / s->total, s->have / 1e6, s->total / 1e6);
    } else {
      std::fprintf(stderr, "\r  %s: %.1f MB", s->name.c_str(), s->have / 1e6);
    }
  }
  return wrote;
}

curl_slist* auth_headers() {
  curl_slist* h = nullptr;
  const std::string token =
      !env("HF_TOKEN").empty() ? env("HF_TOKEN") : env("HUGGING_FACE_HUB_TOKEN");
  if (!token.empty()) h = curl_slist_append(h, ("Authorization: Bearer " + token).c_str());
  return h;
}

std::string http_error(long status, const std::string& what, const std::string& repo) {
  if (status == 401 || status == 403) {
    return cat(what, ": HTTP ", status, ": '", repo,
               "' is gated or private: set HF_TOKEN to a token with access");
  }
  if (status == 404)
    return cat(what, ": HTTP 404: '", repo, "' (or this revision) does not exist on the hub");
  return cat(what, ": HTTP ", status);
}

Curl::Curl(const std::string& url, curl_write_callback write, void* sink)
    : headers(auth_headers()) {
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, sink);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 20L);
  curl_easy_setopt(h, CURLOPT_USERAGENT, "ernie");
}

nlohmann::json fetch_json(const std::string& url, const std::string& repo) {
  std::string body;
  Curl c(url, to_string, &body);
  const auto [rc, status] = c.perform();
  if (rc != CURLE_OK)
    throw Error(cat("cannot reach the hub at ", url, ": ", curl_easy_strerror(rc)));
  if (status != 200) throw Error(http_error(status, url, repo));
  auto j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded()) throw Error(cat(url, ": the hub answered something that is not JSON"));
  return j;
}

// Downloads url into dest, resuming from dest.incomplete; retries transient failures.
void download(const std::string& url, const fs::path& dest, const std::string& repo,
              int64_t size_hint) {
  const fs::path part = dest.string() + ".incomplete";
  for (int attempt = 1;; ++attempt) {
    const int64_t have = fs::exists(part) ? static_cast<int64_t>(fs::file_size(part)) : 0;
    std::FILE* f = std::fopen(part.c_str(), "ab");
    if (!f) throw Error(cat(part.string(), ": cannot write: ", std::strerror(errno)));
    FileSink sink{f, have, size_hint, dest.filename().string(), std::chrono::steady_clock::now()};
    Curl c(url, to_file, &sink);
    curl_easy_setopt(c.h, CURLOPT_LOW_SPEED_LIMIT, 1L);  // give up on a stalled transfer
    curl_easy_setopt(c.h, CURLOPT_LOW_SPEED_TIME, 60L);
    if (have > 0) curl_easy_setopt(c.h, CURLOPT_RESUME_FROM_LARGE, static_cast<curl_off_t>(have));
    const auto [rc, status] = c.perform();
    std::fclose(f);
    if (rc == CURLE_OK && (status == 200 || status == 206)) {
      std::fprintf(stderr, "\r  %s: 100%% (%.1f MB)\n", sink.name.c_str(), sink.have / 1e6);
      if (status == 200 && have > 0) {
        // The server ignored the range: the file restarted from zero; keep only the new bytes.
        throw Error(cat(url, ": the server does not support resuming; delete ", part.string(),
                        " and retry"));
      }
      fs::rename(part, dest);
      return;
    }
    if (rc == CURLE_OK && status == 416) {  // already complete
      fs::rename(part, dest);
      return;
    }
    if (rc == CURLE_OK && status != 200 && status != 206)
      throw Error(http_error(status, url, repo));
    std::fprintf(stderr, "\n");
    if (attempt >= 5) throw Error(cat("downloading ", url, " failed: ", curl_easy_strerror(rc)));
    log::warn("download of ", dest.filename().string(), " interrupted (", curl_easy_strerror(rc),
              "): resuming");
  }
}

bool wanted(const std::string& f) {
  static const char* exact[] = {
      "config.json",         "generation_config.json",       "tokenizer.model",
      "tokenizer.json",      "tokenizer_config.json",        "special_tokens_map.json",
      "chat_template.jinja", "model.safetensors.index.json", "added_tokens.json"};
  for (const char* e : exact) {
    if (f == e) return true;
  }
  return f.find('/') == std::string::npos && f.size() > 12 &&
         f.compare(f.size() - 12, 12, ".safetensors") == 0;
}

fs::path download_snapshot(const fs::path& cache, const std::string& repo,
                           const std::string& revision) {
  std::string endpoint = env("HF_ENDPOINT").empty() ? "https://huggingface.co" : env("HF_ENDPOINT");
  while (!endpoint.empty() && endpoint.back() == '/') endpoint.pop_back();
  static const bool init = [] { return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK; }();
  (void)init;
  const auto info = fetch_json(cat(endpoint, "/api/models/", repo, "/revision/", revision), repo);
  if (!info.contains("sha") || !info["sha"].is_string() || !info.contains("siblings") ||
      !info["siblings"].is_array()) {
    throw Error(cat(endpoint, ": unexpected model info for '", repo, "'"));
  }
  const std::string sha = info["sha"];
  if (sha.empty() || sha.find('/') != std::string::npos || sha.find("..") != std::string::npos) {
    throw Error(cat(endpoint, ": bad revision id '", sha, "'"));
  }
  const fs::path root = cache / repo_folder(repo);
  const fs::path snap = root / "snapshots" / sha;
  fs::create_directories(snap);
  fs::create_directories(root / "refs");
  std::vector<std::pair<std::string, int64_t>> files;
  for (const auto& s : info["siblings"]) {
    if (!s.is_object() || !s.contains("rfilename") || !s["rfilename"].is_string()) continue;
    const std::string f = s["rfilename"];
    const int64_t size =
        s.contains("size") && s["size"].is_number_integer() ? s["size"].get<int64_t>() : -1;
    if (wanted(f)) files.emplace_back(f, size);
  }
  log::info("Downloading ", repo, "@", revision, " (", files.size(), " files) into ",
            snap.string());
  for (const auto& [f, size] : files) {
    if (fs::exists(snap / f)) continue;
    download(cat(endpoint, "/", repo, "/resolve/", sha, "/", f), snap / f, repo, size);
  }
  if (!fs::exists(snap / "config.json"))
    throw Error(cat("'", repo, "' has no config.json: not a model repository"));
  std::ofstream(root / "refs" / revision) << sha;
  return snap;
}

}  // namespace

fs::path hub_cache_dir(const std::string& override_dir) {
  if (!override_dir.empty()) return override_dir;
  if (!env("HF_HUB_CACHE").empty()) return env("HF_HUB_CACHE");
  if (!env("HF_HOME").empty()) return fs::path(env("HF_HOME")) / "hub";
  const std::string home = env("HOME").empty() ? "/tmp" : env("HOME");
  return fs::path(home) / ".cache" / "huggingface" / "hub";
}

fs::path resolve_model(const std::string& name, const ResolveOptions& opts) {
  if (fs::is_directory(name)) return name;
  if (!is_repo_id(name)) {
    throw Error(
        cat("model '", name,
            "' is neither a directory nor a Hugging Face id (like baidu/ERNIE-4.5-21B-A3B-PT)"));
  }
  const fs::path cache = hub_cache_dir(opts.cache_dir);
  if (auto snap = cached_snapshot(cache, name, opts.revision)) {
    log::info("Using ", name, " from the Hugging Face cache: ", snap->string());
    return *snap;
  }
  if (!opts.allow_download || env("HF_HUB_OFFLINE") == "1") {
    throw Error(cat("model '", name, "' is not in the Hugging Face cache (", cache.string(),
                    ") and downloads are off"));
  }
  return download_snapshot(cache, name, opts.revision);
}

}  // namespace ernie::model
