// Kernel timeline of a stretch of GPU work through CUPTI's activity records: every kernel's
// start and end as the GPU ran it, kernels inside CUDA graphs included (Nsight Compute times
// each kernel alone, which inflates small kernels and hides the gaps between them). Used by
// `ernie_kernel_bench ITERS timeline CASES` to see where a replayed decode step spends its
// time: per kernel name its calls and summed time, and the time with no kernel running.
#pragma once

#include <cstddef>
#include <vector>

#include "kernel_timeline.h"

namespace ernie::trace {

// Starts recording kernel activity (one recording at a time per process).
void start();
// Waits for the device, stops recording and returns the kernels seen since start(), by start.
std::vector<KernelSpan> stop();

// Prints summarize(spans): the span, the time some kernel ran, the idle gaps, then the `top`
// kernel names by what they add to the span, beside their mean run time.
void print_summary(const std::vector<KernelSpan>& spans, int top);

// Prints `count` kernels from the `first` (by start): start, end and run time in us from the
// first one's start, name, and when the host began its launch (where known; CUPTI takes both
// times from one clock).
void print_window(const std::vector<KernelSpan>& spans, size_t first, size_t count);

}  // namespace ernie::trace
