#include "backend/cuda/tuned_gemm.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/gemm_choice.h"
#include "backend/cuda/switches.h"
#include "common/check.h"
#include "common/log.h"

namespace ernie::cuda {
namespace {

void check_lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw Error(cat("cuBLASLt error in ", what, ": ", cublasGetStatusName(s)));
  }
}

// cuBLASLt heuristic results timed per shape: 16, or ERNIE_GEMM_TUNE_CANDIDATES (1-256; A/B
// runs: does a wider search than the heuristic's first 16 find faster algorithms?).
int candidates() {
  static const int n = std::clamp(switch_bits("ERNIE_GEMM_TUNE_CANDIDATES", 16), 1, 256);
  return n;
}
constexpr int kRuns = 4;                   // timed runs of each (after one untimed)
constexpr size_t kFlushBytes = 96u << 20;  // more than an H100's or H200's 50-60 MB of L2
constexpr double kMargin = 0.03;           // what a candidate must gain on the default

}  // namespace

// Row-major out[m, n] = x[m, k] w[n, k]^T is column-major out^T = w^T x.
cublasStatus_t default_gemm(cublasHandle_t blas, void* out, bool out_f32, const void* x,
                            const void* w, int m, int n, int k) {
  const float alpha = 1.0f, beta = 0.0f;
  return cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF, k, x,
                      CUDA_R_16BF, k, &beta, out, out_f32 ? CUDA_R_32F : CUDA_R_16BF, n,
                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

TunedGemm::TunedGemm() {
  check_lt(cublasLtCreate(&lt_), "cublasLtCreate");
  check_cuda(cudaEventCreate(&start_), "cudaEventCreate");
  check_cuda(cudaEventCreate(&stop_), "cudaEventCreate");
}

TunedGemm::~TunedGemm() {
  for (auto& [key, p] : plans_) {
    if (p.c) cublasLtMatrixLayoutDestroy(p.c);
    if (p.b) cublasLtMatrixLayoutDestroy(p.b);
    if (p.a) cublasLtMatrixLayoutDestroy(p.a);
    if (p.op) cublasLtMatmulDescDestroy(p.op);
  }
  end_tuning();
  cudaEventDestroy(start_);
  cudaEventDestroy(stop_);
  cublasLtDestroy(lt_);
}

void TunedGemm::begin_tuning() {
  tuning_ = true;
  if (flush_ != nullptr) return;
  if (cudaMalloc(&flush_, kFlushBytes) != cudaSuccess) {
    (void)cudaGetLastError();  // no room: candidates are timed with warm caches
    flush_ = nullptr;
    return;
  }
  flush_bytes_ = kFlushBytes;
}

void TunedGemm::end_tuning() {
  tuning_ = false;
  if (flush_ == nullptr) return;
  cudaFree(flush_);
  flush_ = nullptr;
  flush_bytes_ = 0;
}

int TunedGemm::non_default() const {
  return static_cast<int>(std::count_if(plans_.begin(), plans_.end(),
                                        [](const auto& kv) { return !kv.second.use_default; }));
}

bool TunedGemm::run(cublasHandle_t blas, void* out, bool out_f32, const void* x, const void* w,
                    int m, int n, int k, void* workspace, size_t workspace_bytes,
                    cudaStream_t stream, bool may_tune) {
  const Key key{m, n, k, out_f32};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    if (!may_tune || !tuning_) return false;
    it = plans_
             .emplace(key,
                      tune(blas, out, out_f32, x, w, m, n, k, workspace, workspace_bytes, stream))
             .first;
  }
  Plan& p = it->second;
  if (!p.use_default) {
    const float alpha = 1.0f, beta = 0.0f;
    if (cublasLtMatmul(lt_, p.op, &alpha, w, p.a, x, p.b, &beta, out, p.c, out, p.c, &p.algo,
                       workspace, p.workspace, stream) == CUBLAS_STATUS_SUCCESS) {
      return true;
    }
    // Operands this algorithm does not take (say, less aligned than the tuning call's): the
    // default from now on, for every call of this shape.
    log::warn("GEMM ", m, " x ", k, " -> ", n,
              ": the tuned cuBLASLt algorithm refused these operands; cuBLAS's default instead");
    p.use_default = true;
  }
  check_lt(default_gemm(blas, out, out_f32, x, w, m, n, k), "cublasGemmEx");
  return true;
}

