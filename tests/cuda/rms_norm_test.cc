// GPU kernel tests: each kernel against the CPU reference op on fresh random inputs, outputs
// poisoned first. Skipped cleanly when no GPU is present.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <random>

#include "backend/cpu/ops.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/rms_norm.cuh"
#include "common/dtype.h"
#include "common/rng.h"
#include "device_buffer.h"

namespace ernie::cuda {
namespace {

using testing::DeviceBuffer;

TEST(CudaRmsNorm, FusedAddMatchesCpuReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  for (auto [rows, hidden] : {std::pair{1, 64}, {7, 2560}, {33, 8192}, {5, 130}}) {
    SCOPED_TRACE(::testing::Message() << rows << "x" << hidden);
    const size_t n = static_cast<size_t>(rows) * hidden;
    std::vector<uint16_t> res(n), x(n), w(hidden);
    for (auto& v : res) v = float_to_bf16(static_cast<float>(rng.normal()));
    for (auto& v : x) v = float_to_bf16(static_cast<float>(rng.normal()));
    for (auto& v : w) v = float_to_bf16(static_cast<float>(rng.uniform(0.5, 1.5)));
    DeviceBuffer<uint16_t> d_out(n), d_res(n), d_x(n), d_w(hidden);
    d_res.upload(res);
    d_x.upload(x);
    d_w.upload(w);
    ERNIE_CUDA_CHECK(cudaMemset(d_out.p, 0xff, n * 2));  // poison: NaN bf16
    fused_add_rms_norm(reinterpret_cast<__nv_bfloat16*>(d_out.p),
                       reinterpret_cast<__nv_bfloat16*>(d_res.p),
                       reinterpret_cast<const __nv_bfloat16*>(d_x.p),
                       reinterpret_cast<const __nv_bfloat16*>(d_w.p), rows, hidden, 1e-5f, nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto out = d_out.download();
    const auto new_res = d_res.download();
    // CPU reference on the same bf16-rounded residual.
    std::vector<float> r(n), wf(hidden), ref(n);
    for (size_t i = 0; i < n; ++i) {
      r[i] = bf16_to_float(float_to_bf16(bf16_to_float(res[i]) + bf16_to_float(x[i])));
      ASSERT_EQ(bf16_to_float(new_res[i]), r[i]) << i;
    }
    for (int i = 0; i < hidden; ++i) wf[i] = bf16_to_float(w[i]);
    backend::cpu::rms_norm(ref.data(), r.data(), wf.data(), rows, hidden, 1e-5f);
    double worst = 0;
    for (size_t i = 0; i < n; ++i) {
      const double got = bf16_to_float(out[i]);
      ASSERT_FALSE(std::isnan(got)) << i;
      worst = std::max(worst, std::abs(got - ref[i]) / (std::abs(ref[i]) + 1e-2));
    }
    EXPECT_LT(worst, 2e-2);  // two bf16 roundings
  }
}

}  // namespace
}  // namespace ernie::cuda
