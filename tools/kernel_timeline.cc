#include "kernel_timeline.h"

#include <cxxabi.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>

namespace ernie::trace {

TimelineSummary summarize(std::vector<KernelSpan> spans) {
  TimelineSummary out;
  if (spans.empty()) return out;
  std::sort(spans.begin(), spans.end(), [](const KernelSpan& a, const KernelSpan& b) {
    return a.start_ns != b.start_ns ? a.start_ns < b.start_ns : a.end_ns < b.end_ns;
  });
  const uint64_t t0 = spans.front().start_ns;
  uint64_t reach = t0;
  for (size_t i = 0; i < spans.size(); ++i) {  // by start: sweep the union of the intervals
    const KernelSpan& s = spans[i];
    if (s.start_ns > reach) {
      const uint64_t gap = s.start_ns - reach;
      out.idle_ns += gap;
      if (gap > out.largest_gap_ns) {
        out.largest_gap_ns = gap;
        out.after_largest_gap = s.name;
        out.after_largest_gap_index = i;
      }
      ++out.gaps;
    }
    if (s.end_ns > reach) {
      out.covered_ns += s.end_ns - std::max(s.start_ns, reach);
      reach = s.end_ns;
    }
  }
  out.span_ns = reach - t0;
  std::stable_sort(spans.begin(), spans.end(),
                   [](const KernelSpan& a, const KernelSpan& b) { return a.end_ns < b.end_ns; });
  std::map<std::string, KernelRow> by_name;
  uint64_t last_end = t0;
  for (const KernelSpan& s : spans) {
    KernelRow& r = by_name[s.name];
    r.name = s.name;
    ++r.calls;
    r.run_ns += s.end_ns - s.start_ns;
    r.adds_ns += s.end_ns - last_end;
    last_end = s.end_ns;
  }
  for (auto& [name, row] : by_name) out.rows.push_back(row);
  std::stable_sort(out.rows.begin(), out.rows.end(),
                   [](const KernelRow& a, const KernelRow& b) { return a.adds_ns > b.adds_ns; });
  return out;
}

std::string short_kernel_name(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(mangled, nullptr, nullptr, &status),
                                           std::free);
  std::string s = status == 0 && d ? d.get() : mangled;
  for (const std::string noise : {"(anonymous namespace)::", "ernie::cuda::"}) {
    for (size_t at; (at = s.find(noise)) != std::string::npos;) s.erase(at, noise.size());
  }
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {  // cut at the first '(' outside template brackets
    if (s[i] == '<') ++depth;
    if (s[i] == '>') --depth;
    if (s[i] == '(' && depth == 0) {
      s.resize(i);
      break;
    }
  }
  if (s.rfind("void ", 0) == 0) s.erase(0, 5);
  return s;
}

}  // namespace ernie::trace
