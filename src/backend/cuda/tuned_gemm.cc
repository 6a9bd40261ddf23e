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

constexpr int kRuns = 4;                   // timed runs of each (after one untimed)
constexpr size_t kFlushBytes = 96u << 20;  // more than an H100's or H200's 50-60 MB of L2
constexpr double kMargin = 0.03;           // what a candidate must gain on the default

// The split-K sweep (TuneOptions::split_k): the first kSplitBases heuristic results, each with
// these split counts where the algorithm takes split-K and cuBLASLt accepts the configuration
// for the shape (cublasLtMatmulAlgoCheck), the partial sums reduced in f32 (or in place, where
// that is the only scheme offered; both are deterministic).
constexpr int kSplitBases = 8;
constexpr int kSplitCounts[] = {2, 3, 4, 6, 8};

int32_t splits_of(const cublasLtMatmulAlgo_t& algo) {
  int32_t v = 1;
  size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &v, sizeof v,
                                           &written) != CUBLAS_STATUS_SUCCESS) {
    return 1;
  }
  return v;
}

// `base` with `splits` K splits, checked for the operation and layouts; false where the
// algorithm or the shape does not take it.
bool with_splits(cublasLtHandle_t lt, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                 cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                 const cublasLtMatmulAlgo_t& base, int32_t splits,
                 cublasLtMatmulHeuristicResult_t* out) {
  int32_t support = 0;
  uint32_t schemes = 0;
  size_t written = 0;
  if (cublasLtMatmulAlgoCapGetAttribute(&base, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &support,
                                        sizeof support, &written) != CUBLAS_STATUS_SUCCESS ||
      support == 0 ||
      cublasLtMatmulAlgoCapGetAttribute(&base, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &schemes,
                                        sizeof schemes, &written) != CUBLAS_STATUS_SUCCESS) {
    return false;
  }
  const uint32_t scheme = (schemes & CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE) != 0
                              ? CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE
                          : (schemes & CUBLASLT_REDUCTION_SCHEME_INPLACE) != 0
                              ? CUBLASLT_REDUCTION_SCHEME_INPLACE
                              : CUBLASLT_REDUCTION_SCHEME_NONE;
  if (scheme == CUBLASLT_REDUCTION_SCHEME_NONE) return false;
  cublasLtMatmulAlgo_t algo = base;
  if (cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits,
                                           sizeof splits) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                                           sizeof scheme) != CUBLAS_STATUS_SUCCESS) {
    return false;
  }
  cublasLtMatmulHeuristicResult_t r{};
  if (cublasLtMatmulAlgoCheck(lt, op, a, b, c, c, &algo, &r) != CUBLAS_STATUS_SUCCESS ||
      r.state != CUBLAS_STATUS_SUCCESS) {
    return false;
  }
  r.algo = algo;
  *out = r;
  return true;
}

}  // namespace

TuneOptions TuneOptions::from_env() {
  TuneOptions o;
  // ERNIE_GEMM_TUNE_CANDIDATES (1-256; A/B runs: does a wider search than the heuristic's
  // first 16 find faster algorithms?).
  o.candidates = std::clamp(switch_bits("ERNIE_GEMM_TUNE_CANDIDATES", 16), 1, 256);
  o.split_k = new_path_enabled("ERNIE_GEMM_TUNE_SPLITK");
  return o;
}

// Row-major out[m, n] = x[m, k] w[n, k]^T is column-major out^T = w^T x.
cublasStatus_t default_gemm(cublasHandle_t blas, void* out, bool out_f32, const void* x,
                            const void* w, int m, int n, int k) {
  const float alpha = 1.0f, beta = 0.0f;
  return cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF, k, x,
                      CUDA_R_16BF, k, &beta, out, out_f32 ? CUDA_R_32F : CUDA_R_16BF, n,
                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

TunedGemm::TunedGemm(const TuneOptions& options) : options_(options) {
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

int TunedGemm::split_k(int m, int n, int k, bool out_f32) const {
  const auto it = plans_.find(Key{m, n, k, out_f32});
  if (it == plans_.end()) return 0;
  return it->second.use_default ? 1 : splits_of(it->second.algo);
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
  std::vector<cublasLtMatmulHeuristicResult_t> found(std::clamp(options_.candidates, 1, 256));
  int count = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(
      lt_, p.op, p.a, p.b, p.c, p.c, pref, static_cast<int>(found.size()), found.data(), &count);
  cublasLtMatmulPreferenceDestroy(pref);
  if (hs != CUBLAS_STATUS_SUCCESS) count = 0;
  found.resize(count);
  if (options_.split_k) {
    for (int c = 0; c < std::min(count, kSplitBases); ++c) {
      if (found[c].state != CUBLAS_STATUS_SUCCESS) continue;
      const int32_t own = splits_of(found[c].algo);
      for (const int32_t splits : kSplitCounts) {
        cublasLtMatmulHeuristicResult_t r;
        if (splits != own && k / splits >= 64 &&
            with_splits(lt_, p.op, p.a, p.b, p.c, found[c].algo, splits, &r)) {
          found.push_back(r);
        }
      }
    }
    count = static_cast<int>(found.size());
  }
  last_candidates_ = count;

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
  const auto usable = [&](int c) {
    return found[c].state == CUBLAS_STATUS_SUCCESS && found[c].workspaceSize <= workspace_bytes;
  };
  const bool forced = options_.force >= 0;
  const double default_ms = forced ? 0.0 : time_of(-1);
  require(default_ms < std::numeric_limits<double>::infinity(),
          "GEMM tuning: the default GEMM failed");
  std::vector<double> times(count, std::numeric_limits<double>::infinity());
  for (int c = 0; c < count && !forced; ++c) {
    if (usable(c)) times[c] = time_of(c);
  }
  const int chosen = forced
                         ? (options_.force < count && usable(options_.force) ? options_.force : -1)
                         : choose_gemm(default_ms, times, kMargin);
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
             chosen < 0 ? std::string("kept")
                        : cat("candidate ", chosen, " of ", count, " (split-K ",
                              splits_of(found[chosen].algo), ")"),
             " ", kept * 1e3, " us, next best ", runner_up * 1e3, " us");
  // The output of the caller's call is written after this by the chosen algorithm.
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (GEMM tuning)");
  tune_ms_ +=
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return p;
}

}  // namespace ernie::cuda
