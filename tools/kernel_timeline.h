// What a kernel timeline says, from kernels' start and end times alone (no GPU needed; the
// times come from tools/kernel_trace.h on the GPU machine).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ernie::trace {

struct KernelSpan {
  std::string name;  // as short_kernel_name gives it
  uint64_t start_ns = 0, end_ns = 0;
  uint64_t launch_ns = 0;  // when the host's launch call began (0: not known, e.g. in a graph)
};

// Per kernel name: its calls, summed run time, and what it adds to the span: the time from
// the end of the kernel that ended before it to its own end, summed over its calls. Kernels
// that start early and wait for the one before (programmatic dependent launch) overlap, so
// their run times add up to more than the span; what they add sums to the span exactly. (A
// kernel on a side stream that ends last takes the share of the main-stream kernel it ran
// beside.)
struct KernelRow {
  std::string name;
  int calls = 0;
  uint64_t run_ns = 0, adds_ns = 0;
};

struct TimelineSummary {
  uint64_t span_ns = 0;     // first start to last end
  uint64_t covered_ns = 0;  // some kernel running
  uint64_t idle_ns = 0;     // no kernel running
  int gaps = 0;             // idle stretches
  uint64_t largest_gap_ns = 0;
  // The kernel that ends the largest gap: its name and its place in start order (from 0).
  std::string after_largest_gap;
  size_t after_largest_gap_index = 0;
  std::vector<KernelRow> rows;  // most added first (ties by name)
};

TimelineSummary summarize(std::vector<KernelSpan> spans);

// "void ernie::cuda::(anonymous namespace)::k<1, true>(float*, int)" -> "k<1, true>": the
// demangled name without the return type, the parameter list and this project's namespaces
// (the mangled name itself when it does not demangle).
std::string short_kernel_name(const char* mangled);

}  // namespace ernie::trace
