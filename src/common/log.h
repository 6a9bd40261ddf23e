// Minimal leveled logging to stderr, vLLM-like: "INFO 11-25 07:30:01 message".
#pragma once

#include <string_view>

#include "common/check.h"

namespace ernie::log {

enum class Level { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

void set_level(Level level);
Level level();
void write(Level level, std::string_view message);

template <typename... Args>
void info(const Args&... args) {
  if (level() <= Level::kInfo) write(Level::kInfo, cat(args...));
}
template <typename... Args>
void warn(const Args&... args) {
  if (level() <= Level::kWarning) write(Level::kWarning, cat(args...));
}
template <typename... Args>
void error(const Args&... args) {
  write(Level::kError, cat(args...));
}
template <typename... Args>
void debug(const Args&... args) {
  if (level() <= Level::kDebug) write(Level::kDebug, cat(args...));
}

}  // namespace ernie::log
