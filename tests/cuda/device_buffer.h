// A device allocation for kernel tests, freed at scope exit.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "backend/cuda/cuda_check.h"

namespace ernie::cuda::testing {

template <typename T>
struct DeviceBuffer {
  explicit DeviceBuffer(size_t n) : n(n) { ERNIE_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T))); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const std::vector<T>& h) {
    ERNIE_CUDA_CHECK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    ERNIE_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void poison() { ERNIE_CUDA_CHECK(cudaMemset(p, 0xff, n * sizeof(T))); }  // NaN for bf16/f32
  T* p = nullptr;
  size_t n;
};

}  // namespace ernie::cuda::testing
