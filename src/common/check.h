// Errors and checks. Every public entry point reports bad input by throwing ernie::Error with a
// message a user can act on; internal invariants use ERNIE_CHECK-style helpers below.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace ernie {

// An error meant for the user: the message names what was wrong (file, tensor, field).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Concatenates anything streamable into a string (g++ 12 has no std::format).
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// Throws Error(message) when `ok` is false.
inline void require(bool ok, std::string_view message) {
  if (!ok) throw Error(std::string(message));
}

// Throws Error(cat(parts...)) when `ok` is false, building the message only then: for checks
// on hot paths (per token, per step), where require(ok, cat(...)) would format every time.
template <typename... Args>
void require_parts(bool ok, const Args&... parts) {
  if (!ok) [[unlikely]]
    throw Error(cat(parts...));
}

// An internal invariant: failing means a bug in ernie, so the location is included.
// (__builtin_FILE/LINE rather than std::source_location: clang 14 with libstdc++ 12, which
// builds the fuzzer, lacks the latter.)
inline void check(bool ok, std::string_view what, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  if (!ok) throw Error(cat("internal error: ", what, " (", file, ":", line, ")"));
}

}  // namespace ernie
