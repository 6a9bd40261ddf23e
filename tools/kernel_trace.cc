#include "kernel_trace.h"

#include <cuda_runtime.h>
#include <cupti.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "common/check.h"

namespace ernie::trace {
namespace {

constexpr size_t kBufferBytes = 8 << 20;

std::mutex g_mutex;
std::vector<KernelSpan> g_spans;
std::vector<uint32_t> g_correlation;                 // of g_spans' kernels
std::unordered_map<uint32_t, uint64_t> g_launch_ns;  // runtime API call start by correlation id

void check(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return;
  const char* msg = "?";
  cuptiGetResultString(r, &msg);
  throw Error(cat("CUPTI: ", what, ": ", msg));
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
    if (record->kind == CUPTI_ACTIVITY_KIND_RUNTIME) {
      const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(record);
      g_launch_ns[a->correlationId] = a->start;
      continue;
    }
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL &&
        record->kind != CUPTI_ACTIVITY_KIND_KERNEL) {
      continue;
    }
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
    g_spans.push_back({short_kernel_name(k->name), k->start, k->end});
    g_correlation.push_back(k->correlationId);
  }
  std::free(buffer);
}

}  // namespace

void start() {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_spans.clear();
    g_correlation.clear();
    g_launch_ns.clear();
  }
  check(cuptiActivityRegisterCallbacks(on_request, on_complete), "register callbacks");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "enable kernel records");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME), "enable runtime API records");
}

std::vector<KernelSpan> stop() {
  cudaDeviceSynchronize();
  check(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "flush");
  check(cuptiActivityDisable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "disable kernel records");
  check(cuptiActivityDisable(CUPTI_ACTIVITY_KIND_RUNTIME), "disable runtime API records");
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<KernelSpan> out = std::move(g_spans);
  for (size_t i = 0; i < out.size(); ++i) {
    const auto it = g_launch_ns.find(g_correlation[i]);
    if (it != g_launch_ns.end()) out[i].launch_ns = it->second;
  }
  g_spans.clear();
  g_correlation.clear();
  g_launch_ns.clear();
  std::sort(out.begin(), out.end(),
            [](const KernelSpan& a, const KernelSpan& b) { return a.start_ns < b.start_ns; });
  return out;
}

void print_summary(const std::vector<KernelSpan>& spans, int top) {
  if (spans.empty()) {
    std::printf("  timeline: no kernels recorded\n");
    return;
  }
  const TimelineSummary t = summarize(spans);
  const double span_us = t.span_ns / 1e3;
  std::printf(
      "  timeline: %zu kernels over %.1f us; some kernel running %.1f us, idle %.1f us "
      "in %d gaps (largest %.1f us, before kernel %zu, %s)\n",
      spans.size(), span_us, t.covered_ns / 1e3, t.idle_ns / 1e3, t.gaps, t.largest_gap_ns / 1e3,
      t.after_largest_gap_index, t.after_largest_gap.substr(0, 60).c_str());
  std::printf("  %10s %6s %6s %10s %10s  kernel\n", "adds us", "share", "calls", "adds/call",
              "runs/call");
  for (int i = 0; i < static_cast<int>(t.rows.size()) && i < top; ++i) {
    const KernelRow& r = t.rows[i];
    std::printf("  %10.1f %5.1f%% %6d %10.2f %10.2f  %s\n", r.adds_ns / 1e3,
                100.0 * r.adds_ns / 1e3 / span_us, r.calls, r.adds_ns / 1e3 / r.calls,
                r.run_ns / 1e3 / r.calls, r.name.substr(0, 90).c_str());
  }
}

void print_window(const std::vector<KernelSpan>& spans, size_t first, size_t count) {
  if (first >= spans.size()) return;
  const uint64_t t0 = spans[first].start_ns;
  auto us = [&](uint64_t t) { return (static_cast<double>(t) - static_cast<double>(t0)) / 1e3; };
  for (size_t i = first; i < spans.size() && i < first + count; ++i) {
    const KernelSpan& s = spans[i];
    char launch[32] = "";
    if (s.launch_ns != 0) std::snprintf(launch, sizeof launch, " (launched %.2f)", us(s.launch_ns));
    std::printf("  %8.2f %8.2f %7.2f  %s%s\n", us(s.start_ns), us(s.end_ns),
                (s.end_ns - s.start_ns) / 1e3, s.name.substr(0, 90).c_str(), launch);
  }
}

}  // namespace ernie::trace
