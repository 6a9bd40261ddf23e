#include "backend/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/cuda/activation.cuh"
#include "backend/cuda/attention.cuh"
#include "backend/cuda/cluster_gemm.cuh"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/expert_layout.h"
#include "backend/cuda/memory_ops.cuh"
#include "backend/cuda/moe.cuh"
#include "backend/cuda/rms_norm.cuh"
#include "backend/cuda/rope.cuh"
#include "backend/cuda/router.cuh"
#include "backend/cuda/sampler.cuh"
#include "backend/cuda/skinny_gemm.cuh"
#include "backend/cuda/switches.h"
#include "backend/cuda/tuned_gemm.h"
#include "backend/scratch_arena.h"
#include "common/check.h"
#include "common/log.h"

namespace ernie::backend {
namespace {

using cuda::check_cuda;

void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw Error(cat("cuBLAS error in ", what, ": ", cublasGetStatusName(s)));
  }
}

size_t round_up(size_t n, size_t a) {
  return (n + a - 1) / a * a;
}

__nv_bfloat16* bf(const Tensor& t) {
  return static_cast<__nv_bfloat16*>(t.data);
}

// Per-step device memory (scratch_arena.h) in cudaMalloc'd chunks.
struct CudaChunks {
  void* allocate(size_t bytes) {
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, bytes), "cudaMalloc (scratch)");
    return p;
  }
  void release(void* p) { cudaFree(p); }
};
using DeviceArena = ScratchArena<CudaChunks>;

// Page-locked host memory that grows on demand.
class PinnedBuffer {
 public:
  ~PinnedBuffer() {
    if (p_) cudaFreeHost(p_);
  }
  char* get(size_t bytes) {
    if (bytes > size_) {
      if (p_) cudaFreeHost(p_);
      p_ = nullptr;
      size_ = round_up(std::max(bytes, size_ * 2), 1u << 16);
      check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&p_), size_, cudaHostAllocDefault),
                 "cudaHostAlloc");
    }
    return p_;
  }

 private:
  char* p_ = nullptr;
  size_t size_ = 0;
};

// Lays out several host arrays in one buffer so one copy moves them all.
class Packer {
 public:
  template <typename T>
  size_t add(const T* data, size_t n) {
    const size_t off = round_up(bytes_.size(), 16);
    bytes_.resize(off + n * sizeof(T));
    if (n) std::memcpy(bytes_.data() + off, data, n * sizeof(T));
    return off;
  }
  template <typename T>
  size_t add(const std::vector<T>& v) {
    return add(v.data(), v.size());
  }
  // Pads the buffer to `size` bytes (a fixed layout's reserved room).
  void pad_to(size_t size) {
    if (bytes_.size() < size) bytes_.resize(size);
  }
  // Bytes the device region must hold: at least `min_bytes` (so that a fixed-size step always
  // gets the same layout).
  size_t region(size_t min_bytes) const { return std::max(bytes_.size(), min_bytes); }
  const std::vector<char>& bytes() const { return bytes_; }

