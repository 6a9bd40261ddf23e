// A/B switches of kernel paths, read from the environment once by each caller (into a static).
// A path that has not been measured on a GPU yet is on only when its variable is "1"
// (new_path_enabled); a measured one is on unless it is "0" (path_enabled).
#pragma once

#include <cstdlib>
#include <cstring>

namespace ernie::cuda {

inline bool new_path_enabled(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline bool path_enabled(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// A switch over several paths, each bit one path: the variable's value as a number (0 when not
// a number), `unset` when it is not set.
inline int switch_bits(const char* name, int unset) {
  const char* v = std::getenv(name);
  return v == nullptr ? unset : std::atoi(v);
}

}  // namespace ernie::cuda
