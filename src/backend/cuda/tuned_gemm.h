// Linear layers of decode-sized batches through cuBLASLt with each shape's algorithm chosen by
// timing. cuBLAS's default heuristic picks one algorithm from a cost model; at a few hundred
// rows it tends to choose wide tiles that leave most multiprocessors idle, each CTA pulling
// megabytes through its own load path (a 256-row GEMM with a 6144 x 2560 weight ran at about a
// third of the memory bandwidth). Here cuBLASLt's heuristic candidates (split-K ones among them)
// and the default GEMM are each timed on the real operands, with L2 flushed before every run as
// a decode step's cold weights are, and the fastest is kept for that shape.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

namespace ernie::cuda {

// cuBLAS's default GEMM for the same operands: row-major out[m, n] = x[m, k] w[n, k]^T on the
// stream of `blas`.
cublasStatus_t default_gemm(cublasHandle_t blas, void* out, bool out_f32, const void* x,
                            const void* w, int m, int n, int k);

// What TunedGemm times (from_env gives the engine's).
struct TuneOptions {
  int candidates = 16;  // cuBLASLt heuristic results timed per shape (ERNIE_GEMM_TUNE_CANDIDATES)
  // Also the first 8 of them with each split-K count of 2, 3, 4, 6 and 8 that cuBLASLt accepts
  // for the shape (ERNIE_GEMM_TUNE_SPLITK=1; not yet measured on a GPU).
  bool split_k = false;
  // Tests: keep candidate `force` (heuristic results first, then the split-K variants) whatever
  // the timings, or the default where there is no such candidate; -1: choose by timing.
  int force = -1;
  static TuneOptions from_env();
};

class TunedGemm {
 public:
  explicit TunedGemm(const TuneOptions& options = TuneOptions::from_env());
  ~TunedGemm();
  TunedGemm(const TunedGemm&) = delete;
  TunedGemm& operator=(const TunedGemm&) = delete;

  // out[m, n] = x[m, k] w[n, k]^T, row-major, bf16 operands, bf16 or f32 out, f32 sums, on
  // `stream` (the stream of `blas`, whose default GEMM is one candidate). A shape seen before
  // runs its chosen algorithm. A new one is tuned first when `may_tune` and a tuning window is
  // open (the device is then synchronized: never while a stream is being captured), else this
  // returns false and the caller runs its default. workspace: workspace_bytes of device memory
  // for this stream only.
  bool run(cublasHandle_t blas, void* out, bool out_f32, const void* x, const void* w, int m, int n,
           int k, void* workspace, size_t workspace_bytes, cudaStream_t stream, bool may_tune);

  // New shapes are tuned only between begin_tuning and end_tuning (e.g. around a graph's eager
  // run), which also hold a buffer written before each timed run to push the operands out of
  // L2 (bytes > L2's size; without one the candidates are timed with warm caches).
  void begin_tuning();
  void end_tuning();
  // begin_tuning for a scope (nothing with a null TunedGemm).
  class Window {
   public:
    explicit Window(TunedGemm* t) : t_(t) {
      if (t_) t_->begin_tuning();
    }
    ~Window() {
      if (t_) t_->end_tuning();
    }
    Window(const Window&) = delete;
    Window& operator=(const Window&) = delete;

   private:
    TunedGemm* t_;
  };

  int shapes() const { return static_cast<int>(plans_.size()); }
  int non_default() const;  // shapes whose fastest was not the default GEMM
  // The split-K count of the algorithm a tuned shape runs (1 for the default GEMM; 0: the shape
  // is not tuned).
  int split_k(int m, int n, int k, bool out_f32) const;
  // Candidates of the last shape tuned (heuristic results and split-K variants).
  int last_candidates() const { return last_candidates_; }
  double tune_ms() const { return tune_ms_; }

 private:
  struct Plan {
    bool use_default = true;
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    size_t workspace = 0;
  };
  using Key = std::tuple<int, int, int, bool>;
  Plan tune(cublasHandle_t blas, void* out, bool out_f32, const void* x, const void* w, int m,
            int n, int k, void* workspace, size_t workspace_bytes, cudaStream_t stream);

  TuneOptions options_;
  cublasLtHandle_t lt_ = nullptr;
  bool tuning_ = false;  // between begin_tuning and end_tuning
  std::map<Key, Plan> plans_;
  void* flush_ = nullptr;
  size_t flush_bytes_ = 0;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  double tune_ms_ = 0.0;
  int last_candidates_ = 0;
};

}  // namespace ernie::cuda
