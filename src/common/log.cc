#include "common/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <mutex>
#include <string>

namespace ernie::log {
namespace {
// The starting level from VLLM_LOGGING_LEVEL, as vLLM reads it (DEBUG, INFO, WARNING, ERROR;
// anything else leaves INFO).
Level initial_level() {
  const char* v = std::getenv("VLLM_LOGGING_LEVEL");
  const std::string name = v ? v : "";
  if (name == "DEBUG") return Level::kDebug;
  if (name == "WARNING") return Level::kWarning;
  if (name == "ERROR") return Level::kError;
  return Level::kInfo;
}
std::atomic<Level> g_level{initial_level()};
std::mutex g_mutex;
}  // namespace

void set_level(Level level) {
  g_level = level;
}
Level level() {
  return g_level;
}

void write(Level level, std::string_view message) {
  static constexpr const char* kNames[] = {"DEBUG", "INFO", "WARNING", "ERROR"};
  auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  localtime_r(&now, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%m-%d %H:%M:%S", &tm);
  std::lock_guard lock(g_mutex);
  std::fprintf(stderr, "%s %s %.*s\n", kNames[static_cast<int>(level)], stamp,
               static_cast<int>(message.size()), message.data());
}

}  // namespace ernie::log
