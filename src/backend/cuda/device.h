// Device discovery (usable from plain C++: no CUDA headers).
#pragma once

#include <cstdint>
#include <string>

namespace ernie::cuda {

// Number of usable CUDA devices; 0 when there is no GPU or no driver (never throws).
int device_count();
// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" for device `index`.
std::string describe_device(int index);

// Streaming read bandwidth of the current device in bytes/s: the median of `runs` passes of
// 16-byte loads over `bytes` of random data, alternating between two such buffers so that the
// L2 cache holds none of a pass. Floors are then those of the machine that runs the code
// (H100 and H200 differ by 1.4x, two H100s by a few percent).
double measure_read_bandwidth(int64_t bytes = int64_t{2} << 30, int runs = 9);

}  // namespace ernie::cuda
