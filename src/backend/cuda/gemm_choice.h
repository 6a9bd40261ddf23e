// Which timed algorithm a decode-sized GEMM keeps (cuda::TunedGemm), apart from the timing so
// that the rule runs on the host in the unit tests.
#pragma once

#include <cstddef>
#include <vector>

namespace ernie::cuda {

// default_ms: cuBLAS's default GEMM; times[c]: cuBLASLt's heuristic candidate c, in the
// heuristic's order (infinity: refused or not timed). The fastest candidate (the first of equal
// times) is kept only when it beats the default by `margin` (0.03: timing noise is no reason to
// switch). Returns the candidate's index, or -1 for the default.
inline int choose_gemm(double default_ms, const std::vector<double>& times, double margin) {
  int fastest = -1;
  for (size_t c = 0; c < times.size(); ++c) {
    if (fastest < 0 || times[c] < times[fastest]) fastest = static_cast<int>(c);
  }
  if (fastest < 0 || !(times[fastest] < default_ms * (1.0 - margin))) return -1;
  return fastest;
}

}  // namespace ernie::cuda
