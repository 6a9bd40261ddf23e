#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device.h"

namespace ernie::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string describe_device(int index) {
  cudaDeviceProp p{};
  ERNIE_CUDA_CHECK(cudaGetDeviceProperties(&p, index));
  return cat(p.name, " (sm_", p.major, p.minor, ", ",
             static_cast<double>(p.totalGlobalMem) / (1ull << 30), " GiB)");
}

}  // namespace ernie::cuda
