#include "cli/backend_select.h"

#include "common/check.h"
#include "common/log.h"

#ifdef ERNIE_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/device.h"
#endif

namespace ernie::cli {

std::unique_ptr<backend::Backend> make_backend(const std::string& device) {
  if (device == "cpu") return backend::make_cpu_backend();
  require(device == "cuda" || device == "auto",
          cat("unknown --device '", device, "' (choose cpu, cuda or auto)"));
#ifdef ERNIE_HAVE_CUDA
  if (device == "cuda") return backend::make_cuda_backend(0);
  if (cuda::device_count() == 0) {
    log::info("no CUDA device found: running on the CPU");
    return backend::make_cpu_backend();
  }
  try {
    return backend::make_cuda_backend(0);
  } catch (const Error& e) {  // e.g. a GPU this build has no kernels for
    log::warn("the GPU cannot be used (", e.what(), "): running on the CPU");
    return backend::make_cpu_backend();
  }
#else
  if (device == "cuda") throw Error("this build of ernie has no CUDA backend (nvcc was not found)");
  return backend::make_cpu_backend();
#endif
}

}  // namespace ernie::cli