 private:
  std::vector<char> bytes_;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    const int n = cuda::device_count();
    require(n > 0, "no CUDA device is available (is the NVIDIA driver loaded?)");
    require(device >= 0 && device < n,
            cat("CUDA device ", device, " does not exist (", n, " device", n == 1 ? "" : "s", ")"));
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    require(prop.major == 9 && prop.minor == 0,
            cat("this build of ernie targets sm_90a (H100/H200); device ", device, " is ",
                prop.name, " (sm_", prop.major, prop.minor, ")"));
    sms_ = prop.multiProcessorCount;
    spec_ = {prop.name, static_cast<int64_t>(prop.totalGlobalMem)};
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    for (auto* e : {&meta_done_[0], &meta_done_[1], &meta_done_[2], &meta_done_[3],
                    &sample_done_[0], &sample_done_[1]}) {
      check_cuda(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "cudaEventCreate");
    }
    for (auto& e : upload_done_) {
      check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    }
    check_cuda(cudaStreamCreateWithFlags(&lane_streams_[kSideLane], cudaStreamNonBlocking),
               "cudaStreamCreate");
    for (cudaEvent_t* e : {&fork_, &join_}) {
      check_cuda(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "cudaEventCreate");
    }
    lane_streams_[kMainLane] = stream_;
    // One cuBLAS handle (and workspace) per stream: GEMMs on them may run at once.
    for (int i = 0; i < kLanes; ++i) {
      check_cublas(cublasCreate(&blas_[i]), "cublasCreate");
      check_cublas(cublasSetStream(blas_[i], lane_streams_[i]), "cublasSetStream");
      check_cuda(cudaMalloc(&blas_workspace_[i], kBlasWorkspace), "cudaMalloc (cuBLAS workspace)");
      check_cublas(cublasSetWorkspace(blas_[i], blas_workspace_[i], kBlasWorkspace),
                   "cublasSetWorkspace");
    }
    if (cuda::path_enabled("ERNIE_GEMM_TUNE")) tuned_ = std::make_unique<cuda::TunedGemm>();
    for (auto& s : staging_) {
      check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&s), kStagingBytes, cudaHostAllocDefault),
                 "cudaHostAlloc (weight staging)");
    }
    log::info("CUDA device ", device, ": ", cuda::describe_device(device));
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (auto& [key, g] : graphs_) cudaGraphExecDestroy(g.exec);
    for (auto e : events_) cudaEventDestroy(e);
    for (void* p : allocations_) cudaFree(p);
    if (kv_) cudaFree(kv_);
    cudaStreamSynchronize(lane_streams_[kSideLane]);
    tuned_.reset();
    for (int i = 0; i < kLanes; ++i) {
      cublasDestroy(blas_[i]);
      cudaFree(blas_workspace_[i]);
    }
    for (auto* s : staging_) cudaFreeHost(s);
    for (cudaEvent_t e : {fork_, join_}) cudaEventDestroy(e);
    cudaStreamDestroy(lane_streams_[kSideLane]);
    for (auto& e : upload_done_) cudaEventDestroy(e);
    for (auto e : meta_done_) cudaEventDestroy(e);
    for (auto e : sample_done_) cudaEventDestroy(e);
    for (void* p : sample_out_) cudaFree(p);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  DeviceSpec device_spec() const override { return spec_; }
  DType activation_dtype() const override { return DType::kBF16; }

  // ---- weights ----
  Tensor load_weight(const HostTensor& src) override {
    activate();
    int64_t n = 1;
    for (int64_t d : src.shape) n *= d;
    DType dtype = src.dtype;
    std::vector<uint16_t> converted;
    const char* bytes = static_cast<const char*>(src.data);
    if (dtype == DType::kF16) {  // rare: keep activations in one dtype
      converted.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        converted[i] = float_to_bf16(load_as_float(src.data, DType::kF16, i));
      }
      bytes = reinterpret_cast<const char*>(converted.data());
      dtype = DType::kBF16;
    }
    require(dtype == DType::kBF16 || dtype == DType::kF32,
            cat("the CUDA backend loads bf16/f16/f32 checkpoints, not ", dtype_name(dtype)));
    const size_t total = static_cast<size_t>(n) * dtype_size(dtype);
    void* dst = allocate_weight(total);
    // mmap -> pinned -> device through two staging buffers: copying one chunk into pinned
    // memory overlaps the transfer of the previous one.
    for (size_t off = 0; off < total; off += kStagingBytes) {
      const size_t len = std::min(kStagingBytes, total - off);
      check_cuda(cudaEventSynchronize(upload_done_[next_staging_]), "cudaEventSynchronize");
      char* st = staging_[next_staging_];
      std::memcpy(st, bytes + off, len);
      check_cuda(
          cudaMemcpyAsync(static_cast<char*>(dst) + off, st, len, cudaMemcpyHostToDevice, stream_),
          "cudaMemcpyAsync (weights)");
      check_cuda(cudaEventRecord(upload_done_[next_staging_], stream_), "cudaEventRecord");
      next_staging_ ^= 1;
    }
    if (!converted.empty()) check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return Tensor{dst, dtype, src.shape};
  }

  Tensor random_weight(const Shape& shape, DType dtype, const RandomInit& init,
                       uint64_t seed) override {
    activate();
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    require(dtype == DType::kBF16 || dtype == DType::kF32, "random weights are bf16 or f32");
    void* dst = allocate_weight(static_cast<size_t>(n) * dtype_size(dtype));
    if (dtype == DType::kBF16) {
      cuda::fill_random_bf16(static_cast<__nv_bfloat16*>(dst), n, init.uniform, init.a, init.b,
                             seed, stream_);
    } else {
      cuda::fill_random_f32(static_cast<float*>(dst), n, init.uniform, init.a, init.b, seed,
                            stream_);
    }
    return Tensor{dst, dtype, shape};
  }

  int64_t weight_bytes() const override { return weight_bytes_; }

  // The routed experts' tensors go into the tiled layout of expert_layout.h (a new allocation
  // each; the row-major one is freed), which the MoE kernels read.
  void prepare_moe(MoeWeights& w) override {
    require(!w.experts_prepared, "prepare_moe: these MoE weights are prepared already");
    require(w.experts_gate_up.dtype == DType::kBF16 && w.experts_down.dtype == DType::kBF16,
            "the CUDA backend's routed experts are bf16");
    const Shape &gu = w.experts_gate_up.shape, &dn = w.experts_down.shape;
    require(
        gu.size() == 3 && dn.size() == 3 && gu[0] == dn[0] && gu[1] == 2 * dn[2] && gu[2] == dn[1],
        "MoE expert weights must be gate/up [E, 2I, H] and down [E, H, I]");
    const int64_t experts = gu[0], hidden = dn[1], inter = dn[2];
    require(inter % cuda::kTiledGroupRows == 0 && hidden % cuda::kTiledGroupRows == 0,
            cat("the CUDA MoE kernels need the hidden size (", hidden,
                ") and the experts' intermediate size (", inter, ") to be multiples of ",
                cuda::kTiledGroupRows));
    activate();
    // Shared experts of a whole number of routed experts' sizes also run as that many more
    // experts of the routed GEMMs (cuda::SharedFold): small decode steps run them there,
    // reading their own tensors through TMA maps made here (no second copy); larger batches
    // and prefill run them through cuBLAS. ERNIE_FOLD_SHARED=0 turns it off (for A/B runs).
    static const bool fold_enabled = cuda::path_enabled("ERNIE_FOLD_SHARED");
    int64_t fold = 0, si = 0;
    if (fold_enabled && !w.shared_gate_up.empty()) {
      require(w.shared_gate_up.dtype == DType::kBF16 && w.shared_down.dtype == DType::kBF16 &&
                  w.shared_gate_up.shape.size() == 2 && w.shared_down.shape.size() == 2 &&
                  w.shared_gate_up.dim(1) == hidden && w.shared_down.dim(0) == hidden &&
                  w.shared_gate_up.dim(0) == 2 * w.shared_down.dim(1),
              "MoE shared experts must be bf16 gate/up [2 I_s, H] and down [H, I_s]");
      si = w.shared_down.dim(1);
      if (si % inter == 0) fold = si / inter;
    }
    if (fold > 0) {
      fold_maps_[w.shared_gate_up.data] =
          cuda::shared_fold_maps(bf(w.shared_gate_up), bf(w.shared_down), hidden, si);
    }
    const int64_t gu_rows = 2 * inter, kp_h = cuda::tiled_cols(hidden);
    const int64_t kp_i = cuda::tiled_cols(inter);
    auto* gate_up = static_cast<__nv_bfloat16*>(
        allocate_weight(static_cast<size_t>(experts * gu_rows * kp_h) * 2));
    auto* down = static_cast<__nv_bfloat16*>(
        allocate_weight(static_cast<size_t>(experts * hidden * kp_i) * 2));
    cuda::tile_expert_weights(gate_up, bf(w.experts_gate_up), experts * gu_rows, hidden, stream_);
    cuda::tile_expert_weights(down, bf(w.experts_down), experts * hidden, inter, stream_);
    // The router's weights also as bf16 terms, for the logits of many tokens (moe()).
    if (router_gemm_tokens() > 0 && w.router.dtype == DType::kF32 && w.router.shape.size() == 2) {
      const int64_t count = w.router.dim(0) * w.router.dim(1);
      auto* terms = static_cast<__nv_bfloat16*>(
          allocate_weight(static_cast<size_t>(cuda::kRouterTerms * count) * 2));
      cuda::split_router_terms(terms, w.router.as<float>(), count, stream_);
      w.router_terms =
          Tensor{terms, DType::kBF16, {cuda::kRouterTerms * w.router.dim(0), w.router.dim(1)}};
    }
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    free_weight(w.experts_gate_up.data, static_cast<size_t>(experts * gu_rows * hidden) * 2);
    free_weight(w.experts_down.data, static_cast<size_t>(experts * hidden * inter) * 2);
    w.experts_gate_up.data = gate_up;
    w.experts_down.data = down;
    w.shared_folded = static_cast<int>(fold);
    w.experts_prepared = true;
  }

  // ---- KV cache ----
  void configure_attention(const AttentionConfig& cfg) override {
    require(cfg.num_heads > 0 && cfg.num_kv_heads > 0 && cfg.num_heads % cfg.num_kv_heads == 0 &&
                cfg.head_dim > 0 && cfg.head_dim % 2 == 0,
            "invalid attention configuration");
    require(
        cfg.head_dim == 32 || cfg.head_dim == 48 || cfg.head_dim == 64 || cfg.head_dim == 128,
        cat("the CUDA attention kernels support head_dim 32, 48, 64 and 128, not ", cfg.head_dim));
    attn_ = cfg;
    // Rope's inverse frequencies for the qkv projection's fused epilogue, by the recipe of
    // rope_store_kv and the CPU reference (double, rounded to f32).
    activate();
    const int half = cfg.head_dim / 2;
    std::vector<float> inv(half);
    for (int j = 0; j < half; ++j) {
      inv[j] = static_cast<float>(1.0 / std::pow(cfg.rope_theta, 2.0 * j / cfg.head_dim));
    }
    if (d_inv_freq_ != nullptr) free_weight(d_inv_freq_, inv_freq_bytes_);
    inv_freq_bytes_ = inv.size() * sizeof(float);
    d_inv_freq_ = static_cast<float*>(allocate_weight(inv_freq_bytes_));
    check_cuda(cudaMemcpy(d_inv_freq_, inv.data(), inv_freq_bytes_, cudaMemcpyHostToDevice),
               "cudaMemcpy (rope frequencies)");
  }

  void allocate_kv_cache(int num_layers, int64_t num_blocks, int block_size) override {
    require(attn_.num_heads > 0, "configure_attention must precede allocate_kv_cache");
    require(num_blocks > 0 && block_size > 0, "KV cache needs at least one block");
    activate();
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    for (auto& [key, g] : graphs_) cudaGraphExecDestroy(g.exec);  // they point at the old cache
    graphs_.clear();
    if (kv_) cudaFree(kv_);
    kv_ = nullptr;
    // One spare block past the engine's: padding rows of graph steps write there.
    layer_elems_ =
        static_cast<size_t>(num_blocks + 1) * block_size * attn_.num_kv_heads * attn_.head_dim;
    const size_t bytes = 2 * layer_elems_ * num_layers * sizeof(__nv_bfloat16);
    check_cuda(cudaMalloc(&kv_, bytes),
               cat("cudaMalloc of the KV cache (", bytes / 1e9, " GB)").c_str());
    // Finite contents everywhere: attention tiles may bring in slots past a sequence's end
    // (masked to probability 0, and 0 * NaN would not be 0).
    check_cuda(cudaMemsetAsync(kv_, 0, bytes, stream_), "cudaMemsetAsync (KV cache)");
    num_layers_ = num_layers;
    num_blocks_ = num_blocks;
    block_size_ = block_size;
  }
  DType kv_dtype() const override { return DType::kBF16; }
  int64_t num_kv_blocks() const override { return num_blocks_; }
  int kv_block_size() const override { return block_size_; }

  bool sizes_kv_from_device_memory() const override { return true; }
  int64_t kv_memory_budget(double utilization, int64_t reserve, const std::string& what) override {
    activate();
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    // Chunks the profiled step added are merged first (as the next step would merge them):
    // counted apart, they held up to twice the peak.
    const size_t before_merge = arena_.capacity();
    reset_arena();
    // Everything held now (weights, the scratch arena at its measured peak, cuBLAS, the
    // context, a KV cache if any) stays, and so does what the caller reserves (the decode
    // graphs); a margin covers later small allocations (sampling results) and slack.
    const int64_t held_kv =
        kv_ ? static_cast<int64_t>(2 * layer_elems_ * num_layers_ * sizeof(__nv_bfloat16)) : 0;
    size_t free = 0, total = 0;
    check_cuda(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    const int64_t in_use = static_cast<int64_t>(total - free) - held_kv;
    const int64_t margin = 128ll << 20;
    const int64_t budget =
        static_cast<int64_t>(utilization * static_cast<double>(total)) - in_use - reserve - margin;
    log::info("GPU memory: ", total / 1e9, " GB total, ", in_use / 1e9, " GB in use (weights ",
              weight_bytes_ / 1e9, " GB, activation peak ", arena_.peak() / 1e9,
              " GB in a scratch arena of ", arena_.capacity() / 1e9, " GB, ", before_merge / 1e9,
              " GB before merging); KV cache budget at utilization ", utilization, ": ",
              std::max<int64_t>(budget, 0) / 1e9, " GB (after ", reserve / 1e9, " GB for ", what,
              " and a margin of ", margin / 1e9, " GB)");
    return std::max<int64_t>(budget, 0);
  }

  // Frees the last step's scratch (merging the arena's chunks once the stream is idle).
  void reset_arena() {
    arena_.reset([this] { check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); });
  }

  int64_t device_memory_in_use() override {
    activate();
    size_t free = 0, total = 0;
    check_cuda(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    return static_cast<int64_t>(total - free);
  }

  // ---- steps ----
  void begin_step(const StepInput& step) override { prepare_step(step, false); }

  // ---- stage profile: an event at every mark, read back when the step is complete ----
  void enable_profile(bool on) override { profiling_ = on; }

  void mark(Stage s) override {
    if (!profiling_ || capturing_) return;
    if (marks_.size() == events_.size()) {
      cudaEvent_t e = nullptr;
      check_cuda(cudaEventCreate(&e), "cudaEventCreate");
      events_.push_back(e);
    }
    check_cuda(cudaEventRecord(events_[marks_.size()], stream_), "cudaEventRecord");
    marks_.push_back(s);
  }

  StageProfile take_profile() override {
    close_profiled_step();
    StageProfile p = profile_;
    profile_ = {};
    return p;
  }

  // ---- CUDA graphs ----
  bool enable_graphs(int max_batch, int max_blocks_per_seq) override {
    graph_max_batch_ = max_batch;
    graph_max_blocks_ = max_blocks_per_seq;
    return true;
  }

  void begin_graph_step(const StepInput& step) override {
    require(graph_max_batch_ > 0, "enable_graphs must precede graph steps");
    require(step.num_seqs() <= graph_max_batch_ && step.max_blocks_per_seq <= graph_max_blocks_,
            "graph step larger than the graph limits");
    prepare_step(step, true);
  }

  bool replay_graph(int key) override {
    auto it = graphs_.find(key);
    if (it == graphs_.end()) return false;
    if (it->second.generation != arena_.generation()) {  // the arena moved: record again
      cudaGraphExecDestroy(it->second.exec);
      graphs_.erase(it);
      return false;
    }
    check_cuda(cudaGraphLaunch(it->second.exec, stream_), "cudaGraphLaunch");
    arena_.rewind(it->second.end);  // the graph's buffers stay in use until the next step
    return true;
  }

  bool capture_graph(int key, const std::function<void()>& body) override {
    const auto start = arena_.mark();
    // The eager run: sets kernel attributes, sizes the arena, tunes new GEMM shapes; its results
    // stand if we stop.
    {
      const cuda::TunedGemm::Window tuning(tuned_.get());
      body();
    }
    if (tuned_ && key == graph_max_batch_) {
      log::info("GEMM tuning: ", tuned_->shapes(), " shapes, ", tuned_->non_default(),
                " faster than cuBLAS's default, ", tuned_->tune_ms() / 1e3, " s");
    }
    if (arena_.chunk_count() != start.chunks) return false;  // grew: addresses not final yet
    arena_.rewind(start);
    check_cuda(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
               "cudaStreamBeginCapture");
    try {
      capturing_ = true;
      body();
      capturing_ = false;
    } catch (...) {
      capturing_ = false;
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(stream_, &g);
      if (g) cudaGraphDestroy(g);
      throw;
    }
    cudaGraph_t graph = nullptr;
    check_cuda(cudaStreamEndCapture(stream_, &graph), "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check_cuda(err, "cudaGraphInstantiate");
    auto& slot = graphs_[key];
    if (slot.exec) cudaGraphExecDestroy(slot.exec);
    slot = Graph{exec, arena_.mark(), arena_.generation()};
    arena_.rewind(start);  // the caller replays it to run the step
    return true;
  }

  Tensor scratch(const Shape& shape, DType dtype) override {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return Tensor{arena_.alloc(static_cast<size_t>(n) * dtype_size(dtype)), dtype, shape};
  }

  // ---- ops ----
  void embedding(Tensor out, const Tensor& table) override {
    require(table.dtype == DType::kBF16 && out.dtype == DType::kBF16, "embedding is bf16");
    for (int32_t id : step_->token_ids) {
      require_parts(id < table.dim(0), "token id ", id, " outside the embedding table");
    }
    cuda::gather_rows(out.data, table.data, d_tokens_, step_->num_tokens(),
                      table.dim(1) * static_cast<int64_t>(sizeof(__nv_bfloat16)), stream_);
  }

  void rms_norm(Tensor out, const Tensor& x, const Tensor& weight, float eps) override {
    require(weight.dtype == DType::kBF16, "RMSNorm weights must be bf16");
    cuda::fused_add_rms_norm(bf(out), bf(x), nullptr, bf(weight), static_cast<int>(x.dim(0)),
                             static_cast<int>(x.dim(1)), eps, stream_);
  }

  void add_rms_norm(Tensor out, Tensor residual, const Tensor& x, const Tensor& weight,
                    float eps) override {
    require(weight.dtype == DType::kBF16, "RMSNorm weights must be bf16");
    cuda::fused_add_rms_norm(bf(out), bf(residual), bf(x), bf(weight),
                             static_cast<int>(residual.dim(0)), static_cast<int>(residual.dim(1)),
                             eps, stream_);
  }

  // Up to 4 tokens the main stream's linear layers (qkv, o, dense MLP, lm_head) take
  // cuda::skinny_gemm (weights by a bulk copy before the wait for x) rather than cuBLAS: H200,
  // step 1 x 1000 2.634 -> 2.590 ms. The shared experts (gemm below) stay on cuBLAS: through it,
  // at full bandwidth beside the router, they slowed the step to 2.717. ERNIE_SKINNY=0 turns it
  // off (for A/B runs). 5-16 tokens take cuda::skinny_tc where its grid is one wave (below).
  void linear(Tensor out, const Tensor& x, const Tensor& w) override {
    static const bool skinny = cuda::path_enabled("ERNIE_SKINNY");
    const int m = static_cast<int>(x.dim(0)), k = static_cast<int>(x.dim(1));
    const int n = static_cast<int>(w.dim(0));
    if (skinny && m > 0 && cuda::skinny_gemm_fits(m, k)) {
      check_linear(out, x, w);
      cuda::skinny_gemm(out.data, out.dtype == DType::kF32, bf(x), bf(w), m, n, k, stream_);
      return;
    }
    if (out.dtype == DType::kBF16 && use_skinny_tc(m, n, k)) {
      check_linear(out, x, w);
      cuda::skinny_tc(bf(out), bf(x), bf(w), m, n, k, skinny_tc_rows(), stream_);
      return;
    }
    if (out.dtype == DType::kBF16 && cluster_gemm_takes(kClusterLinear, m)) {
      const cuda::ClusterGemmPlan plan = cuda::cluster_gemm_plan(m, n, k);
      if (plan.splits > 0) {
        check_linear(out, x, w);
        cuda::cluster_gemm(bf(out), bf(x), bf(w), m, n, k, plan, stream_);
        return;
      }
    }
    gemm(kMainLane, out, x, w);
  }

  // Decode batches of 17 to ERNIE_CLUSTER_GEMM tokens (0, the default: none) take
  // cuda::cluster_gemm instead of cuBLAS for the uses in ERNIE_CLUSTER_GEMM_USES (bits, all by
  // default): kClusterQkv the qkv projection with rope and the KV store in its epilogue,
  // kClusterLinear the other bf16 linear layers (o), kClusterShared the shared experts (gate/up
  // with SwiGLU in its epilogue, then down). Off: on the H100 it is slower than tuned cuBLAS
  // for qkv and o (steps 128 / 256 x 1000 +0.7 / +0.8% with qkv alone, +1.8 / +2.5% with o
  // alone); the shared experts alone -0.8% at 512 x 1000, +0.4% at 256 (performance.md,
  // thirty-sixth round).
  static constexpr int kClusterQkv = 1, kClusterLinear = 2, kClusterShared = 4;
  static bool cluster_gemm_takes(int use, int m) {
    static const int max_tokens = cuda::switch_bits("ERNIE_CLUSTER_GEMM", 0);
    static const int uses = cuda::switch_bits("ERNIE_CLUSTER_GEMM_USES", 7);
    return (uses & use) != 0 && m >= cuda::kClusterGemmMinTokens && m <= max_tokens;
  }

  // From how many tokens the router's logits are a cuBLAS GEMM with its weights' bf16 terms
  // (cuda::route_topk_terms) instead of route_topk's own kernels (0: never): from
  // kRouteOrderedTokens + 1 (below, the kernels after the router rely on its launch order).
  // H200: the 8192-token router 215 -> 37 us (GEMM and top-k), mixed steps 8 x 1000 prefill +
  // 192 decodes 113.92 -> 110.80 ms, 8000 + 15 decodes 125.64 -> 122.87, decode steps 128 x
  // 1000 -1.3%, 256 x 1000 -1.0%. ERNIE_ROUTER_GEMM=0 turns it off, =N starts it at N tokens.
  static int router_gemm_tokens() {
    static const int tokens = [] {
      const int n = cuda::switch_bits("ERNIE_ROUTER_GEMM", cuda::kRouteOrderedTokens + 1);
      return n <= 0 ? 0 : std::max(n, cuda::kRouteOrderedTokens + 1);
    }();
    return tokens;
  }

  // 5-16 rows of the main stream's bf16 linear layers (qkv with its rope epilogue, o) take
  // cuda::skinny_tc, 32 weight rows per CTA, where its grid is one wave (the weights stream in
  // before the wait for x only if every CTA is resident): H200, steps 16 x 1000 8.949 -> 8.829
  // ms, 16 x 8500 10.733 -> 10.564 (qkv + rope 9.7 -> 4.6 us after the norm, o 7.3 -> 3.6 us
  // after the split combine); 16 rows per CTA (twice the input read from L2) 8.982 and 10.629.
  // ERNIE_SKINNY_TC=0 turns it off, =16 takes 16 rows per CTA. (It replaced skinny_mma,
  // clusters of eight CTAs over the reduction: o 7.1 -> 6.1 us, qkv in two waves, no gain.)
  static int skinny_tc_rows() {
    static const int rows = cuda::switch_bits("ERNIE_SKINNY_TC", 32);
    return rows == 16 || rows == 32 ? rows : 0;
  }
  bool use_skinny_tc(int m, int n, int k) {
    // ERNIE_SKINNY_TC_MAX=32 (A/B runs; default 16): up to 32 tokens (two m16 tiles).
    static const int max_m =
        std::min(cuda::switch_bits("ERNIE_SKINNY_TC_MAX", 16), cuda::kSkinnyTcMaxRows);
    const int rows = skinny_tc_rows();
    if (rows == 0 || m <= cuda::kSkinnyMaxRows || m > max_m ||
        !cuda::skinny_tc_fits(m, n, k, rows)) {
      return false;
    }
    const int key = k * 64 + rows;  // k and the rows per CTA
    auto it = tc_ctas_.find(key);
    if (it == tc_ctas_.end()) {
      it = tc_ctas_.emplace(key, cuda::skinny_tc_ctas_per_wave(k, rows)).first;
    }
    return n / rows <= it->second;
  }

  static void check_linear(const Tensor& out, const Tensor& x, const Tensor& w) {
    check(x.dim(1) == w.dim(1) && out.dim(0) == x.dim(0) && out.dim(1) == w.dim(0),
          "linear shape mismatch");
    require(x.dtype == DType::kBF16 && w.dtype == DType::kBF16,
            "the CUDA linear takes bf16 inputs and weights");
  }

  // out = x w^T on lane's stream (lane_streams_). Decode-sized batches (at most
  // kTunedRows rows) take cuda::TunedGemm's algorithm for their shape: shapes are tuned during
  // the eager run before each graph's capture, so a graph and an eager step of its size use the
  // same algorithm; other shapes take cuBLAS's default. H100: step 256 x 1000 21.87 -> 21.60
  // ms (the router's logits 9.6 -> 8.4 us, qkv 12.8 -> 11.4, o 10.1 -> 8.7), 256 prompts
  // 1000/1000 +0.9%; 370 shapes tuned in 3.6 s at startup. ERNIE_GEMM_TUNE=0 turns it off.
  static constexpr int kTunedRows = 512;
  void gemm(int lane, Tensor out, const Tensor& x, const Tensor& w) {
    check_linear(out, x, w);
    const int m = static_cast<int>(x.dim(0)), n = static_cast<int>(w.dim(0)),
              k = static_cast<int>(x.dim(1));
    if (m == 0) return;
    const bool f32 = out.dtype == DType::kF32;
    if (tuned_ && m <= kTunedRows &&
        tuned_->run(blas_[lane], out.data, f32, x.data, w.data, m, n, k, blas_workspace_[lane],
                    kBlasWorkspace, lane_streams_[lane], !capturing_)) {
      return;
    }
    check_cublas(cuda::default_gemm(blas_[lane], out.data, f32, x.data, w.data, m, n, k),
                 "cublasGemmEx");
  }

  void rope_store_kv(Tensor qkv, int layer) override {
    // 16-byte pieces and the frequency table (rope_store_kv_vec) rather than a pow in double
    // per CTA: H200, steps 16 x 1000 9.006 -> 8.998 ms, 64 x 1500 12.511 -> 12.493, 256 x 1000
    // 16.967 -> 16.880. ERNIE_ROPE_VEC=0 turns it off (for A/B runs).
    static const bool vec = cuda::path_enabled("ERNIE_ROPE_VEC");
    // From 64 tokens rope_store_kv_wide (256-thread CTAs over the step's pieces, four loads a
    // thread in flight) instead of a 64-thread CTA per seven pieces: H200, 8192-token step's
    // kernel 72.6 -> 46.3 us a layer. ERNIE_ROPE_WIDE=0 turns it off.
    static const bool wide = cuda::path_enabled("ERNIE_ROPE_WIDE");
    if (wide && vec && step_->num_tokens() >= 64 && attn_.head_dim % 8 == 0) {
      cuda::rope_store_kv_wide(bf(qkv), k_cache(layer), v_cache(layer), d_positions_, d_slots_,
                               d_inv_freq_, step_->num_tokens(), attn_.num_heads,
                               attn_.num_kv_heads, attn_.head_dim, stream_);
      return;
    }
    if (vec && step_->num_tokens() <= 65535 && attn_.head_dim % 8 == 0) {
      cuda::rope_store_kv_vec(bf(qkv), k_cache(layer), v_cache(layer), d_positions_, d_slots_,
                              d_inv_freq_, step_->num_tokens(), attn_.num_heads, attn_.num_kv_heads,
                              attn_.head_dim, stream_);
      return;
    }
    cuda::rope_store_kv(bf(qkv), k_cache(layer), v_cache(layer), d_positions_, d_slots_,
                        step_->num_tokens(), attn_.num_heads, attn_.num_kv_heads, attn_.head_dim,
                        attn_.rope_theta, stream_);
  }

  // Where linear() takes the skinny GEMM, its epilogue does rope_store_kv's work too: one
  // kernel fewer per layer (H200: step 1 x 1000 2.649 -> 2.607 ms). The stage profile keeps
  // them apart.
  // ERNIE_FUSED_ROPE=0 turns it off (for A/B runs).
  void qkv_rope_store_kv(Tensor qkv, const Tensor& x, const Tensor& w, int layer) override {
    static const bool fused =
        cuda::path_enabled("ERNIE_SKINNY") && cuda::path_enabled("ERNIE_FUSED_ROPE");
    const int m = static_cast<int>(x.dim(0)), k = static_cast<int>(x.dim(1));
    const cuda::SkinnyRope rope{k_cache(layer),     v_cache(layer), d_positions_,
                                d_slots_,           d_inv_freq_,    attn_.num_heads,
                                attn_.num_kv_heads, attn_.head_dim};
    const int n = static_cast<int>(w.dim(0)), tc_rows = skinny_tc_rows();
    const bool skinny = cuda::skinny_rope_fits(m, k, rope);
    if (fused && !profiling_ && m > 0 && m == step_->num_tokens() && qkv.dtype == DType::kBF16 &&
        (skinny || (use_skinny_tc(m, n, k) && cuda::skinny_tc_rope_fits(m, k, tc_rows, rope)))) {
      check_linear(qkv, x, w);
      require(qkv.dim(1) == (attn_.num_heads + 2 * attn_.num_kv_heads) * attn_.head_dim,
              "qkv_rope_store_kv: qkv's width does not match the attention configuration");
      if (skinny) {
        cuda::skinny_gemm_rope(bf(qkv), bf(x), bf(w), m, k, rope, stream_);
      } else {
        cuda::skinny_tc_rope(bf(qkv), bf(x), bf(w), m, k, tc_rows, rope, stream_);
      }
      return;
    }
    if (!profiling_ && m == step_->num_tokens() && qkv.dtype == DType::kBF16 &&
        cluster_gemm_takes(kClusterQkv, m) && cuda::cluster_gemm_rope_fits(rope) &&
        n == (attn_.num_heads + 2 * attn_.num_kv_heads) * attn_.head_dim) {
      const cuda::ClusterGemmPlan plan = cuda::cluster_gemm_plan(m, n, k);
      if (plan.splits > 0) {
        check_linear(qkv, x, w);
        cuda::cluster_gemm_rope(bf(qkv), bf(x), bf(w), m, k, rope, plan, stream_);
        return;
      }
    }
    Backend::qkv_rope_store_kv(qkv, x, w, layer);
  }

  void attention(Tensor out, const Tensor& qkv, int layer) override {
    cuda::PagedAttentionArgs a;
    a.qkv = bf(qkv);
    a.out = bf(out);
    a.k_cache = k_cache(layer);
    a.v_cache = v_cache(layer);
    a.positions = d_positions_;
    a.query_start = d_query_start_;
    a.context_lens = d_context_lens_;
    a.block_tables = d_block_tables_;
    a.tile_seq = d_tile_seq_;
    a.tile_row0 = d_tile_row0_;
    a.num_tiles = static_cast<int>(plan_.tile_seq.size());
    a.tokens = step_->num_tokens();
    a.heads = attn_.num_heads;
    a.kv_heads = attn_.num_kv_heads;
    a.head_dim = attn_.head_dim;
    a.dims = d_dims_;
    a.block_size = block_size_;
    a.cache_slots = (num_blocks_ + 1) * block_size_;
    a.splits = plan_.splits;
    a.decode_shape = plan_.decode_shape;
    a.paired = plan_.paired;
    a.scale = attn_.scale;
    const auto scratch_mark = arena_.mark();
    if (a.splits > 1) {
      const size_t rows = static_cast<size_t>(a.splits) * a.tokens * a.heads;
      a.partial_o = static_cast<float*>(arena_.alloc(rows * a.head_dim * sizeof(float)));
      a.partial_lse = static_cast<float*>(arena_.alloc(rows * sizeof(float)));
    }
    cuda::paged_attention(a, stream_);
    arena_.rewind(scratch_mark);
  }

  void silu_mul(Tensor out, const Tensor& gate_up) override {
    cuda::silu_mul(bf(out), bf(gate_up), static_cast<int>(gate_up.dim(0)),
                   static_cast<int>(gate_up.dim(1) / 2), stream_);
  }

  // The dense MLP's intermediates go back to the arena when it returns: kept to the step's end
  // they added ~0.6 GB to the activation peak at 8192 prompt tokens (the MoE layers after it
  // need as much again), memory the KV cache did not get.
  void dense_mlp(Tensor out, const Tensor& x, const Tensor& gate_up, const Tensor& down) override {
    const auto scratch_mark = arena_.mark();
    Backend::dense_mlp(out, x, gate_up, down);
    arena_.rewind(scratch_mark);
  }

  // The shared experts of an MoE layer: s = down(silu(gate) * up) of x.
  void shared_experts(Tensor s, const Tensor& x, const MoeWeights& w, int lane) {
    const int64_t tokens = x.dim(0), si = w.shared_down.dim(1);
    if (cluster_gemm_takes(kClusterShared, static_cast<int>(tokens)) && s.dtype == DType::kBF16 &&
        x.dtype == DType::kBF16 && w.shared_gate_up.dtype == DType::kBF16 &&
        w.shared_down.dtype == DType::kBF16) {
      const int m = static_cast<int>(tokens), hidden = static_cast<int>(x.dim(1));
      const int inter = static_cast<int>(si);
      const cuda::ClusterGemmPlan gate_up = cuda::cluster_gemm_plan(m, 2 * inter, hidden);
      const cuda::ClusterGemmPlan down = cuda::cluster_gemm_plan(m, hidden, inter);
      if (gate_up.splits > 0 && down.splits > 0) {
        Tensor a = scratch({tokens, si}, DType::kBF16);
        cuda::cluster_gemm_swiglu(bf(a), bf(x), bf(w.shared_gate_up), m, 2 * inter, hidden, gate_up,
                                  lane_streams_[lane]);
        cuda::cluster_gemm(bf(s), bf(a), bf(w.shared_down), m, hidden, inter, down,
                           lane_streams_[lane]);
        return;
      }
    }
    Tensor gu = scratch({tokens, 2 * si}, DType::kBF16);
    Tensor a = scratch({tokens, si}, DType::kBF16);
    gemm(lane, gu, x, w.shared_gate_up);
    cuda::silu_mul(bf(a), bf(gu), static_cast<int>(tokens), static_cast<int>(si),
                   lane_streams_[lane]);
    gemm(lane, s, a, w.shared_down);
  }

  void moe(Tensor out, const Tensor& x, const MoeWeights& w) override { run_moe(out, x, w, {}); }

  // The combine ends with the next layer's input norm (one kernel fewer per MoE layer), not in
  // the stage profile (H200, `ernie_kernel_bench 20 steps`: 1 x 1000 2.401 -> 2.369 ms, 16 x
  // 1000 9.447 -> 9.415, 256 x 1000 18.32 -> 18.26). ERNIE_FUSED_MOE_NORM=0 turns it off.
  void moe_add_rms_norm(Tensor normed, Tensor residual, Tensor out, const Tensor& x,
                        const MoeWeights& w, const Tensor& norm_weight, float eps) override {
    static const bool fused = cuda::path_enabled("ERNIE_FUSED_MOE_NORM");
    const int hidden = static_cast<int>(x.dim(1));
    if (!fused || profiling_ || !cuda::moe_combine_norm_fits(hidden) ||
        norm_weight.dtype != DType::kBF16) {
      Backend::moe_add_rms_norm(normed, residual, out, x, w, norm_weight, eps);
      return;
    }
    run_moe(out, x, w, cuda::CombineNorm{bf(normed), bf(residual), bf(norm_weight), eps});
  }

  void run_moe(Tensor out, const Tensor& x, const MoeWeights& w, const cuda::CombineNorm& norm) {
    const int tokens = static_cast<int>(x.dim(0)), hidden = static_cast<int>(x.dim(1));
    const int experts = static_cast<int>(w.router.dim(0)), k = w.top_k;
    const int inter = static_cast<int>(w.experts_down.dim(2));
    require(w.router.dtype == DType::kF32 && w.router_bias.dtype == DType::kF32,
            "the MoE router weights and correction bias must be f32");
    require(w.experts_prepared, "MoE weights must go through Backend::prepare_moe before moe()");
    if (tokens == 0) return;
    const auto scratch_mark = arena_.mark();
    const int pairs = tokens * k;
    const int block_m = cuda::moe_block_m(pairs, experts);
    // Up to kFoldTokens tokens the shared experts run inside the routed GEMMs where
    // prepare_moe folded them (their gate/up blocks start while the router runs): H200, step
    // 1 x 1000 2.540 -> 2.503 ms; folded at 16-256 tokens too, steps were 2-8% slower than with
    // the side stream. Other decode-sized batches run them on the side stream, beside the
    // router and the routed experts: at a few tokens every kernel there is latency-bound, and
    // the two chains overlap. Prefill keeps one stream and cuBLAS for them (its expert GEMM is
    // persistent over every SM), and so does the stage profile (each stage is timed on its own).
    constexpr int kFoldTokens = 8;
    const bool has_shared = !w.shared_gate_up.empty();
    cuda::SharedFold fold;
    if (w.shared_folded > 0 && tokens <= kFoldTokens && !cuda::moe_wgmma_block(block_m) &&
        !profiling_) {
      // ERNIE_FOLD_EARLY=0: the folded blocks wait for the router like the routed ones (A/B).
      static const bool early = cuda::path_enabled("ERNIE_FOLD_EARLY");
      fold = cuda::SharedFold{w.shared_folded, tokens, early && tokens <= cuda::kRouteOrderedTokens,
                              nullptr, &fold_maps_.at(w.shared_gate_up.data)};
    }
    const bool unfolded_shared = has_shared && fold.experts == 0;
    // Decode-sized batches of 128-row wgmma blocks (up to kSideSharedWgmmaTokens tokens)
    // overlap the shared experts too; they ran after the routed down on the main stream (at
    // 512 tokens 42 us a layer). H100, step 512 x 1000 -0.2 to -0.3% in four A/B pairs
    // (docs/performance.md, twenty-eighth round). ERNIE_SIDE_SHARED_WGMMA=0 turns it off.
    static const bool side_wgmma = cuda::path_enabled("ERNIE_SIDE_SHARED_WGMMA");
    constexpr int kSideSharedWgmmaTokens = 512;
    const bool overlap =
        unfolded_shared && !profiling_ &&
        (!cuda::moe_wgmma_block(block_m) || (side_wgmma && tokens <= kSideSharedWgmmaTokens));
    // Many tokens: the router's logits as one cuBLAS GEMM of x with its weights' bf16 terms
    // (prepare_moe made them), the partial sums added by the top-k kernel.
    const bool by_terms = !w.router_terms.empty() && tokens >= router_gemm_tokens();
    Tensor shared_out;
    if (unfolded_shared) shared_out = scratch({tokens, hidden}, DType::kBF16);
    if (overlap) {
      check_cuda(cudaEventRecord(fork_, stream_), "cudaEventRecord");
      check_cuda(cudaStreamWaitEvent(lane_streams_[kSideLane], fork_), "cudaStreamWaitEvent");
      shared_experts(shared_out, x, w, kSideLane);
      check_cuda(cudaEventRecord(join_, lane_streams_[kSideLane]), "cudaEventRecord");
    }
    auto* ids = static_cast<int32_t*>(arena_.alloc(pairs * sizeof(int32_t)));
    auto* weights = static_cast<float*>(arena_.alloc(pairs * sizeof(float)));
    const int64_t term_cols = static_cast<int64_t>(cuda::kRouterTerms) * experts;
    void* route_scratch =
        arena_.alloc(by_terms ? static_cast<size_t>(tokens * term_cols) * sizeof(float)
                              : cuda::route_scratch_bytes(tokens, hidden, experts));
    const int64_t cap = cuda::moe_capacity(pairs, experts, block_m);
    auto* sorted = static_cast<int32_t*>(arena_.alloc(cap * sizeof(int32_t)));
    auto* block_expert = static_cast<int32_t*>(arena_.alloc(cap / block_m * sizeof(int32_t)));
    auto* pair_pos = static_cast<int32_t*>(arena_.alloc(pairs * sizeof(int32_t)));
    // Few tokens: the router kernel lays the pairs out too (one launch instead of three).
    const cuda::RouteLayout layout{sorted, block_expert, pair_pos, block_m,
                                   static_cast<int>(cap / block_m)};
    // With 32-row blocks each down CTA waits only for its own M-block's gate/up tiles
    // (cuda::moe_block_ready_fits), so the down CTAs that start during gate/up's last wave
    // stream their weights at once instead of idling until the whole gate/up grid ends: 96 and
    // 128 tokens -1.5% a step, 192 and 256 unchanged (docs/performance.md). ERNIE_MOE_READY=0
    // turns it off.
    static const bool block_ready_on = cuda::path_enabled("ERNIE_MOE_READY");
    int32_t* block_ready = nullptr;
    if (block_ready_on && cuda::moe_block_ready_fits(block_m, fold)) {
      block_ready = static_cast<int32_t*>(arena_.alloc(cap / block_m * sizeof(int32_t)));
    }
    bool laid_out = false;  // the router laid the pairs out too (few tokens)
    if (by_terms) {
      const Tensor partial{route_scratch, DType::kF32, {tokens, term_cols}};
      gemm(kMainLane, partial, x, w.router_terms);
      cuda::route_topk_terms(ids, weights, partial.as<float>(), w.router_bias.as<float>(), tokens,
                             experts, k, w.norm_min, stream_);
    } else {
      laid_out = cuda::route_topk(ids, weights, bf(x), w.router.as<float>(),
                                  w.router_bias.as<float>(), tokens, hidden, experts, k, w.norm_min,
                                  route_scratch, stream_, &layout, fold.early);
      if (laid_out) block_ready = nullptr;  // its layout clears no counters
    }
    if (!laid_out) {
      void* align_scratch = arena_.alloc(cuda::moe_align_scratch_bytes(pairs, experts));
      cuda::moe_align(sorted, block_expert, pair_pos, ids, pairs, experts, block_m, align_scratch,
                      stream_, block_ready);
    }
    mark(Stage::kMoeExperts);
    // Rows of the GEMMs' outputs: the folded experts' first, then the routed layout's.
    const int64_t fold_rows = cuda::moe_shared_rows(fold, block_m), rows = fold_rows + cap;
    if (fold_rows > 0) {
      fold.down_out = static_cast<float*>(arena_.alloc(fold_rows * hidden * sizeof(float)));
    }
    auto* act = static_cast<__nv_bfloat16*>(arena_.alloc(rows * inter * sizeof(__nv_bfloat16)));
    auto* y = static_cast<__nv_bfloat16*>(arena_.alloc(rows * hidden * sizeof(__nv_bfloat16)));
    // An expert of two 32-row blocks in one CTA a column tile where such experts are common
    // (cuda::moe_pair_blocks): H100, steps 256 and 320 x 1000 -0.8% and -1.4%.
    const cuda::MoeSwapForm form{.pair_blocks = fold.experts == 0 &&
                                                cuda::moe_pair_blocks(pairs, experts, block_m)};
    cuda::moe_gate_up(act, bf(x), bf(w.experts_gate_up), sorted, block_expert, cap, block_m, k,
                      hidden, inter, experts, stream_, fold, block_ready, form);
    cuda::moe_down(y, act, bf(w.experts_down), weights, sorted, block_expert, cap, block_m, hidden,
                   inter, experts, stream_, fold, block_ready, form);
    if (overlap) {
      check_cuda(cudaStreamWaitEvent(stream_, join_), "cudaStreamWaitEvent");
    } else if (unfolded_shared) {
      mark(Stage::kMoeShared);
      shared_experts(shared_out, x, w, kMainLane);
    }
    mark(Stage::kMoeCombine);
    __nv_bfloat16* shared = unfolded_shared ? bf(shared_out) : nullptr;
    cuda::moe_combine(bf(out), y, pair_pos, shared, tokens, k, hidden, stream_, fold, block_m,
                      norm);
    arena_.rewind(scratch_mark);
  }

  void gather_logit_rows(Tensor out, const Tensor& x) override {
    cuda::gather_rows(out.data, x.data, d_logits_indices_,
                      static_cast<int>(step_->logits_indices.size()),
                      x.dim(1) * static_cast<int64_t>(dtype_size(x.dtype)), stream_);
  }

  void to_host(const Tensor& src, float* dst) override {
    require(src.dtype == DType::kF32, "to_host copies f32 tensors");
    check_cuda(cudaMemcpyAsync(dst, src.data, src.numel() * sizeof(float), cudaMemcpyDeviceToHost,
                               stream_),
               "cudaMemcpyAsync (to host)");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  std::vector<SampledToken> sample(const Tensor& logits,
                                   const std::vector<SamplingRow>& rows) override {
    sample_async(logits, rows);
    return finish_sample();
  }

  void sample_async(const Tensor& logits, const std::vector<SamplingRow>& rows) override {
    check(logits.dim(0) == static_cast<int64_t>(rows.size()), "one sampling row per logits row");
    require(logits.dtype == DType::kF32, "sampling takes f32 logits");
    require(!pending_.active, "sample_async: the last sample was not finished");
    const int n = static_cast<int>(rows.size());
    const int vocab = static_cast<int>(logits.dim(1));
    pending_ = PendingSample{};
    pending_.n = n;
    if (n == 0) {
      pending_.active = true;
      return;
    }
    mark(Stage::kSampling);
    // Rows without top-k, top-p or logprobs (an OpenAI request's defaults): each row over
    // several CTAs (cuda::sample_rows_split), rows without edits read straight from the logits
    // with no per-element stores (H200, `ernie_kernel_bench 20 sampling`: one CTA a row 0.110
    // ms at 1 row, 0.127 at 16; the split kernels with a work buffer 0.036 and 0.049; lean at
    // 256 rows 0.359 -> 0.267 with a temperature, 0.181 -> 0.068 greedy).
    // ERNIE_SPLIT_SAMPLER=0 turns the split kernels off, ERNIE_SAMPLER_LEAN=0 the lean form
    // (then 64 CTAs a row with the work buffer, up to kSplitRows rows).
    static const bool split_enabled = cuda::path_enabled("ERNIE_SPLIT_SAMPLER");
    static const bool lean = cuda::path_enabled("ERNIE_SAMPLER_LEAN");
    constexpr int kSplitRows = 32, kLeanRows = 1024;
    const bool split =
        split_enabled && n <= (lean ? kLeanRows : kSplitRows) &&
        std::all_of(rows.begin(), rows.end(), [vocab](const SamplingRow& s) {
          return (s.top_k <= 0 || s.top_k >= vocab) && s.top_p >= 1.0f && s.num_logprobs < 0;
        });
    // Of those, greedy rows without edits (the benchmark's requests) need no parameters on the
    // device: cuda::greedy_rows, two kernels and no upload (H100, `ernie_kernel_bench 20
    // sampling` greedy: 1 row 0.028 -> 0.021 ms, 16 rows 0.031 -> 0.021, 256 rows 0.074 ->
    // 0.053). ERNIE_GREEDY_ROWS=0 turns it off.
    static const bool greedy_enabled = cuda::path_enabled("ERNIE_GREEDY_ROWS");
    const bool plain_greedy =
        greedy_enabled && split && lean &&
        std::all_of(rows.begin(), rows.end(), [](const SamplingRow& s) {
          return s.temperature < 1e-5f && (s.logit_bias == nullptr || s.logit_bias->empty()) &&
                 s.repetition_penalty == 1.0f && s.frequency_penalty == 0.0f &&
                 s.presence_penalty == 0.0f && s.banned.empty();
        });
    int max_top = 0;
    cuda::SamplingTables tab;
    const cuda::DeviceSamplingRow* d_params = nullptr;  // with tab: none for plain greedy rows
    if (!plain_greedy) {
      std::vector<cuda::DeviceSamplingRow> params(n);
      std::vector<int32_t> bias_ids, pen_ids, pen_counts, ban_ids;
      std::vector<float> bias_values;
      std::unordered_map<int32_t, int32_t> counts;
      for (int r = 0; r < n; ++r) {
        const SamplingRow& s = rows[r];
        auto& p = params[r];
        p.temperature = s.temperature;
        p.top_p = s.top_p;
        p.min_p = s.min_p;
        p.top_k = s.top_k;
        p.presence_penalty = s.presence_penalty;
        p.frequency_penalty = s.frequency_penalty;
        p.repetition_penalty = s.repetition_penalty;
        p.num_logprobs = s.num_logprobs;
        p.seed = s.seed;
        p.position = s.position;
        max_top = std::max(max_top, s.num_logprobs);
        p.bias_begin = static_cast<int>(bias_ids.size());
        if (s.logit_bias) {
          for (const auto& [id, b] : *s.logit_bias) {
            bias_ids.push_back(id);
            bias_values.push_back(b);
          }
        }
        p.bias_end = static_cast<int>(bias_ids.size());
        p.pen_begin = static_cast<int>(pen_ids.size());
        if (s.repetition_penalty != 1.0f || s.frequency_penalty != 0.0f ||
            s.presence_penalty != 0.0f) {
          counts.clear();
          if (s.output_tokens) {
            for (int32_t t : *s.output_tokens) ++counts[t];
          }
          if (s.repetition_penalty != 1.0f && s.prompt_tokens) {
            for (int32_t t : *s.prompt_tokens) counts.try_emplace(t, 0);
          }
          for (const auto& [t, c] : counts) {
            pen_ids.push_back(t);
            pen_counts.push_back(c);
          }
        }
        p.pen_end = static_cast<int>(pen_ids.size());
        p.ban_begin = static_cast<int>(ban_ids.size());
        ban_ids.insert(ban_ids.end(), s.banned.begin(), s.banned.end());
        p.ban_end = static_cast<int>(ban_ids.size());
      }
      Packer pk;
      const size_t o_params = pk.add(params), o_bias_ids = pk.add(bias_ids),
                   o_bias_values = pk.add(bias_values), o_pen_ids = pk.add(pen_ids),
                   o_pen_counts = pk.add(pen_counts), o_ban = pk.add(ban_ids);
      char* dev = static_cast<char*>(arena_.alloc(pk.bytes().size()));
      upload_meta(dev, pk.bytes(), "cudaMemcpyAsync (sampling)");
      tab.bias_ids = reinterpret_cast<int32_t*>(dev + o_bias_ids);
      tab.bias_values = reinterpret_cast<float*>(dev + o_bias_values);
      tab.pen_ids = reinterpret_cast<int32_t*>(dev + o_pen_ids);
      tab.pen_counts = reinterpret_cast<int32_t*>(dev + o_pen_counts);
      tab.ban_ids = reinterpret_cast<int32_t*>(dev + o_ban);
      d_params = reinterpret_cast<cuda::DeviceSamplingRow*>(dev + o_params);
    }

    // Results: ids, logprobs, ranks, then the top-k tables, in one block copied back at once.
    const size_t top = static_cast<size_t>(n) * std::max(max_top, 1);
    const size_t out_bytes = 3 * n * sizeof(int32_t) + 2 * top * sizeof(int32_t);
    // The other slot than the last sample's: that one may still feed the step being built.
    const int slot = 1 - sample_slot_;
    if (sample_out_bytes_[slot] < out_bytes) {
      check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // rare: growth
      if (sample_out_[slot]) cudaFree(sample_out_[slot]);
      sample_out_[slot] = nullptr;
      sample_out_bytes_[slot] = round_up(std::max(out_bytes, size_t{16} << 10), 4096);
      check_cuda(cudaMalloc(&sample_out_[slot], sample_out_bytes_[slot]),
                 "cudaMalloc (sampling results)");
    }
    char* d_out = static_cast<char*>(sample_out_[slot]);
    cuda::SamplingOutput out;
    out.ids = reinterpret_cast<int32_t*>(d_out);
    out.logprobs = reinterpret_cast<float*>(d_out + n * sizeof(int32_t));
    out.ranks = reinterpret_cast<int32_t*>(d_out + 2 * n * sizeof(int32_t));
    out.top_ids = reinterpret_cast<int32_t*>(d_out + 3 * n * sizeof(int32_t));
    out.top_logprobs =
        reinterpret_cast<float*>(d_out + 3 * n * sizeof(int32_t) + top * sizeof(int32_t));
    out.max_top = std::max(max_top, 1);
    if (plain_greedy) {
      void* scratch = arena_.alloc(cuda::sample_split_scratch_bytes(n));
      cuda::greedy_rows(logits.as<float>(), n, vocab, out.ids, scratch, stream_);
    } else {
      // At most kChunkRows rows a launch, so that the work buffer (a row of f32 per row) stays
      // at kChunkRows rows: the profiled step samples max_num_seqs rows with logprobs, and its
      // peak is what the KV cache budget leaves room for (1024 rows of the 21B vocabulary: 424
      // MB of work buffer, 106 MB in chunks).
      constexpr int kChunkRows = 256;
      const int chunk_rows = std::min(n, kChunkRows);
      auto* work = static_cast<float*>(
          arena_.alloc(static_cast<size_t>(chunk_rows) * vocab * sizeof(float)));
      void* scratch = split ? arena_.alloc(cuda::sample_split_scratch_bytes(chunk_rows)) : nullptr;
      for (int r0 = 0; r0 < n; r0 += kChunkRows) {
        const int m = std::min(kChunkRows, n - r0);
        const size_t top_row0 = static_cast<size_t>(r0) * out.max_top;
        const cuda::SamplingOutput o{
            out.ids + r0,           out.logprobs + r0,           out.ranks + r0,
            out.top_ids + top_row0, out.top_logprobs + top_row0, out.max_top};
        const float* lg = logits.as<float>() + static_cast<size_t>(r0) * vocab;
        if (split) {
          cuda::sample_rows_split(lg, work, m, vocab, d_params + r0, tab, o, scratch, lean,
                                  stream_);
        } else {
          cuda::sample_rows(lg, work, m, vocab, d_params + r0, tab, o, stream_);
        }
      }
    }
    // This slot's pinned buffer was last read by finish_sample two samples ago.
    char* h_out = result_host_[slot].get(out_bytes);
    // Plain greedy rows write only their ids.
    const size_t copy_bytes = plain_greedy ? n * sizeof(int32_t) : out_bytes;
    check_cuda(cudaMemcpyAsync(h_out, d_out, copy_bytes, cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync (samples)");
    check_cuda(cudaEventRecord(sample_done_[slot], stream_), "cudaEventRecord");
    sample_slot_ = slot;
    fed_rows_ = n;
    pending_.active = true;  // only once everything is queued: a throw above leaves none
    pending_.vocab = vocab;
    pending_.slot = slot;
    pending_.top = top;
    pending_.max_top = out.max_top;
    pending_.num_logprobs.resize(n);
    for (int r = 0; r < n; ++r) pending_.num_logprobs[r] = rows[r].num_logprobs;
  }

  std::vector<SampledToken> finish_sample() override {
    require(pending_.active, "finish_sample without a sample_async");
    pending_.active = false;
    const int n = pending_.n, vocab = pending_.vocab;
    if (n == 0) return {};
    check_cuda(cudaEventSynchronize(sample_done_[pending_.slot]), "cudaEventSynchronize");
    close_profiled_step();
    const size_t top = pending_.top;
    const char* h_out = result_host_[pending_.slot].get(0);
    const auto* ids = reinterpret_cast<const int32_t*>(h_out);
    const auto* lps = reinterpret_cast<const float*>(h_out + n * sizeof(int32_t));
    const auto* ranks = reinterpret_cast<const int32_t*>(h_out + 2 * n * sizeof(int32_t));
    const auto* top_ids = reinterpret_cast<const int32_t*>(h_out + 3 * n * sizeof(int32_t));
    const auto* top_lps =
        reinterpret_cast<const float*>(h_out + 3 * n * sizeof(int32_t) + top * sizeof(int32_t));
    std::vector<SampledToken> result(n);
    for (int r = 0; r < n; ++r) {
      require_parts(ids[r] >= 0 && ids[r] < vocab, "sampling produced token id ", ids[r],
                    " for row ", r, " (the row's logits are not finite)");
      result[r].id = ids[r];
      if (pending_.num_logprobs[r] >= 0) {
        result[r].logprob = lps[r];
        result[r].rank = ranks[r];
        const int k = std::min(pending_.num_logprobs[r], vocab);
        for (int i = 0; i < k; ++i) {
          result[r].top.push_back(
              {top_ids[r * pending_.max_top + i], top_lps[r * pending_.max_top + i]});
        }
      }
    }
    return result;
  }

 private:
  static constexpr size_t kStagingBytes = 64u << 20;

  void activate() { check_cuda(cudaSetDevice(device_), "cudaSetDevice"); }

  // Turns the step's marks into stage times once its last op is done.
  void close_profiled_step() {
    if (marks_.empty()) return;
    mark(marks_.back());  // an end event (its own interval is never counted)
    check_cuda(cudaEventSynchronize(events_[marks_.size() - 1]), "cudaEventSynchronize");
    for (size_t i = 0; i + 1 < marks_.size(); ++i) {
      float ms = 0.0f;
      check_cuda(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]), "cudaEventElapsedTime");
      profile_.ms[static_cast<int>(marks_[i])] += ms;
    }
    ++profile_.steps;
    marks_.clear();
  }

  // Validates the step, resets the scratch arena and uploads the step's metadata in one copy.
  // Graph steps (`fixed`) get a layout that depends only on the batch size: the attention
  // split count is fixed by the tile count and the block tables go last in a region sized for
  // the widest table, so every buffer lands at the same address for the same batch size.
  void prepare_step(const StepInput& step, bool fixed) {
    activate();
    close_profiled_step();  // a step that was not sampled
    require(kv_ != nullptr, "allocate_kv_cache must precede the first step");
    // The spare block (index num_blocks_) is only for padding rows of graph steps.
    validate_step(step, num_blocks_ + (fixed ? 1 : 0), block_size_,
                  std::numeric_limits<int32_t>::max());
    step_ = &step;
    reset_arena();
    // The fewest keys a decode split takes (ERNIE_ATTN_SPLIT_KEYS=N; rounded up to 64-key
    // tiles): short contexts run fewer, longer splits in the graphs' fixed split counts, each
    // split's fixed latency chain being its cost rather than its bytes (128 against 64: step
    // 1 x 1000 -1.8%, 16 sequences and more unchanged; 512: +6.5%).
    static const int min_split_keys = cuda::switch_bits("ERNIE_ATTN_SPLIT_KEYS", 128);
    plan_ = cuda::plan_attention(
        step.query_start, step.context_lens, attn_.num_heads, attn_.num_kv_heads, sms_, fixed,
        cuda::prefill_tiles_paired(attn_.head_dim, block_size_), min_split_keys);
    const int32_t dims[2] = {plan_.split_keys, step.max_blocks_per_seq};
    Packer pk;
    const size_t o_tokens = pk.add(step.token_ids), o_pos = pk.add(step.positions),
                 o_qs = pk.add(step.query_start), o_ctx = pk.add(step.context_lens),
                 o_slots = pk.add(step.slot_mapping), o_logits = pk.add(step.logits_indices),
                 o_tseq = pk.add(plan_.tile_seq), o_trow = pk.add(plan_.tile_row0),
                 o_dims = pk.add(dims, 2), o_tables = pk.add(step.block_tables);
    // Graph steps: every table at the same place whatever the step's widths, then the token
    // feed (at most a pair a sequence) in room of its own.
    const size_t tables_end =
        o_tables + static_cast<size_t>(step.num_seqs()) * graph_max_blocks_ * sizeof(int32_t);
    if (fixed) pk.pad_to(tables_end);
    const size_t o_feed = pk.add(step.token_feed);
    require(!fixed || step.token_feed.size() <= static_cast<size_t>(step.num_seqs()),
            "a graph step feeds at most one token a sequence");
    const size_t region =
        pk.region(fixed ? round_up(tables_end, 16) + static_cast<size_t>(step.num_seqs()) *
                                                         sizeof(std::pair<int32_t, int32_t>)
                        : 0);
    char* dev = static_cast<char*>(arena_.alloc(region));
    upload_meta(dev, pk.bytes(), "cudaMemcpyAsync (step)");
    d_tokens_ = reinterpret_cast<int32_t*>(dev + o_tokens);
    d_positions_ = reinterpret_cast<int32_t*>(dev + o_pos);
    d_query_start_ = reinterpret_cast<int32_t*>(dev + o_qs);
    d_context_lens_ = reinterpret_cast<int32_t*>(dev + o_ctx);
    d_block_tables_ = reinterpret_cast<int32_t*>(dev + o_tables);
    d_slots_ = reinterpret_cast<int64_t*>(dev + o_slots);
    d_logits_indices_ = reinterpret_cast<int32_t*>(dev + o_logits);
    d_tile_seq_ = reinterpret_cast<int32_t*>(dev + o_tseq);
    d_tile_row0_ = reinterpret_cast<int32_t*>(dev + o_trow);
    d_dims_ = reinterpret_cast<int32_t*>(dev + o_dims);
    if (!step.token_feed.empty()) {
      // Ids the last sample_async drew, into their tokens' places (before the graph or the
      // first layer reads them; stream order does the rest).
      int max_row = 0;
      for (const auto& [i, r] : step.token_feed) max_row = std::max(max_row, r);
      require_parts(max_row < fed_rows_, "token feed row ", max_row, " past the last sample's ",
                    fed_rows_, " rows");
      cuda::feed_tokens(d_tokens_, reinterpret_cast<const int32_t*>(dev + o_feed),
                        static_cast<int>(step.token_feed.size()),
                        static_cast<const int32_t*>(sample_out_[sample_slot_]), stream_);
    }
  }

  // Copies packed host bytes to dev through the next pinned buffer of the ring (waiting only
  // for that buffer's previous copy).
  void upload_meta(void* dev, const std::vector<char>& bytes, const char* what) {
    const int i = next_meta_;
    next_meta_ = (next_meta_ + 1) % 4;
    check_cuda(cudaEventSynchronize(meta_done_[i]), "cudaEventSynchronize");
    char* host = meta_host_[i].get(bytes.size());
    std::memcpy(host, bytes.data(), bytes.size());
    check_cuda(cudaMemcpyAsync(dev, host, bytes.size(), cudaMemcpyHostToDevice, stream_), what);
    check_cuda(cudaEventRecord(meta_done_[i], stream_), "cudaEventRecord");
  }

  void free_weight(void* p, size_t bytes) {
    const auto it = std::find(allocations_.begin(), allocations_.end(), p);
    require(it != allocations_.end(), "free_weight: not a weight of this backend");
    allocations_.erase(it);
    check_cuda(cudaFree(p), "cudaFree (weight)");
    weight_bytes_ -= static_cast<int64_t>(bytes);
  }

  void* allocate_weight(size_t bytes) {
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, std::max<size_t>(bytes, 1)),
               cat("cudaMalloc of a weight (", bytes / 1e6, " MB; ", weight_bytes_ / 1e9,
                   " GB already loaded)")
                   .c_str());
    allocations_.push_back(p);
    weight_bytes_ += static_cast<int64_t>(bytes);
    return p;
  }

  __nv_bfloat16* k_cache(int layer) const {
    return static_cast<__nv_bfloat16*>(kv_) + 2 * layer_elems_ * layer;
  }
  __nv_bfloat16* v_cache(int layer) const { return k_cache(layer) + layer_elems_; }

  int device_;
  int sms_ = 0;
  DeviceSpec spec_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
  // The folded shared experts' tensor maps by their gate/up tensor (prepare_moe).
  std::unordered_map<const void*, cuda::SharedFoldMaps> fold_maps_;
  // The streams GEMMs run on: the main one and the side one (shared experts of decode steps).
  static constexpr int kMainLane = 0, kSideLane = 1;
  static constexpr int kLanes = 2;
  cudaStream_t lane_streams_[kLanes] = {};
  cublasHandle_t blas_[kLanes] = {};  // one per lane stream
  static constexpr size_t kBlasWorkspace = 32u << 20;
  void* blas_workspace_[kLanes] = {};
  std::unique_ptr<cuda::TunedGemm> tuned_;  // decode-sized GEMMs (gemm; null: ERNIE_GEMM_TUNE=0)
  // Host-to-device metadata (step inputs, sampling tables) goes through a ring of pinned
  // buffers, each reused only once its last copy is done (upload_meta): with asynchronous
  // scheduling the next step's inputs are copied while the last step still runs.
  cudaEvent_t meta_done_[4] = {};
  PinnedBuffer meta_host_[4];
  int next_meta_ = 0;
  // Sampling results, double-buffered: a step's ids stay on the device (the next step's token
  // feed) and in pinned memory until finish_sample reads them, while the next sample is queued.
  cudaEvent_t sample_done_[2] = {};
  PinnedBuffer result_host_[2];
  void* sample_out_[2] = {nullptr, nullptr};
  size_t sample_out_bytes_[2] = {0, 0};
  int sample_slot_ = 0;  // the slot of the last sample_async
  struct PendingSample {
    bool active = false;
    int n = 0, vocab = 0, max_top = 1, slot = 0;
    size_t top = 0;
    std::vector<int> num_logprobs;
  } pending_;
  int fed_rows_ = 0;  // rows the last sample_async drew: the ids a token feed may take
  cudaEvent_t upload_done_[2] = {nullptr, nullptr};
  char* staging_[2] = {nullptr, nullptr};
  int next_staging_ = 0;
  std::vector<void*> allocations_;
  int64_t weight_bytes_ = 0;

  AttentionConfig attn_;
  void* kv_ = nullptr;
  size_t layer_elems_ = 0;
  int num_layers_ = 0;
  int64_t num_blocks_ = 0;
  int block_size_ = 0;

  struct Graph {
    cudaGraphExec_t exec = nullptr;
    DeviceArena::Mark end{};  // arena state after the recorded step
    uint64_t generation = 0;
  };
  std::map<int, Graph> graphs_;
  int graph_max_batch_ = 0, graph_max_blocks_ = 0;

  bool profiling_ = false, capturing_ = false;
  std::vector<cudaEvent_t> events_;  // reused across steps
  std::vector<Stage> marks_;         // this step's marks, one event each
  StageProfile profile_;

  DeviceArena arena_;
  const StepInput* step_ = nullptr;
  cuda::AttentionPlan plan_;
  float* d_inv_freq_ = nullptr;  // [head_dim / 2] (configure_attention)
  size_t inv_freq_bytes_ = 0;
  std::unordered_map<int, int> tc_ctas_;  // skinny_tc_ctas_per_wave's answers by (k, rows)
  int32_t *d_tokens_ = nullptr, *d_positions_ = nullptr, *d_query_start_ = nullptr,
          *d_context_lens_ = nullptr, *d_block_tables_ = nullptr, *d_logits_indices_ = nullptr,
          *d_tile_seq_ = nullptr, *d_tile_row0_ = nullptr, *d_dims_ = nullptr;
  int64_t* d_slots_ = nullptr;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) {
  return std::make_unique<CudaBackend>(device);
}

}  // namespace ernie::backend
