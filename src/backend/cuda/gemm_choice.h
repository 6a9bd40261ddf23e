// Which timed algorithm a decode-sized GEMM keeps (cuda::TunedGemm), apart from the timing so
// that the rule runs on the host in the unit tests.
#pragma once

#include <cstddef>
#include <limits>
#include <vector>

namespace ernie::cuda {

// default_ms: cuBLAS's default GEMM; times[c]: cuBLASLt's heuristic candidate c, in the
// heuristic's order (infinity: refused or not timed). A candidate is kept only when the fastest
// beats the default by `margin` (0.03: timing noise is no reason to switch). Among candidates
// within `tie` of the fastest (0: only the fastest itself) the first in the heuristic's order
// is kept, so that two near-equal algorithms do not swap places between processes on noise.
// Returns the candidate's index, or -1 for the default.
inline int choose_gemm(double default_ms, const std::vector<double>& times, double margin,
                       double tie) {
  double best = std::numeric_limits<double>::infinity();
  for (double t : times) best = t < best ? t : best;
  if (!(best < default_ms * (1.0 - margin))) return -1;
  for (size_t c = 0; c < times.size(); ++c) {
    if (times[c] <= best * (1.0 + tie)) return static_cast<int>(c);
  }
  return -1;  // not reached: best is one of the times
}

}  // namespace ernie::cuda