TunedGemm::Plan TunedGemm::tune(cublasHandle_t blas, void* out, bool out_f32, const void* x,
                                const void* w, int m, int n, int k, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  const auto t0 = std::chrono::steady_clock::now();
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (GEMM tuning)");
  Plan p;
  check_lt(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta),
           "MatmulDescSetAttribute");
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb),
           "MatmulDescSetAttribute");
  // Column-major: A = w as stored (k x n, transposed by the op), B = x (k x m), C = out^T.
  check_lt(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, k, n, k), "MatrixLayoutCreate");
  check_lt(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, k, m, k), "MatrixLayoutCreate");
  check_lt(cublasLtMatrixLayoutCreate(&p.c, out_f32 ? CUDA_R_32F : CUDA_R_16BF, n, m, n),
           "MatrixLayoutCreate");
  cublasLtMatmulPreference_t pref = nullptr;
  check_lt(cublasLtMatmulPreferenceCreate(&pref), "MatmulPreferenceCreate");
  const uint64_t ws = workspace_bytes;
  check_lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                sizeof ws),
           "MatmulPreferenceSetAttribute");
  std::vector<cublasLtMatmulHeuristicResult_t> found(candidates());
  int count = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(
      lt_, p.op, p.a, p.b, p.c, p.c, pref, static_cast<int>(found.size()), found.data(), &count);
  cublasLtMatmulPreferenceDestroy(pref);
  if (hs != CUBLAS_STATUS_SUCCESS) count = 0;

  const float alpha = 1.0f, beta = 0.0f;
  // Candidate -1 is the default GEMM; the mean of kRuns runs, each after an L2 flush.
  auto launch = [&](int c) {
    if (c < 0) return default_gemm(blas, out, out_f32, x, w, m, n, k);
    return cublasLtMatmul(lt_, p.op, &alpha, w, p.a, x, p.b, &beta, out, p.c, out, p.c,
                          &found[c].algo, workspace, found[c].workspaceSize, stream);
  };
  auto time_of = [&](int c) -> double {
    if (launch(c) != CUBLAS_STATUS_SUCCESS) return std::numeric_limits<double>::infinity();
    double total = 0.0;
    for (int r = 0; r < kRuns; ++r) {
      if (flush_ != nullptr) {
        check_cuda(cudaMemsetAsync(flush_, r & 0xff, flush_bytes_, stream), "cudaMemsetAsync");
      }
      check_cuda(cudaEventRecord(start_, stream), "cudaEventRecord");
      if (launch(c) != CUBLAS_STATUS_SUCCESS) return std::numeric_limits<double>::infinity();
      check_cuda(cudaEventRecord(stop_, stream), "cudaEventRecord");
      check_cuda(cudaEventSynchronize(stop_), "cudaEventSynchronize");
      float ms = 0.0f;
      check_cuda(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
      total += ms;
    }
    return total / kRuns;
  };
  const double default_ms = time_of(-1);
  require(default_ms < std::numeric_limits<double>::infinity(),
          "GEMM tuning: the default GEMM failed");
  std::vector<double> times(count, std::numeric_limits<double>::infinity());
  for (int c = 0; c < count; ++c) {
    if (found[c].state == CUBLAS_STATUS_SUCCESS && found[c].workspaceSize <= workspace_bytes) {
      times[c] = time_of(c);
    }
  }
  const int chosen = choose_gemm(default_ms, times, kMargin);
  if (chosen >= 0) {
    p.use_default = false;
    p.algo = found[chosen].algo;
    p.workspace = found[chosen].workspaceSize;
  }
  // The fastest beside the chosen one (a near tie makes the choice a coin toss between runs:
  // logged at debug level).
  const double kept = chosen < 0 ? default_ms : times[chosen];
  double runner_up = chosen < 0 ? std::numeric_limits<double>::infinity() : default_ms;
  for (int c = 0; c < count; ++c) {
    if (c != chosen) runner_up = std::min(runner_up, times[c]);
  }
  log::debug("GEMM tuning ", m, " x ", k, " -> ", n, out_f32 ? " (f32 out)" : "", ": default ",
             default_ms * 1e3, " us, ",
             chosen < 0 ? std::string("kept") : cat("candidate ", chosen, " of ", count), " ",
             kept * 1e3, " us, next best ", runner_up * 1e3, " us");
  // The output of the caller's call is written after this by the chosen algorithm.
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (GEMM tuning)");
  tune_ms_ +=
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return p;
}

}  // namespace ernie::cuda
