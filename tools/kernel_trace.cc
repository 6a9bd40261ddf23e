#include "kernel_trace.h"

#include <cuda_runtime.h>
#include <cupti.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

#include "common/check.h"

namespace ernie::trace {
namespace {

constexpr size_t kBufferBytes = 8 << 20;

std::mutex g_mutex;
std::vector<KernelSpan> g_spans;

void check(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return;
  const char* msg = "?";
  cuptiGetResultString(r, &msg);
  throw Error(cat("CUPTI: ", what, ": ", msg));
}

// "void ns::kernel<1, 2>(float*, int)" -> "ns::kernel<1, 2>": the demangled name without the
// return type and the parameter list.
std::string short_name(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(mangled, nullptr, nullptr, &status),
                                           std::free);
  std::string s = status == 0 && d ? d.get() : mangled;
  for (const char* noise : {"(anonymous namespace)::", "ernie::cuda::"}) {
    for (size_t at; (at = s.find(noise)) != std::string::npos;) s.erase(at, std::string(noise).size());
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

void CUPTIAPI on_request(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = kBufferBytes;
  *max_records = 0;
}

void CUPTIAPI on_complete(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::lock_guard<std::mutex> lock(g_mutex);
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL &&
        record->kind != CUPTI_ACTIVITY_KIND_KERNEL) {
      continue;
    }
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
    g_spans.push_back({short_name(k->name), k->start, k->end});
  }
  std::free(buffer);
}

}  // namespace

void start() {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_spans.clear();
  }
  check(cuptiActivityRegisterCallbacks(on_request, on_complete), "register callbacks");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "enable kernel records");
}

std::vector<KernelSpan> stop() {
  cudaDeviceSynchronize();
  check(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "flush");
  check(cuptiActivityDisable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "disable kernel records");
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<KernelSpan> out = std::move(g_spans);
  g_spans.clear();
  std::sort(out.begin(), out.end(),
            [](const KernelSpan& a, const KernelSpan& b) { return a.start_ns < b.start_ns; });
  return out;
}

void print_summary(const std::vector<KernelSpan>& spans, int top) {
  if (spans.empty()) {
    std::printf("  timeline: no kernels recorded\n");
    return;
  }
  const uint64_t t0 = spans.front().start_ns;
  uint64_t covered = 0, idle = 0, largest_gap = 0, reach = t0;
  int gaps = 0;
  for (const KernelSpan& s : spans) {  // sorted by start: sweep the union of the intervals
    if (s.start_ns > reach) {
      const uint64_t gap = s.start_ns - reach;
      idle += gap;
      largest_gap = std::max(largest_gap, gap);
      ++gaps;
    }
    if (s.end_ns > reach) {
      covered += s.end_ns - std::max(s.start_ns, reach);
      reach = s.end_ns;
    }
  }
  const double span_us = (reach - t0) / 1e3;
  std::printf("  timeline: %zu kernels over %.1f us; some kernel running %.1f us, idle %.1f us "
              "in %d gaps (largest %.1f us)\n",
              spans.size(), span_us, covered / 1e3, idle / 1e3, gaps, largest_gap / 1e3);
  // Kernels launched early (programmatic dependent launch) wait inside for the one before, so
  // their own durations overlap. What a kernel adds to the step is the time from the end of the
  // kernel that ended before it to its own end: summed over the kernels, that is the whole
  // span. (A kernel on a side stream that ends last takes the share of the main-stream kernel
  // it ran beside; graph nodes carry no meaningful stream to separate them by.)
  struct Sum {
    int calls = 0;
    double run = 0, adds = 0;
  };
  std::map<std::string, Sum> by_name;
  std::vector<const KernelSpan*> by_end;
  for (const KernelSpan& s : spans) by_end.push_back(&s);
  std::sort(by_end.begin(), by_end.end(),
            [](const KernelSpan* a, const KernelSpan* b) { return a->end_ns < b->end_ns; });
  uint64_t last_end = t0;
  for (const KernelSpan* s : by_end) {
    Sum& e = by_name[s->name];
    ++e.calls;
    e.run += (s->end_ns - s->start_ns) / 1e3;
    e.adds += (s->end_ns - last_end) / 1e3;
    last_end = s->end_ns;
  }
  std::vector<std::pair<std::string, Sum>> rows(by_name.begin(), by_name.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.adds > b.second.adds; });
  std::printf("  %10s %6s %6s %10s %10s  kernel\n", "adds us", "share", "calls", "adds/call",
              "runs/call");
  for (int i = 0; i < static_cast<int>(rows.size()) && i < top; ++i) {
    const auto& [name, e] = rows[i];
    std::printf("  %10.1f %5.1f%% %6d %10.2f %10.2f  %s\n", e.adds, 100.0 * e.adds / span_us,
                e.calls, e.adds / e.calls, e.run / e.calls, name.substr(0, 90).c_str());
  }
}

void print_window(const std::vector<KernelSpan>& spans, size_t first, size_t count) {
  if (first >= spans.size()) return;
  const uint64_t t0 = spans[first].start_ns;
  for (size_t i = first; i < spans.size() && i < first + count; ++i) {
    const KernelSpan& s = spans[i];
    std::printf("  %8.2f %8.2f %7.2f  %s\n", (s.start_ns - t0) / 1e3, (s.end_ns - t0) / 1e3,
                (s.end_ns - s.start_ns) / 1e3, s.name.substr(0, 90).c_str());
  }
}

}  // namespace ernie::trace
