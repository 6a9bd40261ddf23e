// Kernel timeline of a stretch of GPU work through CUPTI's activity records: every kernel's
// start and end as the GPU ran it, kernels inside CUDA graphs included (Nsight Compute times
// each kernel alone, which inflates small kernels and hides the gaps between them). Used by
// `ernie_kernel_bench ITERS timeline CASES` to see where a replayed decode step spends its
// time: per kernel name its calls and summed time, and the time with no kernel running.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ernie::trace {

struct KernelSpan {
  std::string name;  // demangled, without the parameter list
  uint64_t start_ns = 0, end_ns = 0;
};

// Starts recording kernel activity (one recording at a time per process).
void start();
// Waits for the device, stops recording and returns the kernels seen since start(), by start.
std::vector<KernelSpan> stop();

// Prints the timeline summary: the span from the first kernel's start to the last one's end,
// the time covered by at least one kernel, the idle gaps (count, sum, largest), then per
// kernel name (`top` rows, most first) what it adds to the span: the time from the end of the
// kernel that ended before it to its own end, summed over its calls (kernels that start early
// and wait for the one before, as programmatic dependent launch does, overlap: their own run
// times add up to more than the span), beside its mean run time.
void print_summary(const std::vector<KernelSpan>& spans, int top);

// Prints `count` kernels from the `first` (by start): start, end and run time in us from the
// first one's start, and name.
void print_window(const std::vector<KernelSpan>& spans, size_t first, size_t count);

}  // namespace ernie::trace
