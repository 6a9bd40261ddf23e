// Device discovery (usable from plain C++: no CUDA headers).
#pragma once

#include <string>

namespace ernie::cuda {

// Number of usable CUDA devices; 0 when there is no GPU or no driver (never throws).
int device_count();
// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" for device `index`.
std::string describe_device(int index);

}  // namespace ernie::cuda
